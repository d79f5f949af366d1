"""MultiLoRALinear: the layer against the reference, isolation between adapters (gradients, parameters, optimizer
state), adding / removing adapters at run time, eval mode, reproducibility."""
import pytest
import torch
from torch import nn

from lorafusion.multi import MultiLoRALinear, multi_lora_reference


def _layer(backend="reference"):
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(24, 20), backend=backend)
    for name, r, p in (("a", 4, 0.1), ("b", 8, 0.0), ("c", 2, 0.3)):
        layer.add_adapter(name, r, 2 * r, p)
        with torch.no_grad():
            layer.lora_B[name].normal_()
    return layer


def _backend():
    from lorafusion.multi import ops

    return "cpu" if ops.cpp_ops_reason() is None else "reference"


def test_layer_matches_reference_3d_input():
    layer = _layer(_backend())
    seg = layer.make_segments(["a"] * 6 + [None] * 2 + ["c"] * 4 + ["a"] * 3)  # b absent
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x, segments=seg)
    torch.manual_seed(11)  # the same seed draw
    from lorafusion.function import draw_dropout_seed

    seed = draw_dropout_seed(x.device)
    x64 = x.detach().double()
    ad = {n: (layer.lora_A[n].detach().double(), layer.lora_B[n].detach().double()) for n in "abc"}
    yr = multi_lora_reference(x64, layer.base.weight.double(), layer.base.bias.double(), ad, seg, seed=seed)
    assert y.shape == (3, 5, 20)
    assert (y.double() - yr).norm() / yr.norm() < 1e-5


def test_isolation_gradients_params_and_optimizer_state():
    layer = _layer(_backend())
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(10, 24)
    # step 1: every adapter trains once so each has optimizer state
    layer(x, segments=layer.make_segments(["a"] * 3 + ["b"] * 4 + ["c"] * 3)).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in layer.parameters() if p in opt.state}
    # step 2: only adapter a has rows
    layer(x, segments=layer.make_segments(["a"] * 7 + [None] * 3)).square().sum().backward()
    for n in ("b", "c"):
        assert layer.lora_A[n].grad is None and layer.lora_B[n].grad is None
    assert layer.lora_A["a"].grad.abs().sum() > 0 and layer.lora_B["a"].grad.abs().sum() > 0
    assert layer.base.weight.grad is None
    opt.step()  # AdamW skips params whose grad is None: their values and state stay bit-identical
    for n in ("b", "c"):
        for d in (layer.lora_A, layer.lora_B):
            p = d[n]
            assert torch.equal(p, before[f"lora_{'A' if d is layer.lora_A else 'B'}.{n}"])
            for k, v in opt.state[p].items():
                assert torch.equal(v, state_before[id(p)][k]), f"optimizer state {k} of {n} changed"
    assert not torch.equal(layer.lora_A["a"], before["lora_A.a"])

    # rows of b inside a batch where a has zero rows: a's gradient exactly zero / absent
    opt.zero_grad(set_to_none=False)  # zeroed tensors, not None
    layer(x, segments=layer.make_segments(["b"] * 10)).sum().backward()
    assert torch.count_nonzero(layer.lora_A["a"].grad) == 0 and torch.count_nonzero(layer.lora_B["a"].grad) == 0
    assert layer.lora_B["c"].grad is None  # never in a graph since it was cleared


def test_add_and_remove_adapters_at_run_time():
    layer = _layer(_backend())
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x = torch.randn(8, 24)
    layer(x, segments=layer.make_segments(["a", "b", "c", "a", "b", "c", "a", "b"])).sum().backward()
    opt.step()
    snapshot = {n: p.detach().clone() for n, p in layer.named_parameters()}
    mom = {n: opt.state[p]["momentum_buffer"].clone() for n, p in layer.named_parameters() if p in opt.state}
    A_c, B_c = layer.remove_adapter("c")
    layer.add_adapter("d", 16, 16, 0.05)
    assert list(layer.adapter_specs) == ["a", "b", "d"]
    for n, p in layer.named_parameters():
        if n in snapshot:
            assert torch.equal(p, snapshot[n])
            if n in mom:
                assert torch.equal(opt.state[p]["momentum_buffer"], mom[n])
    assert "lora_A.c" not in dict(layer.named_parameters())
    y = layer(x, segments=layer.make_segments(["d"] * 4 + ["a"] * 4))
    y.sum().backward()
    assert layer.lora_B["d"].grad is not None
    # 'c' can come back under the same name
    layer.add_adapter("c", 2, 4)
    with pytest.raises(ValueError, match="duplicate adapter name 'c'"):
        layer.add_adapter("c", 2, 4)


