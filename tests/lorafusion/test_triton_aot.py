"""Every Triton kernel compiles for sm_90 (H100 / H200) through Triton's full pipeline, ptxas included, and fits the
device's shared memory, on a machine without a GPU (``triton_aot_check.py``). The interpreter tests check the math;
this checks that the compiled path the GPU runs exists at all. Run in a subprocess: the check needs
``TRITON_INTERPRET`` unset before triton is imported, and the test command sets it for the interpreter tests."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "triton_aot_check.py")
MAIN_CASES = r"8192x4096->4096 r16|multi 8192 tokens"  # the issues' benchmark shapes


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_every_triton_kernel_compiles_for_sm90_and_fits_shared_memory(tmp_path):
    out = tmp_path / "aot.json"
    # ptxas -v (registers, spills) on the issues' benchmark shapes only, which the spill check below reads
    proc = _run("--arch", "90", "--ptxas-usage", "--ptxas-cases", MAIN_CASES, "--json", str(out))
    print(proc.stdout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-8000:]}"
    import json

    report = json.loads(out.read_text())
    kernels = {c["kernel"] for c in report["compiled"]}
    # the five single-adapter kernels, the TMA variants of its two GEMMs, the two helper kernels and the three
    # multi-adapter kernels
    assert kernels == {"_shrink_kernel", "_expand_forward_kernel", "_dy_shrink_kernel", "_grad_A_kernel",
                       "_expand_backward_kernel", "_expand_forward_tma_kernel", "_expand_backward_tma_kernel",
                       "_dropout_bits_kernel", "_philox_kernel", "_seg_shrink_kernel", "_seg_grad_kernel",
                       "_seg_gemm_kernel"}
    # bf16, fp16 and fp32 GEMMs were all compiled (fp16 on the small shapes in CI), with dropout on and off
    gemm = [c for c in report["compiled"] if c["kernel"] == "_expand_forward_kernel"]
    assert {c["case"].rsplit(" ", 1)[-1] for c in gemm if "8192x4096->4096" in c["case"]} >= {
        "torch.bfloat16", "torch.float32"}
    assert any(c["kernel"] == "_expand_forward_tma_kernel" and "float16" in c["case"] and "bfloat16" not in c["case"]
               for c in report["compiled"])
    assert any(c["kernel"] == "_seg_gemm_kernel" and "fp16" in c["case"] for c in report["compiled"])
    # every autotune config at the bf16 benchmark shape; one (the largest) per launch at the other shapes
    per_case = {}
    for c in gemm:
        per_case[c["case"]] = per_case.get(c["case"], 0) + 1
    assert per_case["single 8192x4096->4096 r16 p0.1 torch.bfloat16"] > 4, per_case
    # two launches there: the fused forward and the blas placement's stored term
    assert per_case["single 8192x4096->4096 r16 p0.1 torch.float32"] == 2, per_case
    assert {c["constexprs"]["HAS_DROPOUT"] for c in report["compiled"] if c["kernel"] == "_expand_backward_kernel"} \
        == {True, False}
    assert all(c["shared"] <= report["smem_optin"] for c in report["compiled"])
    # 16-bit products run on tensor cores: Hopper's warpgroup MMA in the GEMMs, some MMA in the rank-r kernels
    sixteen = [c for c in report["compiled"] if any(t in c["case"] for t in ("bfloat16", "float16", "fp16"))]
    for c in sixteen:
        if c["kernel"] in ("_expand_forward_kernel", "_expand_backward_kernel", "_seg_gemm_kernel",
                           "_expand_forward_tma_kernel", "_expand_backward_tma_kernel"):
            assert c["wgmma"] > 0, c
        if c["kernel"] in ("_seg_shrink_kernel", "_seg_grad_kernel"):
            assert c["wgmma"] + c["mma_sync"] > 0, c
    # no register spills in the bf16 GEMMs of the issues' benchmark shapes (the multi-adapter dX GEMM once spilled
    # over 2 KB per thread)
    main = [c for c in sixteen if c["kernel"] in ("_expand_forward_kernel", "_expand_backward_kernel",
                                                  "_expand_forward_tma_kernel", "_expand_backward_tma_kernel",
                                                  "_seg_gemm_kernel")
            and re.search(MAIN_CASES, c["case"])]
    assert main and all("registers" in c for c in main), "ptxas was not run on every benchmark-shape GEMM"
    assert main and all(c["spill_stores"] == 0 and c["spill_loads"] == 0 for c in main), \
        [(c["case"], c["kernel"], c["constexprs"], c["spill_stores"]) for c in main if c["spill_stores"]]


def test_a_kernel_over_the_shared_memory_limit_is_reported():
    # the multi-adapter GEMM's fp16 tiles need tens of KiB; a device allowing 8 KiB must fail the check, naming it
    proc = _run("--only", "multi 133", "--smem-optin", "8192")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"_seg_gemm_kernel needs \d+ B of shared memory, more than the 8192 B", proc.stderr), proc.stderr


def test_grad_A_with_two_rank_blocks_compiles_for_sm80():
    # regression: with the dropout select on the 1-bit keep mask, Triton 3.9's sm_80 pipeline failed on this kernel
    # ("shared-memory element type bit width must be a multiple of 8; got 1"); triton_kernels.zero_dropped fixed it
    proc = _run("--arch", "80", "--full", "--only", "1000x1000->1000 r128 p0.1 torch.bfloat16")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-8000:]}"
    assert "_grad_A_kernel" in proc.stdout
