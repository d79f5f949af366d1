"""The C++ CPU ops (torch.ops.lorafusion) against the float64 reference (lorafusion/reference.py): every op and both
composites, fp32 / fp16 / bf16 (fp32 adapters over a bf16 / fp16 base too), odd sizes, 3-D and non-contiguous
input, ranks 1-64, p = 0 and p > 0, bias and no bias; the dropout mask bit for bit; fake kernels under
torch.compile."""
from __future__ import annotations

import sys

import pytest
import torch

from lorafusion import _ext
from lorafusion import reference as ref
from lorafusion.reference import op_seed

pytestmark = pytest.mark.skipif(not _ext.EXTENSION_AVAILABLE, reason=f"extension not built: {_ext.EXTENSION_ERROR}")

ops = torch.ops.lorafusion if _ext.EXTENSION_AVAILABLE else None
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
SHAPES = [(1, 100, 300), (7, 64, 48), (133, 100, 300), (257, 37, 61), (1100, 129, 70)]  # (tokens, in, out)


def rel_err(out: torch.Tensor, want: torch.Tensor, yardstick: torch.Tensor | None = None) -> float:
    """||out - want|| / ||want|| (or / ||yardstick||: for a product P Q, |P| |Q| is the scale its rounding error
    follows; ||P Q|| itself can be arbitrarily small by cancellation, e.g. a rank-1 S of one token)."""
    out = out.double()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = (want if yardstick is None else yardstick).norm().item()
    return (out - want).norm().item() / (denom if denom > 0 else 1.0)


def abs_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p.double().abs() @ q.double().abs()


def assert_close(out, want, dtype, what="", yardstick=None):
    err = rel_err(out, want, yardstick)
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:g} ({dtype})"