def test_eval_disables_dropout_and_seed_reproduces():
    layer = _layer(_backend())
    seg = layer.make_segments(["c"] * 12)  # p = 0.3
    x = torch.randn(12, 24)
    torch.manual_seed(5)
    y1 = layer(x, segments=seg)
    torch.manual_seed(5)
    y2 = layer(x, segments=seg)
    y3 = layer(x, segments=seg)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    layer.eval()
    e1, e2 = layer(x, segments=seg), layer(x, segments=seg)
    assert torch.equal(e1, e2)
    x64 = x.double()
    ad = {"c": (layer.lora_A["c"].detach().double(), layer.lora_B["c"].detach().double())}
    yr = multi_lora_reference(x64, layer.base.weight.double(), layer.base.bias.double(), ad, seg, training=False)
    assert (e1.double() - yr).norm() / yr.norm() < 1e-5


def test_rows_without_adapter_get_base_output_exactly():
    layer = _layer("reference")
    x = torch.randn(6, 24)
    y = layer(x, segments=layer.make_segments([None, "a", None, "b", None, None]))
    base = layer.base(x)
    assert torch.equal(y[[0, 2, 4, 5]], base[[0, 2, 4, 5]])


@pytest.mark.parametrize("backend", [None, "reference"])
def test_float64_layer_keeps_float64_accuracy(backend):
    """float64 input (which auto sends to the reference backend; the C++ / Triton kernels accumulate in float32)
    keeps float64 adapters (they were once rounded to float32: 5e-8)."""
    from lorafusion.multi.function import multi_lora_linear

    layer = MultiLoRALinear(nn.Linear(24, 20).double(), backend=backend)
    layer.add_adapter("a", 4, 8, dropout=0.2)
    layer.add_adapter("b", 2, 4)
    with torch.no_grad():
        for n in "ab":
            layer.lora_B[n].normal_()
    seg = layer.make_segments(["a"] * 5 + ["b"] * 3 + [None] * 2)
    x = torch.randn(10, 24, dtype=torch.float64)
    adapters = {n: (layer.lora_A[n], layer.lora_B[n]) for n in "ab"}
    y = multi_lora_linear(x, layer.base.weight, layer.base.bias, adapters, seg, training=True, backend=backend,
                          seed=123)
    ad = {n: (a.detach(), b.detach()) for n, (a, b) in adapters.items()}
    yr = multi_lora_reference(x, layer.base.weight, layer.base.bias, ad, seg, seed=123)
    assert y.dtype == torch.float64
    assert (y.detach() - yr).norm() / yr.norm() < 1e-12


def test_double_backward_is_a_clear_error():
    """create_graph=True through the multi-adapter layer raises instead of giving wrong second-order gradients."""
    layer = MultiLoRALinear(torch.nn.Linear(8, 6))
    layer.add_adapter("a", 2, 4.0)
    layer.add_adapter("b", 3, 3.0)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(10, 8, requires_grad=True)
    seg = layer.make_segments(["a"] * 6 + ["b"] * 4)
    with pytest.raises(RuntimeError, match="multi-adapter LoRA layer's backward .* not itself differentiable"):
        torch.autograd.grad(layer(x, seg).pow(2).sum(), [x, layer.lora_A["a"]], create_graph=True)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("cpu", torch.float32),
                                            ("cpu", torch.float16), ("triton", torch.float32),
                                            ("triton", torch.float16)])
