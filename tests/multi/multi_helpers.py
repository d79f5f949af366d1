"""Shared helpers of the tests/multi suite (not a test module): segment distributions, random adapters, and the
comparison of a backend against the float64 multi-adapter reference, forward and every gradient."""
from __future__ import annotations

import numpy as np
import torch

from lorafusion.multi import AdapterSegments, AdapterSpec, multi_lora_linear, multi_lora_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DISTRIBUTIONS = ("one", "distinct", "uniform", "zipf", "zero_rows", "no_adapter_rows")
RANKS = (1, 2, 3, 4, 8, 16, 5, 32, 7, 64)


def row_ids(dist: str, T: int, n: int, rng: np.random.Generator) -> list[int]:
    """Per-row adapter ids (-1 = none) for a segment distribution."""
    if dist == "one":
        return [int(rng.integers(n))] * T
    if dist == "distinct":  # every row its own segment, consecutive rows never share an adapter (n > 1)
        return [i % n for i in range(T)]
    if dist == "uniform":  # unsorted: adapters own many scattered segments
        return rng.integers(0, n, T).tolist()
    if dist == "zipf":  # skewed sizes, grouped by adapter
        w = 1.0 / np.arange(1, n + 1) ** 1.5
        ids = rng.choice(n, size=T, p=w / w.sum())
        return np.sort(ids).tolist()
    if dist == "zero_rows":  # adapter 0 (and with n > 2, the last one) has no rows
        if n == 1:
            return [-1] * T
        pool = list(range(1, n - 1 if n > 2 else n))
        return sorted(rng.choice(pool, size=T).tolist())
    if dist == "no_adapter_rows":  # about a third of the rows use no adapter, interleaved
        ids = rng.integers(-1, n, T)
        ids[rng.random(T) < 0.2] = -1
        return ids.tolist()
    raise ValueError(dist)


def make_specs(n: int, rng: np.random.Generator, max_rank: int, ranks=RANKS) -> dict[str, AdapterSpec]:
    specs = {}
    for i in range(n):
        r = min(ranks[i % len(ranks)], max_rank)
        p = (0.0, 0.1, 0.3)[i % 3]
        specs[f"ad{i}"] = AdapterSpec(r, float(rng.choice([1.0, 8.0, 16.0, 2.0 * r])), p, bool(i % 4 == 3))
    return specs


# a result that cancels below this share of its sum of absolute products is measured against that share instead
CANCEL_FLOOR = 1e-2


def rel(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||ref||, as the GUIDE measures. ``mag`` (see check_against_reference): the sum of absolute
    products each element comes from; where ||ref|| cancels below ``CANCEL_FLOOR * ||mag||`` (an adapter with one
    row under dropout: rounding of terms ~||mag|| against a result near 0), the error is measured against that
    floor instead, so a cancelling result is not held to an accuracy no floating-point sum has, while every other
    result is held to the GUIDE's relative tolerance."""
    out = out.double()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm().item()
    if mag is not None:
        denom = max(denom, CANCEL_FLOOR * mag.norm().item())
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def check_against_reference(backend: str, dtype, T: int, K: int, N: int, specs, ids, seed=1234, bias=True,
                            training=True, noncontig=False, three_d=False, b_scale=1.0, dy_scale=1.0):
    """Run ``backend`` and the float64 reference on the same random data; assert forward and grads agree.
    ``b_scale`` / ``dy_scale`` shrink every B and dY (tiny rank-r factors, as early in training)."""
    seg = AdapterSegments(ids, specs)
    g = torch.Generator().manual_seed(hash((T, K, N, len(specs))) % (1 << 31))
    x64 = torch.randn(T, K, generator=g, dtype=torch.float64).to(dtype).double()
    W = (torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5).to(dtype).double()
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).double() if bias else None
    # the adapters' values as the backend gets them (fp32 parameters)
    ad64 = {n: ((torch.randn(s.r, K, generator=g, dtype=torch.float64) / K ** 0.5).float().double(),
                (torch.randn(N, s.r, generator=g, dtype=torch.float64) * b_scale).float().double())
            for n, s in specs.items()}
    dy = (torch.randn(T, N, generator=g, dtype=torch.float64) * dy_scale).to(dtype).double()

    xr = x64.clone().requires_grad_()
    adr = {n: (A.clone().requires_grad_(), B.clone().requires_grad_()) for n, (A, B) in ad64.items()}
    yr = multi_lora_reference(xr, W, b, adr, seg, seed=seed, training=training)
    yr.backward(dy)
    # The same reference on |inputs| and |dY| gives every output's sum of absolute products: the scale a floating-
    # point result is accurate to. Errors are measured against the result itself (rel), but against a share of
    # that scale where the result cancels to ~0 (an adapter with one row under dropout: relative error 7e-4 in fp32
    # on one draw in 60).
    xa = x64.abs().requires_grad_()
    ada = {n: (A.abs().requires_grad_(), B.abs().requires_grad_()) for n, (A, B) in ad64.items()}
    ya = multi_lora_reference(xa, W.abs(), None if b is None else b.abs(), ada, seg, seed=seed, training=training)
    ya.backward(dy.abs())

    if noncontig:  # a column slice of a wider tensor
        xin = torch.cat([x64, x64[:, :3]], 1).to(dtype)[:, :K]
        assert not xin.is_contiguous()
        xin = xin.detach().requires_grad_()
        xk = xin
    else:
        xin = x64.to(dtype).requires_grad_()
        xk = xin
    if three_d:
        xk = xin.view(1, T, K)
    adk = {n: (A.float().requires_grad_(), B.float().requires_grad_()) for n, (A, B) in ad64.items()}
    y = multi_lora_linear(xk, W.to(dtype), None if b is None else b.to(dtype), adk, seg, training=training,
                          backend=backend, seed=seed)
    assert y.dtype == dtype and y.shape == (*xk.shape[:-1], N)
    y.reshape(T, N).backward(dy.to(dtype))
    tol = TOL[dtype]
    errs = {"y": rel(y.reshape(T, N), yr.detach(), ya.detach()), "dx": rel(xin.grad, xr.grad, xa.grad)}
    present = set(seg.present_names)
    for n in specs:
        if n in present:
            errs[f"dA[{n}]"] = rel(adk[n][0].grad, adr[n][0].grad, ada[n][0].grad)
            errs[f"dB[{n}]"] = rel(adk[n][1].grad, adr[n][1].grad, ada[n][1].grad)
        else:  # absent adapter: not in the graph at all
            assert adk[n][0].grad is None and adk[n][1].grad is None, f"absent adapter {n} got a gradient"
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"{backend} {dtype} T={T} errors over {tol}: {bad}"
    return errs
