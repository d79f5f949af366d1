"""The CUDA kernels of torch.ops.lorafusion (csrc/lora_cuda.cu) against the float64 reference on the CPU: every op
and both composites, fp32 / fp16 / bf16 (fp32 adapters over a bf16 base too), odd sizes, non-contiguous input,
ranks 1-64, p = 0 and p > 0, the dropout mask bit for bit. Run by benchmarks/gpu_check.sh."""
from __future__ import annotations

import pytest
import torch

from lorafusion import _ext
from lorafusion import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _ext.HAS_CUDA_KERNELS, reason=f"extension without CUDA kernels ({_ext.EXTENSION_ERROR})"),
]

ops = torch.ops.lorafusion
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(out, want, dtype, what, yardstick=None):
    """Relative to ||want||, or to ||yardstick|| = || |P| |Q| || for a product P Q that may cancel (a rank-1 S)."""
    out = out.double().cpu()
    assert not torch.isnan(out).any(), f"{what}: NaN"
    err = (out - want).norm().item() / max((want if yardstick is None else yardstick).norm().item(), 1e-30)
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:g} ({dtype})"


def make(tokens, fin, fout, r, dtype, adt=None, strided=False):
    adt = adt or dtype
    if strided:
        x = torch.randn(tokens, 2 * fin, device="cuda").to(dtype)[:, ::2]
    else:
        x = torch.randn(tokens, fin, device="cuda").to(dtype)
    W = (torch.randn(fout, fin, device="cuda") / fin**0.5).to(dtype)
    b = torch.randn(fout, device="cuda").to(dtype)
    A = (torch.randn(r, fin, device="cuda") / fin**0.5).to(adt)
    B = torch.randn(fout, r, device="cuda").to(adt)
    dy = torch.randn(tokens, fout, device="cuda").to(dtype)
    return x, W, b, A, B, dy


def abs_product(p, q):
    return p.double().abs().cpu() @ q.double().abs().cpu()


def d64(t):
    return None if t is None else t.detach().double().cpu()


@pytest.mark.parametrize("rows,cols,seed,p", [(1, 1, 0, 0.1), (133, 100, 2**40 + 7, 0.5), (1000, 515, -5, 0.1)])
def test_keep_mask_bit_exact(rows, cols, seed, p):
    got = ops.dropout_keep_mask(torch.empty(rows, cols, device="cuda"), seed, p).cpu()
    assert torch.equal(got, ref.dropout_keep_mask(seed & (2**64 - 1), rows, cols, p))


CASES = [
    # tokens, in, out, r, dtype, adapter dtype, p, bias, strided
    (1, 100, 300, 1, torch.float32, None, 0.1, True, False),
    (7, 64, 48, 8, torch.float32, None, 0.0, False, True),
    (133, 100, 300, 16, torch.float32, None, 0.1, True, True),
    (1030, 257, 130, 64, torch.float32, None, 0.1, False, False),
    (133, 100, 300, 16, torch.float16, None, 0.1, True, False),
    (133, 100, 300, 16, torch.bfloat16, None, 0.1, True, True),
    (2051, 515, 263, 16, torch.bfloat16, torch.float32, 0.1, False, False),
    (7, 64, 48, 8, torch.bfloat16, None, 0.0, True, False),
]


@pytest.mark.parametrize("tokens,fin,fout,r,dtype,adt,p,bias,strided", CASES)
def test_cuda_ops_and_composites(tokens, fin, fout, r, dtype, adt, p, bias, strided):
    x, W, b, A, B, dy = make(tokens, fin, fout, r, dtype, adt, strided)
    b = b if bias else None
    seed, scale = torch.randint(0, 2**62, ()).item(), 2.0
    xd, Wd, bd, Ad, Bd, dyd = map(d64, (x, W, b, A, B, dy))

    S = ops.lora_shrink(x, A, seed, p)
    S_ref = ref.lora_shrink(xd, Ad, seed, p)
    assert S.dtype == torch.float32
    xh = ref.apply_dropout(xd, seed, p)
    assert_close(S, S_ref, torch.float32, "S", abs_product(xh, Ad.t()))
    dS, dB = ops.lora_dy_shrink(dy, B, S, scale)
    dS_ref, dB_ref = ref.lora_dy_shrink(dyd, Bd, d64(S), scale)
    assert_close(dS, dS_ref, torch.float32, "dS", scale * abs_product(dyd, Bd))
    assert_close(dB, dB_ref, torch.float32, "dB", scale * abs_product(dyd.t(), S))
    dA = ops.lora_dropout_grad_A(x, dS, seed, p)
    assert_close(dA, ref.lora_dropout_grad_A(xd, d64(dS), seed, p, torch.float64), torch.float32, "dA",
                 abs_product(dS.t(), xh))
    buf = torch.full((tokens, fin + 2), float("nan"), device="cuda", dtype=dtype)
    dx = buf[:, 1:fin + 1]
    dx0 = torch.randn(tokens, fin, device="cuda").to(dtype)
    dx.copy_(dx0)
    ops.lora_dropout_expand_add_(dx, dS, A, seed, p)
    assert_close(dx, d64(dx0) + ref.apply_dropout(d64(dS) @ Ad, seed, p), dtype, "dx")
    assert torch.isnan(buf[:, 0]).all() and torch.isnan(buf[:, fin + 1]).all()

    # Composites against the reference layer with autograd.
    xr, Ar, Br = (t.clone().requires_grad_() for t in (xd, Ad, Bd))
    y_ref = ref.lora_linear_reference(xr, Wd, bd, Ar, Br, scale, p, seed)
    y_ref.backward(dyd)
    Y, S2 = ops.lora_linear_forward(x, W, b, A, B, scale, seed, p)
    assert Y.dtype == dtype
    assert_close(Y, y_ref.detach(), dtype, "Y")
    assert torch.equal(S2, S)  # S is not split over blocks: deterministic
    dX, dA2, dB2 = ops.lora_linear_backward(dy, x, W, A, B, S2, scale, seed, p, True)
    assert_close(dX, xr.grad, dtype, "dX")
    assert_close(dA2, ref.lora_dropout_grad_A(xd, d64(dS), seed, p, torch.float64), torch.float32, "dA (composite)",
                 abs_product(dS.t(), xh))
    assert_close(dB2, dB_ref, torch.float32, "dB (composite)", scale * abs_product(dyd.t(), S))
    none, _, _ = ops.lora_linear_backward(dy, x, W, A, B, S2, scale, seed, p, False)
    assert none is None


