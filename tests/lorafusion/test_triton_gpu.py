"""Compiled Triton kernels on a CUDA device against the float64 reference (bf16, fp16, fp32; odd and large shapes).

Run by ``benchmarks/gpu_check.sh`` (``pytest -m gpu``). ``python tests/lorafusion/test_triton_gpu.py`` also prints
a quick timing of the fused forward+backward against the frozen base linear (cuBLAS) at 8192 x 4096 -> 4096.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1: these tests check the compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

from lorafusion import reference as ref  # noqa: E402
from lorafusion.backends import triton_backend as tb  # noqa: E402

if tb._INTERPRET or tb.unavailable_reason() is not None:
    pytest.skip(f"triton backend not compiled here: {tb.unavailable_reason() or 'interpreter mode'}",
                allow_module_level=True)

from triton_helpers import (SEED, check_forward_backward, check_tiny_rank_factors, make_case,  # noqa: E402,F401
                            nan_filled_outputs, rel_err)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEV = "cuda"


def check_case(M, K, N, r, dtype, p, has_bias, noncontig, fp32_adapters, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    check_forward_backward(tb, M, K, N, r, dtype, p, has_bias, noncontig, fp32_adapters, gen, TOL[dtype])


CASES = [
    (1, 33, 17, 1, True, False, False),
    (7, 100, 300, 8, False, True, True),
    (133, 33, 17, 64, True, True, False),
    (133, 100, 300, 16, True, False, True),
    (133, 1000, 3000, 256, True, False, False),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# every case in bf16 at both p; fp16 / fp32 at p > 0 only (p = 0 differs by one constexpr), to keep the
# compile time of the GPU check down
DTYPE_P = [(torch.bfloat16, 0.0), (torch.bfloat16, 0.1), (torch.float16, 0.1), (torch.float32, 0.1)]


@pytest.mark.parametrize("dtype,p", DTYPE_P, ids=["bf16-p0", "bf16-p0.1", "fp16-p0.1", "fp32-p0.1"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}_{c[1]}to{c[2]}_r{c[3]}")
def test_forward_backward_match_reference(case, dtype, p):
    M, K, N, r, has_bias, noncontig, fp32_adapters = case
    check_case(M, K, N, r, dtype, p, has_bias, noncontig, fp32_adapters)


@pytest.mark.parametrize("dtype,p", [(torch.bfloat16, 0.1), (torch.float16, 0.1), (torch.float32, 0.0)],
                         ids=["bf16-p0.1", "fp16-p0.1", "fp32-p0"])
@pytest.mark.parametrize("case", CASES[1:], ids=lambda c: f"M{c[0]}_{c[1]}to{c[2]}_r{c[3]}")
def test_blas_gemm_placement_matches_reference(case, dtype, p):
    """LORAFUSION_TRITON_GEMM=blas: the compiled K = 0 GEMM kernels store the term, cuBLAS adds the product."""
    from lorafusion.backends import triton_blas_backend as tbb

    M, K, N, r, has_bias, noncontig, fp32_adapters = case
    gen = torch.Generator(device=DEV).manual_seed(5)
    check_forward_backward(tbb, M, K, N, r, dtype, p, has_bias, noncontig, fp32_adapters, gen, TOL[dtype])


@pytest.mark.parametrize("dtype,p", [(torch.bfloat16, 0.0), (torch.bfloat16, 0.1), (torch.float16, 0.1)],
                         ids=["bf16-p0", "bf16-p0.1", "fp16-p0.1"])
def test_large_shape(dtype, p):
    check_case(8192, 4096, 4096, 16, dtype, p, True, False, False, seed=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_each_op_matches_reference(dtype):
    """The five public ops on their own (lora_expand_backward regenerating its mask); r = 200 loops over rank
    chunks."""
    M, K, N, r, p = 133, 100, 300, 200, 0.1
    gen = torch.Generator(device=DEV).manual_seed(1234)
    x, dy, W, bias, A, B = make_case(M, K, N, r, dtype, dtype, False, gen)
    d = lambda t: t.double()  # noqa: E731
    scale = 1.0 / r ** 0.5
    tol = TOL[dtype]
    S_ref = ref.lora_shrink(d(x), d(A), SEED, p)
    dS_ref, dB_ref = ref.lora_dy_shrink(d(dy), d(B), S_ref, scale)
    assert rel_err(tb.lora_shrink(x, A, SEED, p), S_ref) < tol
    Y = tb.lora_expand_forward(x, W, bias, S_ref.float(), B, scale)
    assert rel_err(Y, ref.lora_expand_forward(d(x), d(W), d(bias), S_ref, d(B), scale)) < tol
    dS, dB = tb.lora_dy_shrink(dy, B, S_ref.float(), scale)
    assert rel_err(dS, dS_ref) < tol and rel_err(dB, dB_ref) < tol
    dA = tb.lora_dropout_grad_A(x, dS_ref.float(), SEED, p, torch.float32)
    assert rel_err(dA, ref.lora_dropout_grad_A(d(x), dS_ref, SEED, p, torch.float64)) < tol
    dX = tb.lora_expand_backward(dy, W, dS_ref.float(), A, SEED, p)
    assert rel_err(dX, ref.lora_expand_backward(d(dy), d(W), dS_ref, d(A), SEED, p)) < tol


@pytest.mark.parametrize("b_scale", [1e-6, 1e-3])
def test_fp16_keeps_the_bits_of_tiny_rank_factors(b_scale):
    check_tiny_rank_factors(tb, b_scale, 0.1, torch.Generator(device=DEV).manual_seed(5), TOL[torch.float16])


@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFF, 0xFEDC_BA98_7654_3210])
def test_philox_bits_match_reference(seed):
    got = tb.philox_uint32(seed, 300, 1000, DEV)
    assert torch.equal(got, ref.philox_uint32(seed, 300, 1000, DEV))


@pytest.mark.parametrize("BK", [32, 64, 128, 256])
def test_keep_tile_matches_reference(BK):
    """The compiled ``philox_keep_tile`` (one Philox block per four columns for BK >= 64, joined and permuted into
    column order; per element at 32) gives the reference's mask bit for bit, ragged edges included."""
    seed = 0xFEDC_BA98_7654_3210
    for M, K, p in ((1, 1, 0.1), (300, 1000, 0.3), (4099, 4160, 0.1)):
        got = tb._dropout_bits(M, K, seed, p, DEV, BK=BK)
        assert torch.equal(got.bool(), ref.dropout_keep_mask(seed, M, K, p, DEV)), (M, K, p)


