"""Triton backend ops against the float64 reference, run in Triton's interpreter on CPU tensors.

The interpreter is switched on here, before triton is imported, and only where no CUDA device exists: on a GPU
machine these tests skip and ``test_triton_gpu.py`` checks the compiled kernels (bf16 included; a bf16 ``tl.dot``
is wrong under the interpreter, so bf16 is not checked here).
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import importlib  # noqa: E402
import sys  # noqa: E402

from lorafusion import reference as ref  # noqa: E402
from lorafusion.backends import triton_backend as tb  # noqa: E402

if not torch.cuda.is_available() and not tb._INTERPRET:
    # an earlier test module imported the backend before the interpreter was switched on (backend discovery at
    # collection time): rebuild the kernels as interpreted ones and let discovery look again
    importlib.reload(sys.modules["lorafusion.backends.triton_kernels"])
    tb = importlib.reload(tb)
    importlib.import_module("lorafusion.backends")._cache.pop("triton", None)

if not tb._INTERPRET or tb.unavailable_reason() is not None:
    pytest.skip("interpreter tests: need TRITON_INTERPRET=1 before triton is imported and no CUDA device "
                f"(interpret={tb._INTERPRET}, reason={tb.unavailable_reason()})", allow_module_level=True)

from triton_helpers import (SEED, check_forward_backward, check_tiny_rank_factors, make_case,  # noqa: E402,F401
                            nan_filled_outputs, rel_err)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


# (tokens, in, out, r, bias, non-contiguous x/dy, adapters fp32 under half x)
CASES = [
    (1, 33, 17, 1, True, False, False),
    (7, 100, 300, 8, False, True, True),
    (133, 33, 17, 64, True, True, False),
    (133, 100, 300, 16, True, False, True),
]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}_{c[1]}to{c[2]}_r{c[3]}")
def test_forward_backward_match_reference(case, dtype, p):
    M, K, N, r, has_bias, noncontig, fp32_adapters = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, str(dtype), p)).encode()))
    (x, dy, W, A, B), S, scale, dA_ref, dB_ref = check_forward_backward(
        tb, M, K, N, r, dtype, p, has_bias, noncontig, fp32_adapters, gen, TOL[dtype])
    tol = TOL[dtype]
    dX_none, dA2, dB2 = tb.backward(dy, x, W, A, B, S, scale, SEED, p, need_dx=False)
    assert dX_none is None
    assert rel_err(dA2, dA_ref) < tol and rel_err(dB2, dB_ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_each_op_matches_reference(dtype):
    """The five public ops on their own, fed the reference's intermediates; r = 200 loops over rank chunks."""
    M, K, N, r, p = 7, 100, 300, 200, 0.1
    gen = torch.Generator().manual_seed(1234)
    x, dy, W, bias, A, B = make_case(M, K, N, r, dtype, dtype, False, gen)
    d = lambda t: t.double()  # noqa: E731
    scale = 1.0 / r ** 0.5
    tol = TOL[dtype]
    S_ref = ref.lora_shrink(d(x), d(A), SEED, p)
    dS_ref, dB_ref = ref.lora_dy_shrink(d(dy), d(B), S_ref, scale)

    assert rel_err(tb.lora_shrink(x, A, SEED, p), S_ref) < tol
    Y = tb.lora_expand_forward(x, W, bias, S_ref.float(), B, scale)
    assert Y.dtype == dtype
    assert rel_err(Y, ref.lora_expand_forward(d(x), d(W), d(bias), S_ref, d(B), scale)) < tol
    dS, dB = tb.lora_dy_shrink(dy, B, S_ref.float(), scale)
    assert rel_err(dS, dS_ref) < tol and rel_err(dB, dB_ref) < tol
    dA = tb.lora_dropout_grad_A(x, dS_ref.float(), SEED, p, dtype)
    assert dA.dtype == dtype
    assert rel_err(dA, ref.lora_dropout_grad_A(d(x), dS_ref, SEED, p, torch.float64)) < tol
    dX = tb.lora_expand_backward(dy, W, dS_ref.float(), A, SEED, p)
    assert dX.dtype == dtype
    assert rel_err(dX, ref.lora_expand_backward(d(dy), d(W), dS_ref, d(A), SEED, p)) < tol


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("b_scale", [1e-6, 1e-3])
def test_fp16_keeps_the_bits_of_tiny_rank_factors(b_scale, p):
    gen = torch.Generator().manual_seed(int(b_scale * 1e6) + int(p * 10))
    check_tiny_rank_factors(tb, b_scale, p, gen, TOL[torch.float16])


