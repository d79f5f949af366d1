"""The Triton multi-adapter backend under TRITON_INTERPRET=1 on CPU tensors (a lean subset: the interpreter is
slow; the heavy grid runs on the torch / C++ paths in test_multi_ops.py). bf16 is checked on a GPU only."""
import os
import zlib

import torch

if not torch.cuda.is_available():  # on a GPU machine these tests skip; the GPU ones run compiled Triton
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from lorafusion.multi import AdapterSpec, MultiLoRALinear  # noqa: E402
from multi_helpers import check_against_reference, make_specs, row_ids  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_only():
    from lorafusion.multi import triton_kernels

    if not triton_kernels.INTERPRET:
        pytest.skip("not under the Triton interpreter (a GPU machine, or triton imported before this module)")
    reason = triton_kernels.unavailable_reason()
    if reason:
        pytest.skip(reason)


CASES = [
    (torch.float32, 1, "one", 1),
    (torch.float32, 7, "distinct", 5),
    (torch.float32, 40, "no_adapter_rows", 16),  # scattered segments: kept short (the interpreter is slow)
    (torch.float32, 133, "zipf", 5),
    (torch.float16, 133, "zipf", 3),
    (torch.float16, 30, "uniform", 5),
    (torch.float16, 7, "zero_rows", 2),
    (torch.float16, 1, "no_adapter_rows", 2),
]


@pytest.mark.parametrize("dtype, T, dist, n", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_triton_matches_reference(dtype, T, dist, n):
    rng = np.random.default_rng(zlib.crc32(repr((T, dist, n)).encode()))
    K, N = 40, 36
    specs = make_specs(n, rng, max_rank=min(K, N))
    check_against_reference("triton", dtype, T, K, N, specs, row_ids(dist, T, n, rng), seed=int(rng.integers(1 << 40)))


@pytest.mark.parametrize("b_scale", [1e-6, 1e-3])
def test_triton_fp16_keeps_the_bits_of_tiny_rank_factors(b_scale):
    """fp16 with every B at ``b_scale`` and dY at 1e-3 (early training, no loss scaling): dS falls to ~1e-8, under
    fp16's smallest normal, and B is subnormal in fp16; the kernels must still match the float64 reference."""
    rng = np.random.default_rng(int(b_scale * 1e6))
    specs = make_specs(3, rng, max_rank=36)
    check_against_reference("triton", torch.float16, 40, 40, 36, specs, row_ids("uniform", 40, 3, rng),
                            seed=77, b_scale=b_scale, dy_scale=1e-3)


def test_triton_fp16_scaling_is_per_adapter_and_reads_only_the_layout():
    """The fp16 power-of-two scale is taken per adapter over the part of each operand the kernels read: an
    overflow in one adapter's rows leaves another adapter's gradient as it was (a scale over the whole tensor once
    zeroed it), and extra rows / elements past the layout change nothing."""
    from lorafusion.multi import AdapterSegments, triton_kernels as tk

    torch.manual_seed(0)
    grads = []
    for poison in (False, True):
        layer = MultiLoRALinear(torch.nn.Linear(16, 24).half(), backend="triton")
        layer.add_adapter("a", 4, 8.0)
        layer.add_adapter("b", 4, 8.0)
        with torch.no_grad():
            for n in "ab":
                layer.lora_A[n].copy_(torch.linspace(-0.3, 0.3, 64).view(4, 16))
                layer.lora_B[n].copy_(torch.linspace(-1e-2, 1e-2, 96).view(24, 4))
        x = torch.linspace(-1, 1, 256).view(16, 16).half()
        dy = (torch.linspace(-1, 1, 384).view(16, 24) * 1e-2).half()
        if poison:
            dy[0, 0] = float("inf")  # an overflow in adapter a's rows
        layer(x, segments=layer.make_segments(["a"] * 8 + ["b"] * 8)).backward(dy)
        grads.append((layer.lora_A["b"].grad.clone(), layer.lora_B["b"].grad.clone()))
    assert grads[0][0].abs().max() > 0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])

    t = AdapterSegments([0] * 20 + [1] * 12, {"a": AdapterSpec(4, 8.0), "b": AdapterSpec(2, 2.0)}).tables("cpu")
    x = torch.randn(32, 16).half()
    w = torch.randn(6, 16) * 1e-3
    extra = torch.full((2, 16), float("inf"))
    assert torch.equal(tk.shrink(x, w, t, 1, False, False), tk.shrink(x, torch.cat([w, extra]), t, 1, False, False))
    flat = torch.randn(t.s_numel) * 1e-6
    assert torch.equal(tk.grad(flat, x, t, 1, False, False),
                       tk.grad(torch.cat([flat, torch.tensor([float("inf"), 6e4])]), x, t, 1, False, False))


