"""GPU checks of the multi-adapter backends (bf16 included): Triton compiled and the CUDA ops, against the float64
reference computed on the CPU. Run by benchmarks/gpu_check.sh."""
import numpy as np
import pytest
import torch

from lorafusion.multi import AdapterSegments, AdapterSpec, multi_lora_linear, multi_lora_reference
from multi_helpers import TOL, make_specs, rel, row_ids

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _backend_or_skip(name):
    from lorafusion.multi.backends import get_multi_backend

    try:
        get_multi_backend("cuda", name)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _check_gpu(backend, dtype, T, K, N, specs, ids, seed=77):
    seg = AdapterSegments(ids, specs)
    g = torch.Generator().manual_seed(T * 7 + K)
    x = torch.randn(T, K, generator=g, dtype=torch.float64).to(dtype).double()
    W = (torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5).to(dtype).double()
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).double()
    ad = {n: (torch.randn(s.r, K, generator=g, dtype=torch.float64) / K ** 0.5,
              torch.randn(N, s.r, generator=g, dtype=torch.float64)) for n, s in specs.items()}
    dy = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype).double()
    xr = x.clone().requires_grad_()
    adr = {n: (A.clone().requires_grad_(), B.clone().requires_grad_()) for n, (A, B) in ad.items()}
    yr = multi_lora_reference(xr, W, b, adr, seg, seed=seed)
    yr.backward(dy)
    dev = "cuda"
    xg = x.to(dev, dtype).requires_grad_()
    adg = {n: (A.to(dev, torch.float32).requires_grad_(), B.to(dev, torch.float32).requires_grad_())
           for n, (A, B) in ad.items()}
    y = multi_lora_linear(xg, W.to(dev, dtype), b.to(dev, dtype), adg, seg, backend=backend, seed=seed)
    y.backward(dy.to(dev, dtype))
    errs = {"y": rel(y.cpu(), yr.detach()), "dx": rel(xg.grad.cpu(), xr.grad)}
    for n in seg.present_names:
        errs[f"dA[{n}]"] = rel(adg[n][0].grad.cpu(), adr[n][0].grad)
        errs[f"dB[{n}]"] = rel(adg[n][1].grad.cpu(), adr[n][1].grad)
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"{backend} {dtype}: {bad}"


@pytest.mark.parametrize("backend", ["triton", "triton+blas", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T, dist, n", [(1, "one", 1), (133, "no_adapter_rows", 16), (1000, "zipf", 64),
                                        (257, "distinct", 5)])
def test_gpu_matches_reference(monkeypatch, backend, dtype, T, dist, n):
    if backend == "triton+blas":  # the Triton backend with cuBLAS adding onto the stored rank-r term
        monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "blas")
        backend = "triton"
    _backend_or_skip(backend)
    rng = np.random.default_rng(T + n)
    specs = make_specs(n, rng, max_rank=64)
    _check_gpu(backend, dtype, T, 300, 260, specs, row_ids(dist, T, n, rng))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_rank_256_and_rank_1(backend):
    _backend_or_skip(backend)
    specs = {"big": AdapterSpec(256, 16.0, 0.1), "one": AdapterSpec(1, 2.0, 0.2), "mid": AdapterSpec(48, 48.0)}
    ids = [0] * 300 + [1] * 77 + [-1] * 10 + [2] * 100
    _check_gpu(backend, torch.bfloat16, len(ids), 512, 384, specs, ids)
