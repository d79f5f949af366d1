"""The plain-torch ('reference') and C++ ('cpu') multi-adapter backends against the float64 multi-adapter
reference, which is itself checked against the single-adapter reference of lorafusion.reference."""
import copy
import zlib

import numpy as np
import pytest
import torch

from lorafusion import reference as ref
from lorafusion.multi import AdapterSegments, AdapterSpec, multi_lora_reference
from lorafusion.multi.reference import philox_rows
from multi_helpers import DISTRIBUTIONS, check_against_reference, make_specs, row_ids


def _cpu_ops_or_skip():
    from lorafusion.multi import ops

    reason = ops.cpp_ops_reason()
    if reason is not None:
        pytest.skip(f"C++ multi_lora ops unavailable: {reason}")


def test_philox_rows_matches_single_reference():
    rows = torch.tensor([0, 5, 6, 99, 3])
    full = ref.philox_uint32(77, 100, 13)
    assert torch.equal(philox_rows(77, rows, 13), full[rows])


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_multi_reference_is_single_reference_per_adapter(p):
    """Each adapter's rows of the multi reference equal the single-adapter reference over the whole batch."""
    g = torch.Generator().manual_seed(0)
    T, K, N = 23, 17, 11
    sp = {"a": AdapterSpec(3, 6.0, p), "b": AdapterSpec(5, 5.0, p / 2, True)}
    ids = [0] * 5 + [1] * 4 + [-1] * 3 + [0] * 6 + [1] * 5
    seg = AdapterSegments(ids, sp)
    x = torch.randn(T, K, generator=g, dtype=torch.float64)
    W, b = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    ad = {n: (torch.randn(s.r, K, generator=g, dtype=torch.float64), torch.randn(N, s.r, generator=g, dtype=torch.float64))
          for n, s in sp.items()}
    y = multi_lora_reference(x, W, b, ad, seg, seed=9)
    idx = torch.tensor(ids)
    for i, (n, s) in enumerate(sp.items()):
        single = ref.lora_linear_reference(x, W, b, *ad[n], s.scale, s.dropout, 9)
        assert torch.allclose(y[idx == i], single[idx == i], rtol=1e-12, atol=1e-12)
    assert torch.allclose(y[idx == -1], (x @ W.t() + b)[idx == -1])


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_multi_reference_gradients_are_single_reference_gradients_per_adapter(p):
    """The multi reference's gradients (the spec every multi backend is checked against) against the single-adapter
    reference's, float64: adapter a's dA / dB are the single reference's with dY kept on a's rows only (the same
    masks: both draw them by global row); dX on a's rows is the single reference's; rows of no adapter get dY W."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    T, K, N = 29, 13, 9
    sp = {"a": AdapterSpec(3, 6.0, p), "b": AdapterSpec(4, 5.0, p / 2, True), "c": AdapterSpec(2, 2.0)}
    ids = [0] * 6 + [1] * 4 + [-1] * 3 + [0] * 7 + [1] * 5 + [-1] * 4  # c: no rows
    seg = AdapterSegments(ids, sp)
    x = torch.randn(T, K, generator=g, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    ad = {n: (torch.randn(s.r, K, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(N, s.r, generator=g, dtype=torch.float64).requires_grad_()) for n, s in sp.items()}
    dy = torch.randn(T, N, generator=g, dtype=torch.float64)
    multi_lora_reference(x, W, b, {n: ad[n] for n in ("a", "b")}, seg, seed=11).backward(dy)
    idx = torch.tensor(ids)
    for i, (n, s) in enumerate(list(sp.items())[:2]):
        rows = (idx == i).unsqueeze(1)
        xs = x.detach().clone().requires_grad_()
        A, B = (t.detach().clone().requires_grad_() for t in ad[n])
        ref.lora_linear_reference(xs, W, b, A, B, s.scale, s.dropout, 11).backward(dy * rows)
        assert torch.allclose(ad[n][0].grad, A.grad, rtol=1e-12, atol=1e-12), n
        assert torch.allclose(ad[n][1].grad, B.grad, rtol=1e-12, atol=1e-12), n
        xs.grad = None
        ref.lora_linear_reference(xs, W, b, A, B, s.scale, s.dropout, 11).backward(dy)
        assert torch.allclose(x.grad[idx == i], xs.grad[idx == i], rtol=1e-12, atol=1e-12), n
        assert A.grad.abs().max() > 0
    assert torch.allclose(x.grad[idx == -1], (dy @ W)[idx == -1], rtol=1e-12, atol=1e-12)


def _case_id(c):
    return "-".join(str(v) for v in c)


# heavy grid for the fast paths: every distribution x adapter count, plus token counts x dtypes
CASES = [("cpu", torch.float32, 133, d, n) for d in DISTRIBUTIONS for n in (1, 2, 5, 16, 64)]
CASES += [(be, dt, T, d, n) for be in ("reference", "cpu") for dt in (torch.float32, torch.float16)
          for T in (1, 7, 133, 1000) for d, n in (("uniform", 5), ("no_adapter_rows", 16))]
CASES += [("cpu", dt, 1000, "zipf", 64) for dt in (torch.float32, torch.float16)]
CASES += [("reference", torch.float32, 133, d, 5) for d in DISTRIBUTIONS]


@pytest.mark.parametrize("backend, dtype, T, dist, n", CASES, ids=[_case_id(c) for c in CASES])
def test_backend_matches_reference(backend, dtype, T, dist, n):
    if backend == "cpu":
        _cpu_ops_or_skip()
    rng = np.random.default_rng(zlib.crc32(repr((T, dist, n)).encode()))
    K, N = 61, 45
    specs = make_specs(n, rng, max_rank=min(K, N))
    check_against_reference(backend, dtype, T, K, N, specs, row_ids(dist, T, n, rng), seed=int(rng.integers(1 << 40)))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ranks_1_to_256_in_one_batch(backend):
    if backend == "cpu":
        _cpu_ops_or_skip()
    rng = np.random.default_rng(3)
    specs = {f"r{r}": AdapterSpec(r, 16.0, 0.1 if r % 2 else 0.0) for r in (1, 256, 17, 64, 2)}
    ids = row_ids("uniform", 133, len(specs), rng)
    check_against_reference(backend, torch.float32, 133, 300, 260, specs, ids)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("variant", ["no_bias", "noncontig", "three_d", "eval"])
def test_variants(backend, variant):
    if backend == "cpu":
        _cpu_ops_or_skip()
    rng = np.random.default_rng(5)
    specs = make_specs(4, rng, 40)
    ids = row_ids("no_adapter_rows", 57, 4, rng)
    check_against_reference(backend, torch.float32, 57, 50, 40, specs, ids, bias=variant != "no_bias",
                            noncontig=variant == "noncontig", three_d=variant == "three_d",
                            training=variant != "eval")


def test_cpu_dropout_mask_is_reference_mask():
    """With identity-like data the C++ shrink exposes its mask: it must be the reference's, keyed by global row."""
    _cpu_ops_or_skip()
    from lorafusion.multi import ops

    T, K = 40, 33
    sp = {"a": AdapterSpec(1, 1.0, 0.3), "b": AdapterSpec(1, 1.0, 0.6)}
    ids = [1] * 7 + [0] * 20 + [-1] * 3 + [1] * 10
    seg = AdapterSegments(ids, sp)
    t = seg.tables("cpu")
    x = torch.rand(T, K) + 0.5
    seed = 0xDEADBEEF12345
    # grad with L = 1 gives the column sums of D(X) over each adapter's rows; compare row by row via one-hot L
    for row in (0, 8, 30, 39):
        k, = [i for i, (r, w_off, f_off, *_rest) in enumerate(t.slot_info) if ids[row] == seg.present[i]]
        L = torch.zeros(t.s_numel)
        r_, w_off, f_off, scale, p, n, start, rows = t.slot_info[k]
        L[f_off + rows.tolist().index(row)] = 1.0
        G = ops.grad(L, x, t, seed, True, False)
        keep = ref.dropout_keep_mask(seed, T, K, p)[row]
        expect = torch.where(keep, x[row] / (1 - p), torch.zeros(()))
        assert torch.allclose(G[w_off], expect, rtol=1e-6)


