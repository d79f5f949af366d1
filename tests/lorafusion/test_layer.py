"""FusedLoRALinear and the autograd Function, on every backend that runs on this machine, against float64."""
import math

import pytest
import torch
from torch import nn

import lorafusion
from lorafusion import FusedLoRALinear, fused_lora_linear
from lorafusion.backends import available_backends
from lorafusion.reference import dropout_keep_mask, lora_linear_reference, lora_scale

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _cpu_backends():
    out = []
    for name, status in available_backends().items():
        if status != "available":
            continue
        mod = lorafusion.get_backend("cpu", name) if name in ("cpu", "reference") else None
        if name == "triton":
            from lorafusion.backends import triton_backend
            if "cpu" in triton_backend.DEVICE_TYPES:
                out.append(name)
            continue
        if mod is not None:
            out.append(name)
    return out


BACKENDS = _cpu_backends()


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert not math.isnan(err), "NaN in output"
    return err


def _make(T, fin, fout, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, fin, generator=g)
    w = torch.randn(fout, fin, generator=g) / fin**0.5
    b = torch.randn(fout, generator=g) if bias else None
    a = torch.randn(r, fin, generator=g) / fin**0.5
    bb = torch.randn(fout, r, generator=g) / r**0.5
    dy = torch.randn(T, fout, generator=g)
    return x, w, b, a, bb, dy


def _grads(fn, x, w, b, a, bb, dy, dtype):
    leaves = [t.to(dtype).detach().requires_grad_(t is not w and t is not b) if t is not None else None
              for t in (x, w, b, a, bb)]
    y = fn(*leaves)
    y.backward(dy.to(dtype).reshape(y.shape))
    return y.detach(), leaves[0].grad, leaves[3].grad, leaves[4].grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,fin,fout,r,p,bias", [
    (1, 100, 300, 1, 0.0, True),
    (7, 33, 17, 8, 0.1, False),
    (133, 100, 300, 16, 0.1, True),
    (64, 72, 40, 16, 0.0, False),
    (256, 72, 40, 4, 0.0, True),  # cpu backend: the merged-weight path (T >= 8 r, p == 0, fp32)
])
def test_function_matches_float64(backend, dtype, T, fin, fout, r, p, bias):
    x, w, b, a, bb, dy = _make(T, fin, fout, r, dtype, bias, seed=T * 7 + r)
    s = lora_scale(r, 2 * r)
    seed = 12345 + T

    def fused(xx, ww, bb_, aa, bbb):
        return fused_lora_linear(xx, ww, bb_, aa, bbb, s, p, backend=backend, seed=seed)

    def ref(xx, ww, bb_, aa, bbb):
        return lora_linear_reference(xx, ww, bb_, aa, bbb, s, p, seed)

    y, dx, da, db = _grads(fused, x, w, b, a, bb, dy, dtype)
    # The reference sees the inputs rounded to dtype, then computes in float64.
    rx, rw, rb, ra, rbb = (t.to(dtype).double() if t is not None else None for t in (x, w, b, a, bb))
    y64, dx64, da64, db64 = _grads(ref, rx, rw, rb, ra, rbb, dy.to(dtype), torch.float64)
    tol = TOL[dtype]
    assert rel_err(y, y64) < tol
    assert rel_err(dx, dx64) < tol
    assert rel_err(da, da64) < tol
    assert rel_err(db, db64) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_3d_noncontiguous_and_rank64(backend):
    torch.manual_seed(3)
    base = nn.Linear(96, 80)
    layer = FusedLoRALinear(base, r=64, alpha=16, dropout=0.2, use_rslora=True, backend=backend)
    nn.init.normal_(layer.lora_B)
    assert layer.scale == pytest.approx(16 / 8)
    x_full = torch.randn(3, 96, 11)
    x = x_full.transpose(1, 2)  # (3, 11, 96), non-contiguous
    assert not x.is_contiguous()
    x.requires_grad_(True)
    layer.train()
    seed = 99
    y = fused_lora_linear(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scale, 0.2, backend, seed=seed)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_(True)
    ar = layer.lora_A.detach().double().requires_grad_(True)
    br = layer.lora_B.detach().double().requires_grad_(True)
    yr = lora_linear_reference(xr, base.weight.double(), base.bias.double(), ar, br, layer.scale, 0.2, seed)
    yr.backward(dy.double())
    assert y.shape == (3, 11, 80)
    for got, want in [(y, yr), (x.grad, xr.grad), (layer.lora_A.grad, ar.grad), (layer.lora_B.grad, br.grad)]:
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_and_mask_consistent(backend):
    base = nn.Linear(64, 48)
    layer = FusedLoRALinear(base, r=8, alpha=8, dropout=0.5, backend=backend)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(40, 64)
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    y3 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y2, y3)
    layer.eval()
    y_eval = layer(x)
    ref = lora_linear_reference(x.double(), base.weight.double(), base.bias.double(), layer.lora_A.double(),
                                layer.lora_B.double(), layer.scale, 0.0)
    assert rel_err(y_eval, ref) < 1e-5