def make(tokens, fin, fout, r, dtype, adapter_dtype=None, seed=None, layout="contiguous"):
    """Fresh random operands (values exactly representable in dtype) and their float64 twins."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    adapter_dtype = adapter_dtype or dtype
    if layout == "contiguous":
        x = torch.randn(tokens, fin, generator=g).to(dtype)
    elif layout == "strided":  # a 3-D batch x seq input with every other feature, flattened: a strided 2-D view
        x = torch.randn(tokens, 1, 2 * fin, generator=g).to(dtype)[..., ::2].reshape(tokens, fin)
        assert not x.is_contiguous()
    else:  # column-major
        x = torch.randn(fin, tokens, generator=g).to(dtype).t()
    W = (torch.randn(fout, fin, generator=g) / fin**0.5).to(dtype)
    b = torch.randn(fout, generator=g).to(dtype)
    A = (torch.randn(r, fin, generator=g) / fin**0.5).to(adapter_dtype)
    B = torch.randn(fout, r, generator=g).to(adapter_dtype)
    dy = torch.randn(tokens, fout, generator=g).to(dtype)
    return x, W, b, A, B, dy


# ------------------------------------------------------------------------------------------------------------------
# The dropout mask
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 15), (133, 100), (64, 1031)])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, 2**64 - 3])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.97])
def test_keep_mask_bit_exact(rows, cols, seed, p):
    got = ops.dropout_keep_mask(torch.empty(rows, cols), op_seed(seed), p)
    assert torch.equal(got, ref.dropout_keep_mask(seed, rows, cols, p))


def test_keep_mask_threshold_is_exact_on_the_draw():
    # p chosen so the threshold equals an element's draw: kept (>=); one more unit of threshold: dropped.
    seed, rows, cols = 987654321, 9, 40
    draws = ref.philox_uint32(seed, rows, cols)
    for i, j in [(0, 0), (3, 17), (8, 39)]:
        d = int(draws[i, j])
        kept = ops.dropout_keep_mask(torch.empty(rows, cols), seed, d / 2**32)
        dropped = ops.dropout_keep_mask(torch.empty(rows, cols), seed, (d + 1) / 2**32)
        assert bool(kept[i, j]) and not bool(dropped[i, j])


def test_keep_rate_and_seed_dependence():
    p, n = 0.1, 400 * 500
    m1 = ops.dropout_keep_mask(torch.empty(400, 500), 11, p)
    rate = m1.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma
    assert torch.equal(m1, ops.dropout_keep_mask(torch.empty(400, 500), 11, p))
    assert not torch.equal(m1, ops.dropout_keep_mask(torch.empty(400, 500), 12, p))
    assert ops.dropout_keep_mask(torch.empty(4, 5), 11, 0.0).all()


def test_forward_and_backward_use_the_same_mask():
    # With A = identity rows, S exposes D(X) exactly; dA with dS = one-hot exposes the mask backward regenerates.
    tokens, fin, p, seed = 33, 8, 0.5, 4242
    x = torch.rand(tokens, fin) + 0.5  # no zeros, so S == 0 means dropped
    S = ops.lora_shrink(x, torch.eye(fin), seed, p)
    keep = ref.dropout_keep_mask(seed, tokens, fin, p)
    assert torch.equal(S != 0, keep)
    dS = torch.zeros(tokens, fin)
    dS[:, 0] = 1.0
    dA = ops.lora_dropout_grad_A(torch.ones(tokens, fin), dS, seed, p)  # dA[0, j] = sum_i D(1)[i, j]
    assert torch.allclose(dA[0], keep.double().sum(0).float() / (1 - p))
    dx = torch.zeros(tokens, fin)
    ops.lora_dropout_expand_add_(dx, torch.ones(tokens, 1), torch.ones(1, fin), seed, p)
    assert torch.equal(dx != 0, keep)


# ------------------------------------------------------------------------------------------------------------------
# The memory-bound ops
# ------------------------------------------------------------------------------------------------------------------

OP_CASES = [
    # tokens, in, out, r, dtype, adapter dtype, p, layout
    (1, 100, 300, 1, torch.float32, None, 0.1, "contiguous"),
    (7, 64, 48, 8, torch.float32, None, 0.0, "contiguous"),
    (133, 100, 300, 16, torch.float32, None, 0.1, "strided"),
    (257, 37, 61, 64, torch.float32, None, 0.1, "column-major"),
    (1100, 129, 70, 16, torch.float32, None, 0.1, "contiguous"),
    (133, 100, 300, 8, torch.float16, None, 0.1, "contiguous"),
    (133, 100, 300, 16, torch.bfloat16, None, 0.1, "strided"),
    (133, 100, 300, 16, torch.bfloat16, torch.float32, 0.1, "contiguous"),
    (133, 100, 300, 16, torch.float16, torch.float32, 0.0, "contiguous"),
    (57, 33, 21, 4, torch.float64, None, 0.3, "contiguous"),
]


@pytest.mark.parametrize("tokens,fin,fout,r,dtype,adt,p,layout", OP_CASES)
def test_memory_bound_ops(tokens, fin, fout, r, dtype, adt, p, layout):
    x, W, b, A, B, dy = make(tokens, fin, fout, r, dtype, adt, layout=layout)
    seed, scale = torch.randint(0, 2**62, ()).item(), 0.7
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xd, Ad, Bd, dyd = x.double(), A.double(), B.double(), dy.double()

    S = ops.lora_shrink(x, A, seed, p)
    assert S.dtype == acc and S.shape == (tokens, r)
    S_ref = ref.lora_shrink(xd, Ad, seed, p)
    xh = ref.apply_dropout(xd, seed, p)
    assert_close(S, S_ref, dtype if dtype == torch.float64 else torch.float32, "S", abs_product(xh, Ad.t()))

    dS, dB = ops.lora_dy_shrink(dy, B, S, scale)
    assert dS.dtype == acc and dB.dtype == acc and dB.shape == (fout, r)
    dS_ref, dB_ref = ref.lora_dy_shrink(dyd, Bd, S.double(), scale)
    tol_dtype = dtype if dtype == torch.float64 else torch.float32  # inputs are exact; accumulation is fp32
    assert_close(dS, dS_ref, tol_dtype, "dS", scale * abs_product(dyd, Bd))
    assert_close(dB, dB_ref, tol_dtype, "dB", scale * abs_product(dyd.t(), S))

    dA = ops.lora_dropout_grad_A(x, dS, seed, p)
    assert dA.dtype == acc and dA.shape == (r, fin)
    assert_close(dA, ref.lora_dropout_grad_A(xd, dS.double(), seed, p, torch.float64), tol_dtype, "dA",
                 abs_product(dS.t(), xh))

    # In place into a view of a NaN-filled buffer: the view gets dx0 + D'(dS A), everything around it stays NaN.
    buf = torch.full((tokens, fin + 3), float("nan"), dtype=dtype)
    dx = buf[:, 1:fin + 1]
    dx0 = torch.randn(tokens, fin).to(dtype)
    dx.copy_(dx0)
    ops.lora_dropout_expand_add_(dx, dS, A, seed, p)
    want = dx0.double() + ref.apply_dropout(dS.double() @ Ad, seed, p)
    assert_close(dx, want, dtype, "dx")
    assert torch.isnan(buf[:, 0]).all() and torch.isnan(buf[:, fin + 1:]).all()


def test_ops_reject_bad_input():
    x = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="A must be"):
        ops.lora_shrink(x, torch.randn(2, 9), 0, 0.1)
    with pytest.raises(RuntimeError, match="dropout p"):
        ops.lora_shrink(x, torch.randn(2, 8), 0, 1.0)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.lora_shrink(x[None], torch.randn(2, 8), 0, 0.1)


# ------------------------------------------------------------------------------------------------------------------
# The composite ops (what the cpu backend runs)
# ------------------------------------------------------------------------------------------------------------------

def reference_layer(x, W, b, A, B, dy, scale, seed, p):
    """Y, S, dX, dA, dB in float64 from the reference with autograd."""
    xd = x.detach().double().clone().requires_grad_()
    Ad = A.detach().double().clone().requires_grad_()
    Bd = B.detach().double().clone().requires_grad_()
    y = ref.lora_linear_reference(xd, W.double(), None if b is None else b.double(), Ad, Bd, scale, p, seed)
    y.backward(dy.double())
    return y.detach(), ref.lora_shrink(x.double(), A.double(), seed, p), xd.grad, Ad.grad, Bd.grad


COMPOSITE_CASES = [
    (1, 100, 300, 1, torch.float32, None, 0.1, True, "contiguous"),
    (7, 64, 48, 8, torch.float32, None, 0.0, False, "contiguous"),
    (133, 100, 300, 16, torch.float32, None, 0.1, True, "strided"),
    (133, 100, 300, 64, torch.float32, None, 0.0, True, "column-major"),
    (1100, 129, 70, 16, torch.float32, None, 0.1, False, "contiguous"),
    (1100, 129, 70, 8, torch.float16, None, 0.1, True, "contiguous"),
    (133, 100, 300, 16, torch.float16, torch.float32, 0.0, False, "strided"),
    (133, 100, 300, 16, torch.bfloat16, None, 0.1, True, "contiguous"),
    (257, 37, 61, 16, torch.bfloat16, torch.float32, 0.1, False, "column-major"),
    (57, 33, 21, 4, torch.float64, None, 0.3, True, "contiguous"),
]


@pytest.mark.parametrize("tokens,fin,fout,r,dtype,adt,p,bias,layout", COMPOSITE_CASES)
def test_composite_forward_backward(tokens, fin, fout, r, dtype, adt, p, bias, layout):
    x, W, b, A, B, dy = make(tokens, fin, fout, r, dtype, adt, layout=layout)
    b = b if bias else None
    seed, scale = torch.randint(0, 2**62, ()).item(), 2.0
    Y_ref, S_ref, dX_ref, dA_ref, dB_ref = reference_layer(x, W, b, A, B, dy, scale, seed, p)

    Y, S = ops.lora_linear_forward(x, W, b, A, B, scale, seed, p)
    assert Y.dtype == dtype and Y.shape == (tokens, fout)
    acc_tol = dtype if dtype == torch.float64 else torch.float32
    assert_close(Y, Y_ref, dtype, "Y")
    xh = ref.apply_dropout(x.double(), seed, p)
    assert_close(S, S_ref, acc_tol, "S", abs_product(xh, A.double().t()))

    dX, dA, dB = ops.lora_linear_backward(dy, x, W, A, B, S, scale, seed, p, True)
    assert dX.dtype == dtype and dX.shape == x.shape
    assert_close(dX, dX_ref, dtype, "dX")
    # dA and dB are checked from the S / dS the kernels computed: a rank-1 S or dS is one dot product per row, whose
    # fp32 rounding can be amplified without bound by cancellation, so the float64 chain is not a fair yardstick.
    dS_ref, dB_chain = ref.lora_dy_shrink(dy.double(), B.double(), S.double(), scale)
    assert_close(dB, dB_chain, acc_tol, "dB", scale * abs_product(dy.double().t(), S))
    dS_ops, _ = ops.lora_dy_shrink(dy, B, S, scale)
    assert_close(dS_ops, dS_ref, acc_tol, "dS", scale * abs_product(dy, B))
    assert_close(dA, ref.lora_dropout_grad_A(x.double(), dS_ops.double(), seed, p, torch.float64), acc_tol, "dA",
                 abs_product(dS_ops.t(), xh))
    # and the chain agrees with autograd
    assert rel_err(dA, dA_ref, abs_product(dS_ops.t(), xh)) < 1e-2
    assert rel_err(dB, dB_ref, scale * abs_product(dy.double().t(), S)) < 1e-2

    none, dA2, dB2 = ops.lora_linear_backward(dy, x, W, A, B, S, scale, seed, p, False)
    assert none is None
    assert torch.equal(dA2, dA) and torch.equal(dB2, dB)


def test_composite_same_seed_same_result():
    x, W, b, A, B, dy = make(300, 40, 50, 8, torch.float32)
    y1, s1 = ops.lora_linear_forward(x, W, b, A, B, 1.0, 5, 0.2)
    y2, s2 = ops.lora_linear_forward(x, W, b, A, B, 1.0, 5, 0.2)
    y3, _ = ops.lora_linear_forward(x, W, b, A, B, 1.0, 6, 0.2)
    assert torch.equal(y1, y2) and torch.equal(s1, s2) and not torch.equal(y1, y3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="-fopenmp is added on Linux builds only")
def test_extension_loops_run_on_every_thread():
    """The row-block loops get every intra-op thread: a build without -fopenmp compiles at::parallel_for's
    `omp parallel` out and silently runs them on one core."""
    import lorafusion._C as C

    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one intra-op thread here")
    assert C.parallel_threads() == min(torch.get_num_threads(), 64)


def test_composite_ops_threaded_with_grad_inputs_and_reproducible():
    """Workers see the caller's thread-local state: called as autograd.Function.forward calls them (grad mode off,
    adapters that require grad), the ops' GEMMs in OpenMP threads, where grad mode is on by default, must not reach
    autograd. dA / dB are bit-for-bit the same from call to call (fixed block-to-partial assignment), and within
    float32 rounding of a one-thread run."""
    x, W, b, A, B, dy = make(1000, 96, 80, 8, torch.float32)
    A.requires_grad_(True)
    B.requires_grad_(True)
    seed = int(torch.randint(0, 2**62, ()))
    with torch.no_grad():
        Y, S = ops.lora_linear_forward(x, W, b, A, B, 2.0, seed, 0.2)
        runs = [ops.lora_linear_backward(dy, x, W, A, B, S, 2.0, seed, 0.2, True) for _ in range(3)]
    for dX, dA, dB in runs[1:]:
        assert torch.equal(dX, runs[0][0]) and torch.equal(dA, runs[0][1]) and torch.equal(dB, runs[0][2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            Y1, S1 = ops.lora_linear_forward(x, W, b, A, B, 2.0, seed, 0.2)
            one = ops.lora_linear_backward(dy, x, W, A, B, S1, 2.0, seed, 0.2, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(Y1, Y, rtol=1e-5, atol=1e-5)
    for got, want in zip(one, runs[0]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cpu_backend_matches_reference_backend():
    from lorafusion.backends import cpu_backend, reference_backend

    x, W, b, A, B, dy = make(45, 24, 36, 4, torch.float32)
    seed = 2**63 + 12345  # above int64: the backend passes it as its two's complement
    y, S = cpu_backend.forward(x, W, b, A, B, 0.5, seed, 0.25)
    y_ref, S_ref = reference_backend.forward(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5, seed,
                                             0.25)
    assert_close(y, y_ref, torch.float32, "Y")
    assert_close(S, S_ref, torch.float32, "S")
    got = cpu_backend.backward(dy, x, W, A, B, S, 0.5, seed, 0.25, True)
    want = reference_backend.backward(dy.double(), x.double(), W.double(), A.double(), B.double(), S_ref, 0.5, seed,
                                      0.25, True)
    for g, w, name in zip(got, want, ("dX", "dA", "dB")):
        assert_close(g, w, torch.float32, name)


# ------------------------------------------------------------------------------------------------------------------
# Fake kernels: torch.compile traces the ops
# ------------------------------------------------------------------------------------------------------------------

def test_opcheck_fake_kernels():
    x, W, b, A, B, dy = make(9, 12, 10, 3, torch.float32)
    S = ops.lora_shrink(x, A, 1, 0.1)
    dS, _ = ops.lora_dy_shrink(dy, B, S, 0.5)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.dropout_keep_mask.default, (x, 1, 0.1), test_utils=checks)
    torch.library.opcheck(ops.lora_shrink.default, (x, A, 1, 0.1), test_utils=checks)
    torch.library.opcheck(ops.lora_dy_shrink.default, (dy, B, S, 0.5), test_utils=checks)
    torch.library.opcheck(ops.lora_dropout_grad_A.default, (x, dS, 1, 0.1), test_utils=checks)
    torch.library.opcheck(ops.lora_dropout_expand_add_.default, (torch.randn(9, 12), dS, A, 1, 0.1),
                          test_utils=checks)
    torch.library.opcheck(ops.lora_linear_forward.default, (x, W, b, A, B, 0.5, 1, 0.1), test_utils=checks)
    torch.library.opcheck(ops.lora_linear_forward.default, (x, W, None, A, B, 0.5, 1, 0.1), test_utils=checks)
    for need_dx in (True, False):
        torch.library.opcheck(ops.lora_linear_backward.default, (dy, x, W, A, B, S, 0.5, 1, 0.1, need_dx),
                              test_utils=checks)


def test_torch_compile_fullgraph_traces_composites():
    def step(x, W, b, A, B):
        y, S = torch.ops.lorafusion.lora_linear_forward(x, W, b, A, B, 2.0, 3, 0.1)
        dx, dA, dB = torch.ops.lorafusion.lora_linear_backward(torch.ones_like(y), x, W, A, B, S, 2.0, 3, 0.1, True)
        dx2 = dx.clone()
        torch.ops.lorafusion.lora_dropout_expand_add_(dx2, S, A, 3, 0.1)
        return y.sum() + dx.sum() + dA.sum() + dB.sum(), dx2

    x, W, b, A, B, _ = make(20, 16, 12, 4, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_dx2 = compiled(x, W, b, A, B)
    want, want_dx2 = step(x, W, b, A, B)
    assert torch.allclose(got, want, rtol=1e-5) and torch.equal(got_dx2, want_dx2)


@pytest.mark.parametrize("dtype, layout", [(torch.bfloat16, "contiguous"), (torch.float16, "contiguous"),
                                           (torch.float32, "column-major")])
def test_a_call_under_inference_mode_leaves_the_layer_trainable(dtype, layout):
    """The ops keep per-thread scratch between calls. Made during a call under torch.inference_mode() (an eval
    pass), it was an inference tensor, and the next training step failed writing to it ("Inplace update to
    inference tensor outside InferenceMode"). Widths new to the scratch force it to be made in the inference call;
    the training step after it must run and match the float64 reference."""
    from torch import nn

    import lorafusion

    fin, fout = 150 + int(torch.randint(0, 40, ())), 90 + int(torch.randint(0, 40, ()))
    layer = lorafusion.FusedLoRALinear(nn.Linear(fin, fout).to(dtype), 4, 8, dropout=0.1, backend="cpu")
    with torch.no_grad():
        layer.lora_B.normal_()
    with torch.no_grad():  # a call at other widths first: the scratch then has to be made again below
        lorafusion.FusedLoRALinear(nn.Linear(fin + 1, fout + 1).to(dtype), 4, 8, dropout=0.1, backend="cpu")(
            torch.randn(33, fin + 1).to(dtype))
    x, *_ = make(37, fin, fout, 4, dtype, layout=layout)
    with torch.inference_mode():
        layer(x)
    xg = x.detach().clone().requires_grad_()
    torch.manual_seed(3)
    y = layer(xg)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    A, B = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    torch.manual_seed(3)
    seed = lorafusion.function.draw_dropout_seed(x.device)
    want = ref.lora_linear_reference(x64, layer.base.weight.double(), layer.base.bias.double(), A, B, layer.scale,
                                     0.1, seed)
    want.backward(dy.double())
    assert_close(y, want.detach(), dtype, "Y")
    assert_close(xg.grad, x64.grad, dtype, "dX")
    assert_close(layer.lora_A.grad, A.grad, dtype, "dA")
    assert_close(layer.lora_B.grad, B.grad, dtype, "dB")