def test_cpu_fake_impls_trace():
    _cpu_ops_or_skip()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafusion.multi import ops

    seg = AdapterSegments([0, 0, 1, -1], {"a": AdapterSpec(2, 2), "b": AdapterSpec(3, 3)})
    t = seg.tables("cpu")
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(4, 8))
        w = mode.from_tensor(torch.randn(5, 8))
        tt = copy.copy(t)  # the layout with fake tables
        for name in ("seg", "slot", "slot_p", "slot_scale"):
            setattr(tt, name, mode.from_tensor(getattr(t, name)))
        S = ops.shrink(x, w, tt, 1, True, False)
        assert S.shape == (t.s_numel,) and S.dtype == torch.float32
        G = ops.grad(S, x, tt, 1, True, False)
        assert G.shape == (5, 8)
        dx = mode.from_tensor(torch.randn(4, 8))
        assert ops.grad_a_expand_dx_(dx, S, x, w, tt, 1, True).shape == (5, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_grad_a_expand_dx_store_mode(dtype):
    """accumulate=False stores D'(dS A) (the backend then adds dY W on top): rows with an adapter equal the term
    added onto zeros, rows of no adapter are zeroed even where dx held garbage, and dA does not depend on the mode."""
    _cpu_ops_or_skip()
    from lorafusion.multi import ops

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    sp = {"a": AdapterSpec(3, 6.0, 0.3), "b": AdapterSpec(5, 5.0, 0.0)}
    ids = [-1] * 3 + [0] * 40 + [-1] * 7 + [1] * 33 + [0] * 9 + [-1] * 2
    T, K = len(ids), 70
    t = AdapterSegments(ids, sp).tables("cpu")
    x = torch.randn(T, K, generator=g).to(dtype)
    A_cat = torch.randn(t.total_rank, K, generator=g)
    dS = torch.randn(t.s_numel, generator=g)
    added = torch.zeros(T, K, dtype=dtype)
    dA_add = ops.grad_a_expand_dx_(added, dS, x, A_cat, t, 11, True, True)
    stored = torch.full((T, K), float("nan"), dtype=dtype)
    dA_store = ops.grad_a_expand_dx_(stored, dS, x, A_cat, t, 11, True, False)
    assert torch.equal(stored, added)
    assert torch.equal(stored[torch.tensor(ids) == -1], torch.zeros(12, K, dtype=dtype))
    assert not torch.equal(stored[torch.tensor(ids) != -1], torch.zeros(T - 12, K, dtype=dtype))
    assert torch.equal(dA_store, dA_add)


def test_cpu_ops_reject_a_layout_that_does_not_fit_the_tensors():
    """The C++ ops index raw pointers with the layout's numbers: a segment past the tensor's rows, a slot past the
    stacked weights or the flat buffer is a clear error (it once wrote past the end: a segfault)."""
    _cpu_ops_or_skip()
    from lorafusion.multi import ops

    t = AdapterSegments([0] * 64, {"a": AdapterSpec(4, 8.0, 0.1)}).tables("cpu")  # a 64-row layout
    x8 = torch.randn(8, 16)
    w = torch.randn(4, 16)
    tabs = (t.seg, t.slot, t.slot_p, t.slot_scale)
    lf = torch.ops.lorafusion
    # the C++ ops themselves, called directly (the Python primitives check first, see the next test)
    with pytest.raises(RuntimeError, match=r"segment 0 covers rows \[0, 64\) of a tensor with 8 rows"):
        lf.multi_lora_shrink(x8, w, *tabs, t.s_numel, 1, True, False)
    with pytest.raises(RuntimeError, match="covers rows"):
        lf.multi_lora_expand_add_(torch.zeros(8, 16, dtype=torch.float16), torch.randn(t.s_numel), w, *tabs, 1,
                                  True, True)
    with pytest.raises(RuntimeError, match="covers rows"):
        lf.multi_lora_grad(torch.randn(t.s_numel), x8, *tabs, t.total_rank, 1, True, False)
    with pytest.raises(RuntimeError, match="covers rows"):
        lf.multi_lora_grad_a_expand_dx_(torch.zeros(8, 16), torch.randn(t.s_numel), x8, w, *tabs, t.total_rank, 1,
                                        True, True)
    x64 = torch.randn(64, 16)
    with pytest.raises(RuntimeError, match=r"slot 0 needs rows \[0, 4\) of the stacked adapter weights, which have 2"):
        lf.multi_lora_shrink(x64, w[:2], *tabs, t.s_numel, 1, True, False)
    with pytest.raises(RuntimeError, match="of a flat buffer of 10"):
        lf.multi_lora_grad(torch.randn(10), x64, *tabs, t.total_rank, 1, True, False)
    # tables of the wrong shape or type, named by the op (the same header check the CUDA ops make)
    for bad, match in (((t.seg[:, :3], t.slot, t.slot_p, t.slot_scale), r"seg must be an \(n_seg x 4\) int64"),
                       ((t.seg, t.slot.int(), t.slot_p, t.slot_scale), r"slot must be an \(n_slot x 3\) int64"),
                       ((t.seg, t.slot, t.slot_p.repeat(2), t.slot_scale),
                        r"slot_p / slot_scale need one entry per slot \(1\), got 2 and 1")):
        with pytest.raises(RuntimeError, match="multi_lora_shrink: " + match):
            lf.multi_lora_shrink(x64, w, *bad, t.s_numel, 1, True, False)
        with pytest.raises(RuntimeError, match="multi_lora_grad_a_expand_dx_: " + match):
            lf.multi_lora_grad_a_expand_dx_(torch.zeros(64, 16), torch.randn(t.s_numel), x64, w, *bad, t.total_rank,
                                            1, True, True)


def test_primitives_reject_a_layout_of_another_microbatch():
    """The primitives every device shares (C++ / CUDA ops and Triton kernels) check the tensors against the
    layout's host numbers before launching: the CUDA and Triton kernels have no bounds checks of their own."""
    _cpu_ops_or_skip()
    from lorafusion.multi import ops

    t = AdapterSegments([0] * 64, {"a": AdapterSpec(4, 8.0, 0.1)}).tables("cpu")
    x8, x64, w = torch.randn(8, 16), torch.randn(64, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="multi_lora_shrink: the layout covers 64 rows, the tensor has 8"):
        ops.shrink(x8, w, t, 1, True, False)
    with pytest.raises(ValueError, match="multi_lora_expand_add_: the layout covers 64 rows"):
        ops.expand_add_(torch.zeros(8, 16), torch.randn(t.s_numel), w, t, 1, True, True)
    with pytest.raises(ValueError, match="multi_lora_grad: the layout covers 64 rows"):
        ops.grad(torch.randn(t.s_numel), x8, t, 1, True, False)
    with pytest.raises(ValueError, match="multi_lora_grad_a_expand_dx_: the layout covers 64 rows"):
        ops.grad_a_expand_dx_(torch.zeros(8, 16), torch.randn(t.s_numel), x8, w, t, 1, True)
    with pytest.raises(ValueError, match="stack 4 rank rows, the stacked weights have 2"):
        ops.shrink(x64, w[:2], t, 1, True, False)
    with pytest.raises(ValueError, match="flat rank-r buffer of 256 elements, got 10"):
        ops.grad(torch.randn(10), x64, t, 1, True, False)
    with pytest.raises(ValueError, match="the layout's tables are on cpu, the tensors on meta"):
        t.check_operands("op", torch.device("meta"), rows=64)
    t.check_operands("op", torch.device("cpu"), rows=64, w_rows=4, flat=256)  # a fitting call passes


def test_cpu_dropout_scale_is_exact_at_p_near_one():
    """1 / (1 - p) from p in float64 (a float32 p put the scale 1.3e-5 off at p = 0.999)."""
    _cpu_ops_or_skip()
    from lorafusion.multi import ops, torch_ops

    seg = AdapterSegments([0] * 300, {"a": AdapterSpec(2, 2.0, 0.999)})
    t = seg.tables("cpu")
    x = torch.randn(300, 64, dtype=torch.float64)
    w = torch.randn(2, 64, dtype=torch.float64)
    got = ops.shrink(x.float(), w.float(), t, 77, True, False).double()
    want = torch_ops.shrink(x, w, t, 77, True, False)
    assert want.abs().max() > 0 and ((got - want).norm() / want.norm()).item() < 2e-6


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_seed_above_2_63_is_the_reference_seed(backend):
    """A uint64 seed with the high bit set masks as the reference does (it was once cut to 63 bits)."""
    if backend == "cpu":
        _cpu_ops_or_skip()
    from lorafusion.multi.function import multi_lora_linear

    torch.manual_seed(4)
    spec = {"a": AdapterSpec(4, 8.0, 0.5)}
    seg = AdapterSegments([0] * 12, spec)
    x = torch.randn(12, 24)
    W, b = torch.randn(20, 24) / 5, torch.randn(20)
    A, B = torch.randn(4, 24) / 5, torch.randn(20, 4)
    for seed in (2**63 + 5, 2**64 - 1):
        y = multi_lora_linear(x, W, b, {"a": (A, B)}, seg, training=True, backend=backend, seed=seed)
        yr = multi_lora_reference(x.double(), W.double(), b.double(), {"a": (A.double(), B.double())}, seg, seed=seed)
        assert ((y.double() - yr).norm() / yr.norm()).item() < 1e-5, seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_long_segments_split_across_worker_threads(dtype, threads):
    """Segments of more than one 256-row chunk are split over worker threads (each masks its chunks into its own
    scratch and reduces its own dA / dB partial). Forward and every gradient match the float64 reference at 1, 2
    and 3 threads, with masked, unmasked and ragged segments; the same thread count gives bit-identical results."""
    _cpu_ops_or_skip()
    rng = np.random.default_rng(zlib.crc32(repr(("long segments", str(dtype), threads)).encode()))
    specs = {"a": AdapterSpec(8, 16.0, 0.1), "b": AdapterSpec(5, 5.0, 0.0), "c": AdapterSpec(16, 32.0, 0.3)}
    ids = [0] * 1100 + [-1] * 5 + [1] * 600 + [2] * 300 + [0] * 257 + [2] * 513
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference("cpu", dtype, len(ids), 96, 80, specs, ids, seed=int(rng.integers(1 << 40)))
        seg = AdapterSegments(ids, specs)
        from lorafusion.multi import ops

        t = seg.tables("cpu")
        g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        x = torch.randn(len(ids), 96, generator=g).to(dtype)
        A_cat = torch.randn(t.total_rank, 96, generator=g)
        runs = []
        for _ in range(2):
            S = ops.shrink(x, A_cat, t, 77, True, False)
            dx = torch.zeros_like(x)
            dA = ops.grad_a_expand_dx_(dx, S, x, A_cat, t, 77, True, False)
            runs.append((S, dx, dA, ops.grad(S, x, t, 77, True, False)))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_call_under_inference_mode_leaves_the_multi_layer_trainable(dtype):
    """The C++ ops keep a per-thread float32 scratch tensor between calls, grown when too small. Grown during a call
    under torch.inference_mode() (an eval pass), it was an inference tensor, and the next training step failed
    writing to it. A width above any the tests use forces it to grow in the inference call; the training step
    after it must run and match the float64 reference. The layout's device tables, first made in that call, are
    reused by it too."""
    _cpu_ops_or_skip()
    from torch import nn

    from lorafusion.multi import MultiLoRALinear

    K, N = 37, 6000 + int(torch.randint(0, 200, ()))
    layer = MultiLoRALinear(nn.Linear(K, N).to(dtype), backend="cpu")
    layer.add_adapter("a", 4, 8.0, 0.1)
    layer.add_adapter("b", 2, 4.0)
    with torch.no_grad():
        for n in "ab":
            layer.lora_B[n].normal_()
    seg = layer.make_segments(["a"] * 70 + [None] * 5 + ["b"] * 60)
    x = torch.randn(135, K).to(dtype)
    with torch.inference_mode():
        layer(x, segments=seg)
    xg = x.clone().requires_grad_()
    torch.manual_seed(5)
    y = layer(xg, segments=seg)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    ad = {n: (layer.lora_A[n].detach().double().requires_grad_(), layer.lora_B[n].detach().double().requires_grad_())
          for n in "ab"}
    torch.manual_seed(5)
    from lorafusion.function import draw_dropout_seed

    want = multi_lora_reference(x64, layer.base.weight.double(), layer.base.bias.double(), ad, seg,
                                seed=draw_dropout_seed(x.device))
    want.backward(dy.double())
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for got, ref64 in [(y, want.detach()), (xg.grad, x64.grad)] + [
            (getattr(layer, f"lora_{w}")[n].grad, ad[n][i].grad) for n in "ab" for i, w in enumerate("AB")]:
        assert ((got.double() - ref64).norm() / ref64.norm()).item() < tol