def test_pow2_scale_factors():
    """Exact powers of two bringing max |t| into [2**13, 2**14); 1 for a non-finite max (an overflow passes on as
    it was) and for an empty tensor; 2**100 for zeros."""
    # 2**118 and 3e38 (near float32's top): a clamp of the exponent at -100 left them above fp16's 65504 (inf)
    amax = torch.tensor([1e-25, 1e-9, 3e-5, 1.0, 8192.0, 1e5, 65504.0, 2.0 ** 118, 3e38,
                         0.0, float("inf"), float("nan")])
    f, inv = tb.pow2_from_amax(amax)
    assert torch.equal(f * inv, torch.ones_like(f))
    assert torch.equal(torch.frexp(f).mantissa, torch.full_like(f, 0.5))  # powers of two
    scaled = amax[:9] * f[:9]
    assert bool(((scaled >= 2 ** 13) & (scaled < 2 ** 14)).all()), scaled
    assert f[9] == 2.0 ** 100 and f[10] == 1.0 and f[11] == 1.0
    f0, inv0 = tb.fp16_pow2(torch.empty(0, 16))
    assert f0 == 1.0 and inv0 == 1.0


def test_fp16_rank_zero_gives_empty_adapter_gradients():
    """r = 0 through the functional API (the layer itself needs r >= 1): empty gradients, as in fp32 / bf16."""
    x = torch.randn(8, 16, dtype=torch.float16, requires_grad=True)
    A = torch.zeros(0, 16, requires_grad=True)
    B = torch.zeros(12, 0, requires_grad=True)
    from lorafusion.function import fused_lora_linear

    fused_lora_linear(x, torch.randn(12, 16).half(), None, A, B, 1.0, backend="triton").float().sum().backward()
    assert A.grad.shape == (0, 16) and B.grad.shape == (12, 0) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFF, 0x1_0000_0001, 0xFEDC_BA98_7654_3210])
def test_philox_bits_match_reference(seed):
    rows, cols = 37, 45
    got = tb.philox_uint32(seed, rows, cols, "cpu")
    assert torch.equal(got, ref.philox_uint32(seed, rows, cols))


@pytest.mark.parametrize("BK", [32, 64, 128, 256])
def test_keep_tile_shares_philox_blocks_and_matches_reference(BK):
    """``philox_keep_tile`` (through the mask kernel, at the column tile BK): tiles of whole 64-column blocks draw
    one Philox block per four columns and interleave the words into column order; BK = 32 draws per element. Every
    width gives the reference's mask bit for bit, over ragged edges, many 64-column blocks, a seed above 2**63 and
    several values of p."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("keep_tile", BK)).encode()))
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) | (1 << 63)
    for M, K, p in ((1, 1, 0.1), (37, 333, 0.3), (5, 1000, 0.5)):
        got = tb._dropout_bits(M, K, seed, p, "cpu", BK=BK)
        assert torch.equal(got.bool(), ref.dropout_keep_mask(seed, M, K, p)), (M, K, p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_dropout_mask_matches_reference(p):
    """S with A = identity is D(X) itself: the in-kernel mask and 1/(1-p) scale equal the reference's."""
    M, K = 9, 16
    x = torch.randn(M, K) + 3.0  # no zeros, so a dropped element is visible
    S = tb.lora_shrink(x, torch.eye(K), SEED, p)
    want = ref.apply_dropout(x.double(), SEED, p)
    assert torch.equal(S != 0, want != 0)
    assert rel_err(S, want) < 1e-6