def test_backend_attributes():
    assert tb.DEVICE_TYPES == ("cuda",)
    assert tb.unavailable_reason() is None


def _bench(M=8192, K=4096, N=4096, r=16, dtype=torch.bfloat16):
    """Fused forward+backward time over the frozen base linear's (forward + dX), ms and ratio."""
    import triton

    x = torch.randn(M, K, device=DEV, dtype=dtype)
    dy = torch.randn(M, N, device=DEV, dtype=dtype)
    W = torch.randn(N, K, device=DEV, dtype=dtype) * K ** -0.5
    bias = torch.randn(N, device=DEV, dtype=dtype)
    A = torch.randn(r, K, device=DEV, dtype=dtype) * K ** -0.5
    B = torch.randn(N, r, device=DEV, dtype=dtype)

    def base():
        torch.nn.functional.linear(x, W, bias)
        dy @ W

    def fused(p):
        Y, S = tb.forward(x, W, bias, A, B, 2.0, 1234, p)
        tb.backward(dy, x, W, A, B, S, 2.0, 1234, p, True)

    t_base = triton.testing.do_bench(base, rep=200)
    rows = [("base", t_base, 1.0)]
    for p in (0.0, 0.1):
        fused(p)  # autotune outside the timing
        t = triton.testing.do_bench(lambda: fused(p), rep=200)
        rows.append((f"fused p={p}", t, t / t_base))
    x_S = tb.lora_shrink(x, A, 1, 0.1)
    parts = {
        "shrink p=0": lambda: tb.lora_shrink(x, A, 1, 0.0),
        "shrink p=.1": lambda: tb.lora_shrink(x, A, 1, 0.1),
        "expand_fwd": lambda: tb.lora_expand_forward(x, W, bias, x_S, B, 2.0),
        "base fwd": lambda: torch.nn.functional.linear(x, W, bias),
        "dy_shrink": lambda: tb.lora_dy_shrink(dy, B, x_S, 2.0),
        "grad_A p=0": lambda: tb.lora_dropout_grad_A(x, x_S, 1, 0.0, torch.float32),
        "grad_A p=.1": lambda: tb.lora_dropout_grad_A(x, x_S, 1, 0.1, torch.float32),
        "expand_bwd p=0": lambda: tb.lora_expand_backward(dy, W, x_S, A, 1, 0.0),
        "expand_bwd p=.1": lambda: tb.lora_expand_backward(dy, W, x_S, A, 1, 0.1),
        "base dX": lambda: dy @ W,
    }
    for name, fn in parts.items():
        fn()
        rows.append((name, triton.testing.do_bench(fn, rep=100), float("nan")))
    print(f"{torch.cuda.get_device_name()}  M={M} {K}->{N} r={r} {dtype}")
    for name, t, ratio in rows:
        print(f"  {name:18s} {t * 1e3:9.1f} us  {ratio:6.3f}x")


if __name__ == "__main__":
    _bench()