def test_cuda_backend_is_available():
    from lorafusion.backends import available_backends

    assert available_backends()["cuda"] == "available"


if __name__ == "__main__":  # quick timing of the CUDA ops (bf16, r=16, p=0.1); the real benchmark is benchmarks/
    from triton.testing import do_bench

    for T, fin, fout in [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)]:
        x, W, _, A, B, dy = make(T, fin, fout, 16, torch.bfloat16, torch.float32)
        A, B, W = A * 0.02, B * 0.02, W * 0.02
        xg = x.clone().requires_grad_()

        def base():
            torch.nn.functional.linear(xg, W).backward(dy)

        def fused():
            y, S = ops.lora_linear_forward(x, W, None, A, B, 2.0, 1, 0.1)
            ops.lora_linear_backward(dy, x, W, A, B, S, 2.0, 1, 0.1, True)

        S = ops.lora_shrink(x, A, 1, 0.1)
        tb, tf = do_bench(base), do_bench(fused)
        parts = {
            "shrink": do_bench(lambda: ops.lora_shrink(x, A, 1, 0.1)),
            "dy_shrink": do_bench(lambda: ops.lora_dy_shrink(dy, B, S, 2.0)),
            "grad_A": do_bench(lambda: ops.lora_dropout_grad_A(x, S, 1, 0.1)),
            "expand_add_": do_bench(lambda: ops.lora_dropout_expand_add_(x, S, A, 1, 0.1)),
        }
        print(f"{T}x{fin}->{fout} bf16: base {tb:.3f} ms, fused {tf:.3f} ms, ratio {tf / tb:.3f}; "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in parts.items()), flush=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_zero_width_input_gives_zero_rank_terms_not_uninitialised_memory(dtype, p):
    """An empty sum (in_features = 0, or dy of 0 columns) left S / dS as at::empty gave them (the GEMM launcher
    returned before the kernel); they must be zeros, and Y the bias alone, as on the CPU."""
    x = torch.randn(9, 0, device="cuda").to(dtype)
    A = torch.randn(4, 0, device="cuda")
    torch.cuda.empty_cache()
    junk = torch.full((4096,), float("nan"), device="cuda")  # leave NaNs where the next allocations may land
    del junk
    S = ops.lora_shrink(x, A, 3, p)
    assert S.shape == (9, 4) and torch.equal(S, torch.zeros_like(S))
    W, b, B = torch.randn(5, 0, device="cuda").to(dtype), torch.randn(5, device="cuda").to(dtype), torch.randn(5, 4)
    Y, S2 = ops.lora_linear_forward(x, W, b, A, B.cuda(), 2.0, 3, p)
    assert torch.equal(S2, torch.zeros_like(S2)) and torch.equal(Y, b.expand(9, 5))
    dy = torch.randn(9, 0, device="cuda").to(dtype)
    dS, dB = ops.lora_dy_shrink(dy, torch.randn(0, 4, device="cuda"), torch.randn(9, 4, device="cuda"), 2.0)
    assert torch.equal(dS, torch.zeros_like(dS)) and dB.shape == (0, 4)


def test_operands_on_another_device_or_not_chaining_are_refused_by_the_op():
    """The CUDA ops check what the CPU ops check: B's rank against A's (a narrower B was read past its end), the
    bias, and every operand on the first one's device."""
    x, W, b, A, B, dy = make(7, 16, 12, 4, torch.float32)
    with pytest.raises(RuntimeError, match="do not chain"):
        ops.lora_linear_forward(x, W, b, A, B[:, :3].contiguous(), 2.0, 1, 0.0)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.lora_linear_forward(x, W, b[:5], A, B, 2.0, 1, 0.0)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="is on cuda:1 but the op runs on cuda:0"):
            ops.lora_shrink(x, A.to("cuda:1"), 1, 0.0)