def test_bad_input_raises():
    x = torch.randn(4, 8)
    A = torch.randn(2, 8)
    with pytest.raises(ValueError, match="p="):
        tb.lora_shrink(x, A, 0, 1.0)
    with pytest.raises(TypeError, match="x2d"):
        tb.lora_shrink(x.double(), A, 0, 0.0)
    with pytest.raises(ValueError, match="lora_A"):
        tb.lora_shrink(x, torch.randn(2, 7), 0, 0.0)


def test_backend_attributes():
    assert tb.NAME == "triton"
    assert tb.DEVICE_TYPES == ("cuda", "cpu")
    assert tb.unavailable_reason() is None


# The TMA variants of the two GEMMs (LORAFUSION_TRITON_TMA=1): aligned 16-bit operands take them (fp16 here, bf16 on
# a GPU), with edge tiles in every dimension (tokens, in and out not multiples of the tiles), dropout on and off.
TMA_CASES = [(1, 32, 48, 1), (133, 96, 40, 16), (70, 64, 200, 40)]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: f"M{c[0]}_{c[1]}to{c[2]}_r{c[3]}")
def test_tma_gemms_match_reference(monkeypatch, case, p):
    dtype = torch.float16
    monkeypatch.setenv("LORAFUSION_TRITON_TMA", "1")
    M, K, N, r = case
    launched = []
    for name in ("_expand_forward_tma_kernel", "_expand_backward_tma_kernel"):
        kernel = getattr(tb.tk, name)
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _n=name, **k: launched.append(_n) or _run(*a, **k))
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, str(dtype), p)).encode()))
    check_forward_backward(tb, M, K, N, r, dtype, p, True, False, False, gen, TOL[dtype])
    assert "_expand_forward_tma_kernel" in launched and "_expand_backward_tma_kernel" in launched


def test_tma_only_where_the_operands_qualify(monkeypatch):
    h = torch.float16
    x = torch.randn(8, 40, dtype=h)
    assert not tb._use_tma(x)  # opt-in: off unless LORAFUSION_TRITON_TMA=1
    monkeypatch.setenv("LORAFUSION_TRITON_TMA", "1")
    assert tb._use_tma(x)
    assert tb._use_tma(x[:, :37])  # a column slice: rows still 80 bytes apart, so the descriptor is valid
    assert not tb._use_tma(torch.randn(8, 40))  # fp32: the pointer kernels
    assert not tb._use_tma(torch.randn(8, 36, dtype=h))  # 36 * 2 bytes per row: not a multiple of 16
    assert not tb._use_tma(torch.randn(40, 8, dtype=h).t())  # column stride 40
    assert not tb._use_tma(torch.randn(8 * 40 + 1, dtype=h)[1:].view(8, 40))  # base 2 bytes past an aligned one


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}_{c[1]}to{c[2]}_r{c[3]}")
def test_blas_gemm_placement_matches_reference(monkeypatch, case, dtype, p):
    """LORAFUSION_TRITON_GEMM=blas: the Triton GEMM kernels over an empty reduction store b + s S B^T and D'(dS A)
    (the mask grad_A wrote), and torch's GEMM adds X W^T / dY W on top. S, Y, dA, dB, dX against the float64
    reference; TMA switched on too, which the empty operands must not take."""
    from lorafusion.backends import get_backend, triton_blas_backend as tbb

    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "blas")
    monkeypatch.setenv("LORAFUSION_TRITON_TMA", "1")
    assert get_backend("cpu", "triton") is tbb
    M, K, N, r, has_bias, noncontig, fp32_adapters = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("blas", case, str(dtype), p)).encode()))
    (x, dy, W, A, B), S, scale, dA_ref, dB_ref = check_forward_backward(
        tbb, M, K, N, r, dtype, p, has_bias, noncontig, fp32_adapters, gen, TOL[dtype])
    dX_none, dA2, dB2 = tbb.backward(dy, x, W, A, B, S, scale, SEED, p, need_dx=False)
    assert dX_none is None
    assert rel_err(dA2, dA_ref) < TOL[dtype] and rel_err(dB2, dB_ref) < TOL[dtype]