def test_triton_primitives_reject_tensors_that_do_not_fit_the_layout():
    """The Triton kernels index raw pointers with the layout's numbers and have no bounds checks: a layout of
    another microbatch, short stacked weights or flat buffer, or a weight that does not chain is a ValueError."""
    from lorafusion.multi import AdapterSegments, triton_kernels as tk

    t = AdapterSegments([0] * 20 + [1] * 12, {"a": AdapterSpec(4, 8.0, 0.1), "b": AdapterSpec(2, 2.0, 0.0)}
                        ).tables("cpu")
    x, w_cat, W = torch.randn(32, 16), torch.randn(6, 16), torch.randn(24, 16)
    with pytest.raises(ValueError, match="multi-adapter shrink: the layout covers 32 rows, the tensor has 31"):
        tk.shrink(x[:31], w_cat, t, 1, True, False)
    with pytest.raises(ValueError, match="stack 6 rank rows, the stacked weights have 4"):
        tk.shrink(x, w_cat[:4], t, 1, True, False)
    with pytest.raises(ValueError, match="stacked weights \\(6, 15\\) do not match input"):
        tk.shrink(x, w_cat[:, :15], t, 1, True, False)
    with pytest.raises(ValueError, match="flat rank-r buffer of 104 elements, got 100"):
        tk.grad(torch.randn(100), x, t, 1, True, False)
    S = tk.shrink(x, w_cat, t, 1, True, False)
    Bt = torch.randn(6, 24)
    with pytest.raises(ValueError, match="multi-adapter GEMM: the layout covers 32 rows, the tensor has 30"):
        tk.segmented_gemm(x[:30], W, None, S, Bt, t, 1, False, True, True)
    with pytest.raises(ValueError, match="do not chain"):
        tk.segmented_gemm(x, W[:, :15], None, S, Bt, t, 1, False, True, True)
    with pytest.raises(ValueError, match="do not chain"):
        tk.segmented_gemm(x, W, torch.randn(23), S, Bt, t, 1, False, True, True)
    y = tk.segmented_gemm(x, W, None, S, Bt, t, 1, False, True, True)  # the fitting call runs
    assert y.shape == (32, 24) and torch.isfinite(y).all()


def test_triton_rank_blocks_and_noncontig():
    """Ranks above the kernels' rank block (looped), rank 1, a non-contiguous input, no bias."""
    specs = {"big": AdapterSpec(40, 8.0, 0.2), "one": AdapterSpec(1, 2.0, 0.0), "mid": AdapterSpec(17, 17.0, 0.5)}
    ids = [0] * 20 + [2] * 9 + [-1] * 4 + [1] * 8 + [0] * 3
    check_against_reference("triton", torch.float32, len(ids), 45, 41, specs, ids, bias=False, noncontig=True)


def test_triton_all_rows_without_adapter():
    specs = {"a": AdapterSpec(4, 4.0, 0.1)}
    check_against_reference("triton", torch.float32, 9, 20, 18, specs, [-1] * 9)


def test_strided_bias_and_transposed_adapter_views():
    """The kernels index bias, A_cat, Bt_cat and the flat S as dense: a strided bias (a public-API input) or a
    transposed view must be made dense first (they were once read with the wrong strides: errors of 0.1 to 1.8)."""
    from lorafusion.multi import AdapterSegments, multi_lora_reference
    from lorafusion.multi.backends import get_multi_backend

    torch.manual_seed(8)
    spec = {"a": AdapterSpec(4, 8.0, 0.0), "b": AdapterSpec(2, 2.0, 0.0)}
    seg = AdapterSegments([0] * 5 + [1] * 4 + [-1] * 3, spec)
    t = seg.tables("cpu")
    x = torch.randn(12, 24)
    W = torch.randn(20, 24) / 5
    b = torch.randn(40)[::2]  # strided
    A = {n: torch.randn(s.r, 24) / 5 for n, s in spec.items()}
    B = {n: torch.randn(20, s.r) for n, s in spec.items()}
    A_cat = torch.cat([A["a"], A["b"]]).t().contiguous().t()  # same values, transposed storage
    Bt_cat = torch.cat([B["a"].t(), B["b"].t()]).t().contiguous().t()
    backend = get_multi_backend("cpu", "triton")
    y, _ = backend.forward(x, W, b, A_cat, Bt_cat, t, 1, False)
    yr = multi_lora_reference(x.double(), W.double(), b.double(), {n: (A[n].double(), B[n].double()) for n in spec},
                              seg, training=False)
    assert ((y.double() - yr).norm() / yr.norm()).item() < 1e-5


BLAS_CASES = [
    (torch.float32, 40, "no_adapter_rows", 5, True),
    (torch.float32, 133, "zipf", 3, False),
    (torch.float16, 30, "uniform", 5, True),
    (torch.float16, 7, "zero_rows", 2, True),
]


