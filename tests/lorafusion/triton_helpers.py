"""Shared by the Triton backend tests: interpreted on CPU (test_triton_ops.py) and compiled on a GPU
(test_triton_gpu.py). Imports neither triton nor the backend, so each test module decides how triton is loaded."""
import pytest
import torch

from lorafusion import reference as ref

SEED = 0x9ABCDEF012345  # above 2**32, so both key words are non-trivial


def rel_err(out, want):
    out = out.double()
    want = want.double()
    assert out.shape == want.shape, (out.shape, want.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Every buffer the backend allocates with torch.empty starts as NaN, so an unwritten element fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    yield


def make_case(M, K, N, r, dtype, adapter_dtype, noncontig, gen):
    """x, dy, W, bias, A, B on gen's device; noncontig: column-major x and dy with strided columns."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=gen.device) * scale

    if noncontig:
        x = rnd(K, M).to(dtype).t()  # column-major view: stride (1, M)
        dy = rnd(M, 2 * N).to(dtype)[:, ::2]  # strided columns
    else:
        x = rnd(M, K).to(dtype)
        dy = rnd(M, N).to(dtype)
    W = rnd(N, K, scale=K ** -0.5).to(dtype)
    bias = rnd(N).to(dtype)
    A = rnd(r, K, scale=K ** -0.5).to(adapter_dtype)
    B = rnd(N, r, scale=0.5).to(adapter_dtype)
    return x, dy, W, bias, A, B


def check_forward_backward(tb, M, K, N, r, dtype, p, has_bias, noncontig, fp32_adapters, gen, tol):
    """The backend's forward and backward (S, Y, dA, dB, dX) against the float64 reference, each within relative
    error tol; returns (the operands, S, scale, dA_ref, dB_ref) for further checks."""
    adapter_dtype = torch.float32 if fp32_adapters else dtype
    x, dy, W, bias, A, B = make_case(M, K, N, r, dtype, adapter_dtype, noncontig, gen)
    bias = bias if has_bias else None
    scale = 2.0 / r

    Y, S = tb.forward(x, W, bias, A, B, scale, SEED, p)
    dX, dA, dB = tb.backward(dy, x, W, A, B, S, scale, SEED, p, need_dx=True)

    d = lambda t: None if t is None else t.double()  # noqa: E731
    S_ref = ref.lora_shrink(d(x), d(A), SEED, p)
    Y_ref = ref.lora_expand_forward(d(x), d(W), d(bias), S_ref, d(B), scale)
    dS_ref, dB_ref = ref.lora_dy_shrink(d(dy), d(B), S_ref, scale)
    dA_ref = ref.lora_dropout_grad_A(d(x), dS_ref, SEED, p, torch.float64)
    dX_ref = ref.lora_expand_backward(d(dy), d(W), dS_ref, d(A), SEED, p)

    assert S.dtype == torch.float32 and Y.dtype == dtype and dX.dtype == dtype
    assert dA.dtype == torch.float32 and dB.dtype == torch.float32
    for name, out, want in (("S", S, S_ref), ("Y", Y, Y_ref), ("dA", dA, dA_ref), ("dB", dB, dB_ref),
                            ("dX", dX, dX_ref)):
        err = rel_err(out, want)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"
    return (x, dy, W, A, B), S, scale, dA_ref, dB_ref


def check_tiny_rank_factors(tb, b_scale, p, gen, tol):
    """fp16 input, fp32 adapters with B at ``b_scale`` (1e-6: just after the first steps) and dY at 1e-3 (no loss
    scaling): dS falls to ~1e-8, under fp16's smallest normal (6.1e-5) and near its smallest subnormal, and B itself
    is subnormal in fp16. dS, dB, dA and dX must still match the float64 reference within ``tol``."""
    M, K, N, r = 133, 100, 300, 16
    x, dy, W, bias, A, B = make_case(M, K, N, r, torch.float16, torch.float32, False, gen)
    B = B * b_scale
    dy = (dy.float() * 1e-3).half()
    scale = 2.0 / r
    d = lambda t: t.double()  # noqa: E731
    S_ref = ref.lora_shrink(d(x), d(A), SEED, p)
    dS_ref, dB_ref = ref.lora_dy_shrink(d(dy), d(B), S_ref, scale)
    dA_ref = ref.lora_dropout_grad_A(d(x), dS_ref, SEED, p, torch.float64)
    dS, dB = tb.lora_dy_shrink(dy, B, S_ref.float(), scale)
    assert rel_err(dS, dS_ref) < tol and rel_err(dB, dB_ref) < tol
    assert rel_err(tb.lora_dropout_grad_A(x, dS_ref.float(), SEED, p, torch.float32), dA_ref) < tol
    S = tb.lora_shrink(x, A, SEED, p)
    dX, dA, dB2 = tb.backward(dy, x, W, A, B, S, scale, SEED, p, need_dx=True)
    assert rel_err(dA, dA_ref) < tol and rel_err(dB2, dB_ref) < tol
    assert rel_err(dX, ref.lora_expand_backward(d(dy), d(W), dS_ref, d(A), SEED, p)) < tol
