"""The multi-adapter CUDA kernels' own source, run on the CPU (``cuda_emulation.cpp``: one thread per CUDA thread,
real barriers and atomics), against the C++ CPU ops: shrink, grad and expand_add over segment layouts with rows of no
adapter, ranks 1 to 300, dropout on and off, unaligned sizes, and the grad kernel's row chunking at several SM
counts. No GPU needed; the GPU tests (test_multi_gpu.py) check the same kernels on the device."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from lorafusion.multi import AdapterSegments, AdapterSpec
from lorafusion.multi import ops as multi_ops
from lorafusion.multi import segments

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    if multi_ops.cpp_ops_reason() is not None:
        pytest.skip(multi_ops.cpp_ops_reason())
    exe = tmp_path_factory.mktemp("cuda_emulation") / "cuda_emulation"
    proc = subprocess.run([cxx, "-std=c++20", "-O2", "-pthread", f"-I{CSRC}", os.path.join(HERE, "cuda_emulation.cpp"),
                           "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(exe)


CASES = {
    # name: (T, K, N, ranks, dropout per adapter, row ids, SM count for the grad chunking, dropout on, scaled)
    "one token": (1, 300, 260, [8], [0.1], [0], 132, True, True),
    "rank 256 and 1, rows of no adapter": (231, 200, 130, [256, 1, 48], [0.1, 0.2, 0.0],
                                           [0] * 100 + [1] * 77 + [-1] * 10 + [2] * 44, 132, True, True),
    "same, one SM (long grad chunks), no dropout or scale": (231, 200, 130, [256, 1, 48], [0.1, 0.2, 0.0],
                                                             [0] * 100 + [1] * 77 + [-1] * 10 + [2] * 44, 1, False,
                                                             False),
    "rank 300, sizes not multiples of 16": (150, 77, 70, [300, 5], [0.3, 0.0], [0] * 70 + [1] * 30 + [0] * 50, 132,
                                            True, True),
    "rows in random order": (130, 100, 70, [16, 64, 65, 3, 128], [0.1, 0.0, 0.5, 0.2, 0.05], "random", 132, True,
                             True),
    "runs of skewed lengths": (None, 100, 130, [8, 16, 32, 64, 4, 200], [0.1] * 6, "runs", 7, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_multi_cuda_kernels_match_cpu_ops(harness, tmp_path, monkeypatch, case):
    # AdapterSpec caps ranks at 256; the kernels loop past their 4 rank blocks for more, which the 300 case checks
    monkeypatch.setattr(segments, "MAX_RANK", 1024)
    T, K, N, ranks, ps, ids, sms, dropout, scaled = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    if ids == "random":
        ids = [int(v) for v in rng.integers(-1, len(ranks), T)]
    elif ids == "runs":
        ids = [int(v) for v in np.repeat(rng.integers(-1, len(ranks), 20), rng.integers(1, 30, 20))]
        T = len(ids)
    specs = {f"a{i}": AdapterSpec(r, 2.0 * r, p) for i, (r, p) in enumerate(zip(ranks, ps))}
    t = AdapterSegments(ids, specs).tables("cpu")
    total, numel, seed = int(t.total_rank), int(t.s_numel), int(rng.integers(0, 2**62))
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
    x, wa = torch.randn(T, K, generator=g), torch.randn(total, K, generator=g)
    wb, dy = torch.randn(total, N, generator=g), torch.randn(T, N, generator=g)
    lf = torch.randn(max(numel, 1), generator=g)
    for name, v in dict(x=x, wa=wa, wb=wb, dy=dy, lf=lf, seg=t.seg, slot=t.slot, sp=t.slot_p, sc=t.slot_scale).items():
        v.contiguous().numpy().tofile(tmp_path / name)
    proc = subprocess.run([harness, str(tmp_path), str(T), str(K), str(N), str(total), str(numel), str(seed),
                           str(int(dropout)), str(int(scaled)), str(sms)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ops = torch.ops.lorafusion
    S = torch.from_numpy(np.fromfile(tmp_path / "o_shrink", dtype=np.float32))
    G = torch.from_numpy(np.fromfile(tmp_path / "o_grad", dtype=np.float32).reshape(total, K))
    E = torch.from_numpy(np.fromfile(tmp_path / "o_expand", dtype=np.float32).reshape(T, N))
    S_ref = ops.multi_lora_shrink(x, wa, t.seg, t.slot, t.slot_p, t.slot_scale, numel, seed, dropout, scaled)
    G_ref = ops.multi_lora_grad(lf[:numel], x, t.seg, t.slot, t.slot_p, t.slot_scale, total, seed, dropout, scaled)
    E_ref = dy.clone()
    ops.multi_lora_expand_add_(E_ref, lf[:numel], wb, t.seg, t.slot, t.slot_p, t.slot_scale, seed, dropout, scaled)
    # float32 both sides, summed in other orders: relative to each output's scale
    for got, ref in ((S, S_ref), (G, G_ref), (E, E_ref)):
        assert not torch.isnan(got).any(), "an output element no block wrote"
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