@pytest.mark.parametrize("dtype, T, dist, n, bias", BLAS_CASES, ids=["-".join(map(str, c)) for c in BLAS_CASES])
def test_blas_gemm_placement_matches_reference(monkeypatch, dtype, T, dist, n, bias):
    """LORAFUSION_TRITON_GEMM=blas: the Triton kernel stores [bias +] the rank-r term (the GEMM kernel over an
    empty reduction, dropout mask included) and torch's GEMM adds onto it. Forward and every gradient against the
    float64 reference, with dropout, adapter-less rows and absent adapters."""
    from lorafusion.multi import backends

    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "blas")
    mod = backends.get_multi_backend("cpu", "triton")
    assert mod.term is not None and mod.gemm is None
    rng = np.random.default_rng(zlib.crc32(repr(("blas", T, dist, n)).encode()))
    specs = make_specs(n, rng, max_rank=36)
    check_against_reference("triton", dtype, T, 40, 36, specs, row_ids(dist, T, n, rng),
                            seed=int(rng.integers(1 << 40)), bias=bias)


def test_segmented_term_is_the_fused_gemm_without_the_product(monkeypatch):
    """The stored term plus X W^T equals the fused GEMM's output (fp32), and the term alone is bias + the masked,
    scaled rank-r product of each row's adapter (zero past the adapters' rows, bias only there)."""
    from lorafusion.multi import AdapterSegments, triton_kernels as tk
    from lorafusion.multi.reference import multi_lora_reference

    g = torch.Generator().manual_seed(zlib.crc32(b"segmented term"))
    specs = {"a": AdapterSpec(3, 6.0, 0.3), "b": AdapterSpec(5, 5.0, 0.0)}
    ids = [-1] * 3 + [0] * 20 + [1] * 17 + [0] * 9
    seg = AdapterSegments(ids, specs)
    t = seg.tables("cpu")
    T, K, N = len(ids), 24, 40
    x = torch.randn(T, K, generator=g)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    A = {n: torch.randn(s.r, K, generator=g) for n, s in specs.items()}
    B = {n: torch.randn(N, s.r, generator=g) for n, s in specs.items()}
    A_cat = torch.cat([A[n] for n in seg.present_names])
    Bt_cat = torch.cat([B[n].t() for n in seg.present_names]).contiguous()
    S = tk.shrink(x, A_cat, t, 5, True, False)
    term = tk.segmented_term(x, b, S, Bt_cat, t, 5, False, True)
    fused = tk.segmented_gemm(x, W, b, S, Bt_cat, t, 5, False, True, True)
    assert torch.allclose(term + x @ W.t(), fused, rtol=1e-5, atol=1e-5)
    ref = multi_lora_reference(x.double(), W.double(), b.double(),
                               {n: (A[n].double(), B[n].double()) for n in specs}, seg, seed=5)
    assert torch.allclose(term.double(), ref - x.double() @ W.double().t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(term[:3], b.expand(3, N))


def test_bad_gemm_placement_is_named(monkeypatch):
    from lorafusion.multi import backends

    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "cublas")
    with pytest.raises(ValueError, match="LORAFUSION_TRITON_GEMM.*'cublas'"):
        backends.get_multi_backend("cpu", "triton")


def test_use_gemm_placement_scopes_the_choice(monkeypatch):
    """Inside ``use_gemm_placement("blas")`` the Triton backend resolves to the stored-term variant; outside, the
    environment is as it was (unset, or its earlier value), and a bad mode is refused by name."""
    from lorafusion.multi import backends

    monkeypatch.delenv("LORAFUSION_TRITON_GEMM", raising=False)
    with backends.use_gemm_placement("blas"):
        assert backends.get_multi_backend("cpu", "triton").term is not None
    assert "LORAFUSION_TRITON_GEMM" not in os.environ
    assert backends.get_multi_backend("cpu", "triton").gemm is not None
    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "fused")
    with backends.use_gemm_placement("blas"):
        pass
    assert os.environ["LORAFUSION_TRITON_GEMM"] == "fused"
    with pytest.raises(ValueError, match="'gpu'"):
        with backends.use_gemm_placement("gpu"):
            pass


def test_explicit_triton_backend_refuses_float64_instead_of_returning_garbage():
    """float64 took the kernels' tensor-core path and came back as uninitialised memory (no error); the backend now
    refuses it, as the single-adapter Triton backend does, and 'auto' sends float64 to the reference."""
    layer = MultiLoRALinear(torch.nn.Linear(20, 7).double(), backend="triton")
    layer.add_adapter("a", 4, 8.0)
    seg = layer.make_segments(["a"] * 5)
    with pytest.raises(TypeError, match="multi-adapter backend 'triton' takes float32, float16 or bfloat16 input"):
        layer(torch.randn(5, 20, dtype=torch.float64), segments=seg)
    auto = MultiLoRALinear(torch.nn.Linear(20, 7).double())
    auto.add_adapter("a", 4, 8.0)
    assert auto(torch.randn(5, 20, dtype=torch.float64), segments=seg).dtype == torch.float64