def test_ranks_above_the_layer_width_as_peft_allows(backend, dtype):
    """A 1-output gate (Qwen2-MoE's shared_expert_gate) under an all-linear adapter: r > min(in, out) is rank-deficient
    but valid, as in PEFT; every backend matches the float64 reference."""
    from multi_helpers import check_against_reference
    from lorafusion.multi import AdapterSpec
    if backend == "cpu":
        from lorafusion.multi import ops
        if ops.cpp_ops_reason() is not None:
            pytest.skip(ops.cpp_ops_reason())
    if backend == "triton":
        pytest.importorskip("triton")
    specs = {"a": AdapterSpec(8, 16.0, 0.1), "b": AdapterSpec(3, 3.0)}
    check_against_reference(backend, dtype, 13, 5, 1, specs, [0] * 6 + [1] * 4 + [-1] * 3)
    layer = MultiLoRALinear(torch.nn.Linear(5, 1))
    layer.add_adapter("a", 8, 16)
    assert layer.lora_B["a"].shape == (1, 8)
    with pytest.raises(ValueError, match=r"r=300 out of range: must be an int in \[1, 256\]"):
        layer.add_adapter("big", 300, 16)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_functional_api_refuses_factors_whose_rank_differs_from_the_layout(backend):
    """The kernels slice the stacked factors by the layout's ranks: rank-8 tensors for an adapter the layout calls
    rank 4 would hand the next adapter's rows the first one's weights (silently; seen before this check). Every
    backend refuses them, naming the adapter and both shapes; the right shapes run."""
    from lorafusion.multi import AdapterSegments, AdapterSpec, multi_lora_linear
    from lorafusion.multi import ops

    if backend == "cpu" and ops.cpp_ops_reason() is not None:
        pytest.skip(f"C++ ops not built: {ops.cpp_ops_reason()}")
    seg = AdapterSegments(["a"] * 3 + ["b"] * 4, {"a": AdapterSpec(4, 8.0), "b": AdapterSpec(2, 4.0)})
    x, W = torch.randn(7, 16), torch.randn(12, 16)
    good = {"a": (torch.randn(4, 16), torch.randn(12, 4)), "b": (torch.randn(2, 16), torch.randn(12, 2))}
    y = multi_lora_linear(x, W, None, good, seg, backend=backend)
    ref = multi_lora_reference(x.double(), W.double(), None,
                               {n: (A.double(), B.double()) for n, (A, B) in good.items()}, seg)
    assert (y.double() - ref).norm() / ref.norm() < 1e-5
    for bad in ({"a": (torch.randn(8, 16), torch.randn(12, 8)), "b": good["b"]},   # rank 8 for a rank-4 adapter
                {"a": good["a"], "b": (torch.randn(2, 15), torch.randn(12, 2))},   # A of another in-width
                {"a": good["a"], "b": (torch.randn(2, 16), torch.randn(11, 2))},   # B of another out-width
                {"a": good["a"], "b": (torch.randn(2, 16),)}):                     # not a pair
        with pytest.raises(ValueError, match=r"adapter '[ab]' \(rank [42] in the layout, on a 16 -> 12 linear\)"):
            multi_lora_linear(x, W, None, bad, seg, backend=backend)


def test_functional_api_refuses_weights_on_another_device_or_of_wrong_shapes():
    from lorafusion.multi import AdapterSegments, AdapterSpec, multi_lora_linear

    seg = AdapterSegments(["a"] * 3 + [None] * 2, {"a": AdapterSpec(2, 4.0)})
    x, W, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    ad = {"a": (torch.randn(2, 8), torch.randn(6, 2))}
    with pytest.raises(ValueError, match="adapter 'a': its weights are on meta but the input is on cpu"):
        multi_lora_linear(x, W, b, {"a": (ad["a"][0].to("meta"), ad["a"][1])}, seg, backend="reference")
    with pytest.raises(ValueError, match="multi_lora_linear: weight is on meta but the input is on cpu"):
        multi_lora_linear(x, W.to("meta"), b, ad, seg, backend="reference")
    with pytest.raises(ValueError, match="multi_lora_linear: shapes do not chain"):
        multi_lora_linear(x, W, b[:5], ad, seg, backend="reference")
    with pytest.raises(ValueError, match="multi_lora_linear: shapes do not chain"):
        multi_lora_linear(x[:, :7], W, b, ad, seg, backend="reference")
    with pytest.raises(TypeError, match="multi_lora_linear: weight must be a torch.Tensor, got list"):
        multi_lora_linear(x, W.tolist(), b, ad, seg, backend="reference")
    with pytest.raises(TypeError, match="multi_lora_linear: x must be a torch.Tensor, got ndarray"):
        multi_lora_linear(x.numpy(), W, b, ad, seg, backend="reference")