def test_blas_placement_layer_and_bad_value(monkeypatch):
    """A FusedLoRALinear forward / backward under ``use_gemm_placement("blas")`` runs the blas module (its
    backward too, after the block), equals the fused placement's result, and a bad placement is refused by name."""
    import lorafusion
    from lorafusion.backends import triton_blas_backend as tbb, use_gemm_placement

    calls = []
    for fn in ("forward", "backward"):
        monkeypatch.setattr(tbb, fn, lambda *a, _f=getattr(tbb, fn), _n=fn, **k: calls.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    layer = lorafusion.FusedLoRALinear(torch.nn.Linear(40, 24), r=4, alpha=8, dropout=0.1, backend="triton").train()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(9, 40)
    out = {}
    for mode in ("fused", "blas"):
        xx = x.clone().requires_grad_()
        torch.manual_seed(1)
        with use_gemm_placement(mode):
            y = layer(xx)
        y.backward(torch.ones_like(y))
        out[mode] = (y.detach(), xx.grad, layer.lora_A.grad.clone())
        layer.zero_grad()
    assert calls == ["forward", "backward"]
    for a, b in zip(out["fused"], out["blas"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "cublas")
    with pytest.raises(ValueError, match="LORAFUSION_TRITON_GEMM.*'cublas'"):
        layer(x)


def test_compiled_layer_keeps_its_forward_placement_in_backward(monkeypatch):
    """Traced by torch.compile (aot_eager), a layer whose forward runs under ``use_gemm_placement("blas")`` runs its
    backward with the blas placement too, after the block has ended, and matches the eager result."""
    import lorafusion
    from lorafusion.backends import triton_blas_backend as tbb, use_gemm_placement

    calls = []
    for mod, tag in ((tbb, "blas"), (tb, "fused")):
        for fn in ("forward", "backward"):
            monkeypatch.setattr(mod, fn, lambda *a, _f=getattr(mod, fn), _n=f"{tag}.{fn}", **k: calls.append(_n)
                                or _f(*a, **k))
    torch.manual_seed(0)
    layer = lorafusion.FusedLoRALinear(torch.nn.Linear(32, 24), r=4, alpha=8, dropout=0.0, backend="triton")
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 32)
    grads = []
    for fn in (layer, compiled):
        xx = x.clone().requires_grad_()
        with use_gemm_placement("blas"):
            y = fn(xx)
        y.square().sum().backward()
        grads.append((y.detach(), xx.grad, layer.lora_A.grad.clone()))
        layer.zero_grad()
    assert calls == ["blas.forward", "blas.backward"] * 2, calls
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_placement_only_concerns_the_triton_backend(monkeypatch):
    """A bad $LORAFUSION_TRITON_GEMM is an error where the Triton backend is chosen (naming the variable and the
    value) and nowhere else: the CPU backend still resolves and available_backends() reports it for triton."""
    from lorafusion import backends

    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "Cublas")
    avail = backends.available_backends()
    assert avail["cpu"] == "available" and "LORAFUSION_TRITON_GEMM='Cublas'" in avail["triton"]
    assert backends.get_backend("cpu", "cpu").NAME == "cpu"
    with pytest.raises(ValueError, match="LORAFUSION_TRITON_GEMM='Cublas'"):
        backends.get_backend("cpu", "triton")
    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", " BLAS ")  # case and spaces as the environment may give them
    assert backends.get_backend("cpu", "triton").__name__.endswith("triton_blas_backend")
    with pytest.raises(ValueError, match="'gpu'"):
        with backends.use_gemm_placement("gpu"):
            pass