def test_keep_rate_matches_p():
    for p in (0.1, 0.5, 0.9):
        n = 400 * 500
        keep = dropout_keep_mask(2024, 400, 500, p).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(keep - (1 - p)) < 5 * sigma, (p, keep)


def test_fresh_layer_equals_base_and_merge_roundtrip():
    torch.manual_seed(0)
    base = nn.Linear(50, 70)
    layer = FusedLoRALinear(base, r=4, alpha=8)
    x = torch.randn(9, 50)
    assert torch.allclose(layer(x), base(x))
    nn.init.normal_(layer.lora_B)
    w0 = base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), y) < 1e-5
    with layer.adapter_disabled():
        assert rel_err(layer(x), x @ w0.t() + base.bias) < 1e-5
    layer.unmerge()
    assert rel_err(base.weight, w0) < 1e-6
    with layer.adapter_disabled():
        assert torch.allclose(layer(x), base(x))
    assert layer.adapter_params() == ["lora_A", "lora_B"]
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_bad_input_errors_name_the_value():
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLoRALinear(nn.Conv1d(3, 3, 1), r=1, alpha=1)
    with pytest.raises(ValueError, match="r=0"):
        FusedLoRALinear(nn.Linear(8, 8), r=0, alpha=1)
    with pytest.raises(ValueError, match="r=9"):
        FusedLoRALinear(nn.Linear(8, 16), r=9, alpha=1)
    with pytest.raises(ValueError, match="dropout=1.0"):
        FusedLoRALinear(nn.Linear(8, 8), r=2, alpha=1, dropout=1.0)
    with pytest.raises(ValueError, match="backend='gpu'"):
        FusedLoRALinear(nn.Linear(8, 8), r=2, alpha=1, backend="gpu")
    layer = FusedLoRALinear(nn.Linear(8, 8), r=2, alpha=1)
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("T", [4, 300])  # 300: the cpu backend's merged-weight path (p = 0, T >= 8 r) runs torch ops
def test_autocast_runs_like_nn_linear_under_autocast(T):
    """Under torch.autocast (CPU, bf16) the layer computes in bf16 as nn.Linear does, returns bf16, and its backward
    works (it once returned fp32 or bf16 depending on T, and backward then failed on mixed dtypes)."""
    torch.manual_seed(T)
    layer = FusedLoRALinear(nn.Linear(64, 48), r=4, alpha=8)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(T, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y2 = layer(y.new_ones(T, 64, dtype=torch.bfloat16))  # bf16 input over fp32 weights: accepted, as nn.Linear
    assert y.dtype == torch.bfloat16 and y2.dtype == torch.bfloat16
    y.float().square().sum().backward()
    # the reference: the same math in float64 on the bf16-rounded operands, adapters kept fp32 (as the kernels do)
    xr = x.detach().bfloat16().double().requires_grad_()
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    W, b = layer.base.weight.detach().bfloat16().double(), layer.base.bias.detach().bfloat16().double()
    ref = lora_linear_reference(xr, W, b, A, B, layer.scale, 0.0, 0)
    ref.square().sum().backward()
    rel = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
    assert rel(y.detach(), ref.detach()) < 1e-2
    assert rel(x.grad, xr.grad) < 2e-2 and rel(layer.lora_A.grad, A.grad) < 2e-2
    assert layer.lora_A.grad.dtype == torch.float32


def test_disabled_adapter_on_a_merged_layer_gets_no_gradient():
    torch.manual_seed(3)
    layer = FusedLoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(5, 16, requires_grad=True)
    base_out = layer.base(x).detach()
    layer.merge()
    with layer.adapter_disabled():
        y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), base_out, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad is None and layer.lora_B.grad is None


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in BACKENDS])
@pytest.mark.parametrize("T", [5, 64])  # the C++ ops, and (cpu, p = 0, >= 8 r tokens) the merged-weight path
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_float64_gradients_are_float64_exact(backend, T, p):
    """In float64 every gradient agrees with plain float64 autograd to ~1e-15 (the reference backend once rounded B
    to float32 in backward: errors of 1e-8)."""
    from lorafusion.reference import apply_dropout

    torch.manual_seed(T)
    W, b = torch.randn(24, 32, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    A = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    B = torch.randn(24, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(T, 32, dtype=torch.float64, requires_grad=True)
    seed = 1234
    fused_lora_linear(x, W, b, A, B, 2.0, p=p, backend=backend, seed=seed).pow(2).sum().backward()
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = nn.functional.linear(x2, W, b) + 2.0 * (apply_dropout(x2, seed, p) @ A2.t() @ B2.t())
    y.pow(2).sum().backward()
    for name, got, want in (("dx", x.grad, x2.grad), ("dA", A.grad, A2.grad), ("dB", B.grad, B2.grad)):
        assert got.dtype == torch.float64
        assert rel_err(got, want) < 1e-12, (name, rel_err(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_a_clear_error(backend):
    """The fused backward is not differentiable: create_graph=True (gradient penalties, MAML) raises, naming the
    layer, instead of returning second-order gradients that were 20-50% off."""
    layer = FusedLoRALinear(nn.Linear(8, 6), r=2, alpha=2, backend=backend)
    x = torch.randn(64, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="not itself differentiable.*create_graph=True"):
        torch.autograd.grad(layer(x).pow(2).sum(), [x, layer.lora_B], create_graph=True)
    gx, = torch.autograd.grad(layer(x).pow(2).sum(), [x])  # first order stays fine
    assert torch.isfinite(gx).all()


def test_a_quantized_linear_subclass_as_base_is_a_clear_type_error():
    """bitsandbytes' Linear8bitLt / Linear4bit are nn.Linear subclasses holding integer weights: a TypeError naming
    the class and dtype (it failed deep in __init__ creating the adapter parameters)."""
    class Int8Linear(nn.Linear):
        def __init__(self, fin, fout):
            super().__init__(fin, fout)
            self.weight = nn.Parameter(torch.randint(-8, 8, (fout, fin), dtype=torch.int8), requires_grad=False)

    bases = [Int8Linear(16, 12)]
    try:
        import bitsandbytes as bnb

        bases += [bnb.nn.Linear8bitLt(16, 12, has_fp16_weights=False).to("cpu"),
                  bnb.nn.Linear4bit(16, 12, compute_dtype=torch.float32).to("cpu")]
    except Exception:  # bitsandbytes is optional here; the stand-in is the same case
        pass
    for base in bases:
        if base.weight.is_floating_point():  # a bitsandbytes build that keeps float weights on the CPU
            continue
        with pytest.raises(TypeError, match=rf"FusedLoRALinear: base {type(base).__name__} holds a .* weight"):
            FusedLoRALinear(base, r=2, alpha=4)
        with pytest.raises(TypeError, match=rf"MultiLoRALinear: base {type(base).__name__} holds a"):
            lorafusion.MultiLoRALinear(base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_api_refuses_a_bad_dropout_or_scale_on_every_backend(backend):
    """The backends disagreed on a bad p: the reference scaled by 1 / (1 - p) for p < 0 and gave the base alone for
    p >= 1, the C++ ops raised. Now every backend raises the same ValueError, naming the value."""
    x, w, b, a, bb, _ = _make(5, 8, 6, 2, torch.float32)
    for p in (-0.1, 1.0, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=rf"dropout p must be a number in \[0, 1\), got {p!r}"):
            fused_lora_linear(x, w, b, a, bb, 2.0, p, backend=backend)
    for scale in (float("inf"), float("nan"), "2", None):
        with pytest.raises(ValueError, match=rf"scale must be a finite number, got {scale!r}"):
            fused_lora_linear(x, w, b, a, bb, scale, 0.0, backend=backend)
    y = fused_lora_linear(x, w, b, a, bb, 2.0, 0.0, backend=backend)  # the good call runs
    assert torch.allclose(y, lora_linear_reference(x, w, b, a, bb, 2.0), rtol=1e-5, atol=1e-5)


def test_a_fallback_to_a_slower_backend_is_printed_without_any_logging_setup(tmp_path):
    """With the extension missing, importing the package and running a layer prints (stderr, no logging set up)
    that the extension is unavailable and that the reference backend runs instead of the cpu one, once each; the
    usual choice (no fallback) prints nothing."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['lorafusion._C'] = None\n"
            "import torch, lorafusion\n"
            "l = lorafusion.FusedLoRALinear(torch.nn.Linear(8, 8), 2, 4)\n"
            "l(torch.randn(3, 8)); l(torch.randn(3, 8))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("C++/CUDA extension unavailable") == 1, out.stderr
    assert out.stderr.count("lorafusion: reference backend on cpu (cpu skipped:") == 1, out.stderr
    if lorafusion._ext.EXTENSION_AVAILABLE:
        code = "import torch, lorafusion\nlorafusion.FusedLoRALinear(torch.nn.Linear(8, 8), 2, 4)(torch.randn(3, 8))\n"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0 and "lorafusion" not in out.stderr, out.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_api_refuses_operands_on_another_device_or_of_wrong_shapes(backend):
    """Host-side checks before any kernel: a meta lora_A beside CPU tensors gave no error and no result on the cpu
    backend; shapes that do not chain were the ops' RuntimeError. Both are ValueErrors naming the operand."""
    x, w, b, a, bb, _ = _make(5, 8, 6, 2, torch.float32)
    for name, args in [("lora_A", (x, w, b, a.to("meta"), bb)), ("lora_B", (x, w, b, a, bb.to("meta"))),
                       ("weight", (x, w.to("meta"), b, a, bb)), ("bias", (x, w, b.to("meta"), a, bb))]:
        with pytest.raises(ValueError, match=rf"fused_lora_linear: {name} is on meta but the input is on cpu"):
            fused_lora_linear(*args, 2.0, 0.0, backend=backend)
    for args in [(x[:, :7], w, b, a, bb), (x, w, b, a[:, :7], bb), (x, w, b, a, bb[:5]), (x, w, b, a, bb[:, :1]),
                 (x, w, b[:5], a, bb), (x, w.t(), b, a, bb)]:
        with pytest.raises(ValueError, match="fused_lora_linear: shapes do not chain"):
            fused_lora_linear(*args, 2.0, 0.0, backend=backend)
    with pytest.raises(TypeError, match="lora_B must be a torch.Tensor, got list"):
        fused_lora_linear(x, w, b, a, bb.tolist(), 2.0, 0.0, backend=backend)


def test_a_merged_layers_state_dict_loads_right_into_fresh_and_merged_layers():
    """A merged layer's state dict held W + s B A beside A and B: a fresh layer loading it added the term twice.
    It now holds the unmerged weight (same keys, tensors only), a merged layer loading it merges it again, and an
    unmerged layer's state dict is its live weight, untouched."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    layer = FusedLoRALinear(nn.Linear(24, 20), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 24)
    want = layer(x).detach()
    assert layer.state_dict()["base.weight"].data_ptr() == layer.base.weight.data_ptr()
    plain = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.merge()
    sd = layer.state_dict()
    assert list(sd) == list(plain) and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert rel_err(sd["base.weight"], plain["base.weight"]) < 1e-6  # the unmerged weight, not W + s B A
    assert rel_err(layer.base.weight, plain["base.weight"]) > 1e-2  # while the live one stays merged
    fresh = FusedLoRALinear(nn.Linear(24, 20), r=4, alpha=8)
    fresh.load_state_dict(sd)
    assert not fresh.merged and rel_err(fresh(x), want) < 1e-6
    merged = FusedLoRALinear(nn.Linear(24, 20), r=4, alpha=8)
    merged.merge()
    merged.load_state_dict(sd)
    assert merged.merged and rel_err(merged(x), want) < 1e-6
    merged.unmerge()
    assert rel_err(merged.base.weight, plain["base.weight"]) < 1e-6 and rel_err(merged(x), want) < 1e-6


def test_a_merged_layer_loading_adapter_weights_alone_replaces_its_term():
    """An adapter-only checkpoint (no base.weight, strict=False) into a merged layer added the loaded term to a
    weight that still held the old one (8.0 off in a reviewer's run, and unmerge left a corrupted base)."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    layer = FusedLoRALinear(nn.Linear(24, 20).double(), r=4, alpha=8)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.normal_()
    adapter = {"lora_A": torch.randn(4, 24, dtype=torch.float64), "lora_B": torch.randn(20, 4, dtype=torch.float64)}
    x = torch.randn(6, 24, dtype=torch.float64)
    want = lora_linear_reference(x, w0, layer.base.bias.detach(), adapter["lora_A"], adapter["lora_B"], 2.0)
    layer.merge()
    missing = layer.load_state_dict(adapter, strict=False).missing_keys
    assert sorted(missing) == ["base.bias", "base.weight"] and layer.merged
    assert rel_err(layer(x), want) < 1e-12
    layer.unmerge()
    assert rel_err(layer.base.weight, w0) < 1e-14 and rel_err(layer(x), want) < 1e-12


def test_merge_and_unmerge_keep_a_float64_layer_in_float64():
    """Merging went through float32 whatever the weight's dtype: a float64 layer drifted by 6e-8 per round trip."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    layer = FusedLoRALinear(nn.Linear(24, 20).double(), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(6, 24, dtype=torch.float64)
    want = layer(x).detach()
    layer.merge()
    exact = w0 + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    assert rel_err(layer.base.weight, exact) < 1e-15 and rel_err(layer(x), want) < 1e-13
    layer.unmerge()
    assert rel_err(layer.base.weight, w0) < 1e-15
