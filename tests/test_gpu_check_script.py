"""benchmarks/gpu_check.sh only runs on a GPU machine, where every minute is scarce: check here what can be checked
without one, so that it does not fail there for a reason a CPU could have caught."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
TEXT = open(SCRIPT).read()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_script_parses():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_embedded_python_compiles():
    blocks = re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", TEXT, flags=re.S)
    assert blocks, "no embedded python block found"
    for block in blocks:
        compile(block, "gpu_check.sh (embedded python)", "exec")


def test_at_most_eight_files_under_out():
    # the device tool brings back at most 8 files from $OUT; anything more is lost
    files = set(re.findall(r"\$OUT/([A-Za-z0-9_.-]+)", TEXT))
    assert 0 < len(files) <= 8, sorted(files)


@pytest.mark.parametrize("script, flags", [
    ("benchmarks/lora_layer.py", ("--device", "--ranks", "--out")),
    ("benchmarks/multi_lora_layer.py", ("--device", "--out")),
    ("benchmarks/layer_profile.py", ("--device", "--out")),
])
def test_benchmark_flags_the_script_uses_exist(script, flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for flag in flags:
        assert flag in proc.stdout, f"{script} has no {flag}"
        assert re.search(rf"{re.escape(os.path.basename(script))}[^\n]*{re.escape(flag)}", TEXT), \
            f"gpu_check.sh does not call {script} with {flag} (update this test with the script)"


def test_pytest_markers_and_paths_exist():
    match = re.search(r"pytest -m gpu[^\n]*\\\n\s*([^\n|]+)", TEXT)
    assert match, "the GPU test command was not found"
    for path in match.group(1).split():
        if not path.startswith("-") and not path.startswith("2>"):
            assert os.path.exists(os.path.join(ROOT, path)), path


def test_every_gpu_marked_test_file_is_on_the_scripts_path():
    match = re.search(r"pytest -m gpu[^\n]*\\\n\s*([^\n|]+)", TEXT)
    roots = [p for p in match.group(1).split() if not p.startswith(("-", "2>"))]
    marked = []
    for folder, _, names in os.walk(os.path.join(ROOT, "tests")):
        for name in names:
            if name.endswith(".py") and "mark.gpu" in open(os.path.join(folder, name)).read():
                marked.append(os.path.relpath(os.path.join(folder, name), ROOT))
    assert marked
    missed = [m for m in marked if m != "tests/test_gpu_check_script.py" and not any(m.startswith(r + "/") for r in roots)]
    assert not missed, f"gpu-marked tests gpu_check.sh does not run: {missed}"


def test_layer_profile_runs_on_cpu_and_splits_each_variant_into_its_ops(tmp_path):
    """gpu_check.sh's profile step, on the CPU at a tiny size: every variant timed, its ops listed (the fused layer's
    dropout path runs the lorafusion ops, the multi-adapter layer its autograd function), JSON written; bad
    arguments named."""
    import json

    from benchmarks import layer_profile

    out = tmp_path / "profile.json"
    res = layer_profile.main(["--shape", "96x40x24", "--r", "4", "--ps", "0,0.25", "--steps", "1", "--reps", "2",
                              "--multi-backends", "cpu,nosuch", "--out", str(out)])
    good = {"base", "eager p=0", "eager p=0.25", "fused:cpu p=0", "fused:cpu p=0.25", "multi:cpu p=0",
            "multi:cpu p=0.25"}
    assert set(res["variants"]) == good | {"multi:nosuch p=0", "multi:nosuch p=0.25"}, set(res["variants"])
    assert res["variants"]["base"]["ratio"] == 1.0
    for name in good:
        v = res["variants"][name]
        assert v["ms"] > 0 and v["ratio"] > 0 and v["kernels"], name
        assert all(k["us_per_step"] > 0 for k in v["kernels"]), name
    # a variant that cannot be built is recorded as failed; the run goes on with the others
    assert "nosuch" in res["variants"]["multi:nosuch p=0.25"]["error"]
    ops = {k["name"] for k in res["variants"]["fused:cpu p=0.25"]["kernels"]}
    assert {"lorafusion::lora_linear_forward", "lorafusion::lora_linear_backward"} <= ops, ops
    assert not any(k["name"].startswith("lorafusion::") for k in res["variants"]["base"]["kernels"])
    assert json.loads(out.read_text())["variants"].keys() == res["variants"].keys()
    for bad, word in ((["--shape", "96x40"], "--shape"), (["--ps", "0,1.0"], "--ps"),
                      (["--backends", "nosuch"], "--backends")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "layer_profile.py"), *bad,
                               "--out", str(tmp_path / "x.json")], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert proc.returncode != 0 and word in proc.stderr, (bad, proc.stderr[-500:])


def test_layer_profile_placement_variants_run_the_placement_they_name(monkeypatch):
    """The profile's triton / triton+blas variants (fused and multi-adapter), built and run on CPU tensors under
    the Triton interpreter at a tiny size: each runs the GEMM placement its name says, whatever
    $LORAFUSION_TRITON_GEMM holds, so the GPU run's comparison cannot silently time one placement twice."""
    import torch

    from lorafusion.backends import triton_backend, triton_blas_backend
    from lorafusion.multi import triton_kernels as multi_tk

    if os.environ.get("TRITON_INTERPRET") != "1" or triton_backend.unavailable_reason():
        pytest.skip("needs the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, no GPU)")
    from benchmarks import layer_profile

    from lorafusion.multi import backends as multi_backends

    monkeypatch.setattr(multi_backends, "_cache", {})  # backends built after the spies below hold the spied functions
    calls = []
    for mod, names in ((triton_backend, ("forward",)), (triton_blas_backend, ("forward",)),
                       (multi_tk, ("segmented_gemm", "segmented_term"))):
        for fn in names:
            monkeypatch.setattr(mod, fn, lambda *a, _f=getattr(mod, fn), _n=f"{mod.__name__}.{fn}", **k:
                                calls.append(_n) or _f(*a, **k))
    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "blas")  # the plain "triton" variants must still run fused
    variants = layer_profile.build_variants(64, 32, 24, 4, [0.1], torch.float32, "cpu", ["triton", "triton+blas"],
                                            ["triton", "triton+blas"])
    # (must run, must not run); the blas term launches the GEMM kernel through segmented_gemm (K = 0), so that
    # one is not excluded there
    want = {"fused:triton p=0.1": (".triton_backend.forward", ".triton_blas_backend.forward"),
            "fused:triton+blas p=0.1": (".triton_blas_backend.forward", ".triton_backend.forward"),
            "multi:triton p=0.1": (".segmented_gemm", ".segmented_term"),
            "multi:triton+blas p=0.1": (".segmented_term", None)}
    for name, (must, must_not) in want.items():
        calls.clear()
        x = torch.randn(64, 32, requires_grad=True)
        variants[name](x).sum().backward()
        assert any(c.endswith(must) for c in calls), (name, calls)
        assert must_not is None or not any(c.endswith(must_not) for c in calls), (name, calls)