def test_host_launch_arithmetic_matches_triton():
    tk = sys.modules["lorafusion.backends.triton_kernels"]
    import triton

    for n in list(range(0, 300)) + [2**20 - 1, 2**20, 2**20 + 1, 8192, 14336]:
        assert tk.next_pow2(n) == triton.next_power_of_2(max(n, 1)), n
        for d in (1, 3, 16, 64, 128):
            assert tk.cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_launch_takes_the_autotuner_once_per_key_and_then_its_choice(monkeypatch):
    """``triton_kernels.launch``: the first launch of a key goes through ``Autotuner.run``, later ones straight to the
    JIT function with the chosen config. Its key determines the autotuner's own (key arguments, then the str of
    each tensor argument's dtype, as ``Autotuner.run`` builds it), so a new token bucket or dtype goes back through
    the autotuner; the results stay the reference's."""
    from triton.runtime.autotuner import Autotuner

    tk = sys.modules["lorafusion.backends.triton_kernels"]
    tuned = []
    theirs_of = {}  # our launch key -> the autotuner's key: must be a function
    real_run = Autotuner.run

    def counting_run(self, *args, **kwargs):
        tuned.append(self)
        named = {**dict(zip(self.arg_names, args)), **{k: v for k, v in kwargs.items() if k in self.arg_names}}
        theirs = tuple([named[k] for k in self.keys if k in named]
                       + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])
        ours = tk._launch_key(self, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        assert theirs_of.setdefault((self, ours), theirs) == theirs
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting_run)
    monkeypatch.setattr(tk, "_CHOSEN", {})
    gen = torch.Generator().manual_seed(11)
    A = torch.randn(8, 40, generator=gen)

    def shrink(M, dtype):
        x = torch.randn(M, 40, generator=gen).to(dtype)
        S = tb.lora_shrink(x, A.to(dtype), SEED, 0.1)
        want = ref.lora_shrink(x.double(), A.to(dtype).double(), SEED, 0.1)
        assert rel_err(S, want) < TOL[dtype]

    shrink(37, torch.float32)
    assert tuned == [tk._shrink_kernel]
    shrink(40, torch.float32)  # same bucket (64), same dtypes: the autotuner's choice, no Autotuner.run
    shrink(33, torch.float32)
    assert tuned == [tk._shrink_kernel]
    shrink(300, torch.float32)  # a new bucket
    shrink(37, torch.float16)  # a new dtype
    assert tuned == [tk._shrink_kernel] * 3
    assert len([k for k in tk._CHOSEN if k[0] is tk._shrink_kernel]) == 3


def test_launch_key_is_finer_than_the_autotuners():
    """Launches that differ in anything the autotuner keys on (a key argument by position or keyword, an absent
    one, any argument's dtype, a tensor given where another launch gave a non-tensor) get different launch keys."""
    tk = sys.modules["lorafusion.backends.triton_kernels"]

    class Tuner:  # the attributes _launch_key reads from a triton.autotune kernel
        arg_names = ["x_ptr", "y_ptr", "M_BUCKET", "N", "FLAG"]
        keys = ["M_BUCKET", "FLAG"]

    k = Tuner()
    f32, f16 = torch.zeros(1), torch.zeros(1, dtype=torch.float16)
    base = tk._launch_key(k, (f32, f32, 64, 100), {"FLAG": True})
    assert tk._launch_key(k, (f32, f32, 64, 7), {"FLAG": True}) == base  # N is not a key argument
    for args, kw in [((f32, f32, 128, 100), {"FLAG": True}), ((f32, f32, 64, 100), {"FLAG": False}),
                     ((f32, f32, 64, 100), {}), ((f32, f16, 64, 100), {"FLAG": True}),
                     ((f32, 0, 64, 100), {"FLAG": True}), ((f32, f32, 64, 100), {"FLAG": True, "extra": f16})]:
        assert tk._launch_key(k, args, kw) != base, (args, kw)
