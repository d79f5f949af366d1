"""PEFT drop-in: a small Llama built from a config, PEFT LoRA on all linear layers, patched vs PEFT's own layers."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lorafusion  # noqa: E402
from lorafusion.peft_integration import FusedPeftLoraLinear  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def peft_model(seed=0, dropout=0.0, config_cls=LoraConfig, **extra):
    base = tiny_llama(seed)
    cfg = config_cls(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False,
                     **extra)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, cfg)


def _train(model, steps=20, seed=5):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 97, (4, 24), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_patched_training_matches_peft():
    ref = peft_model()
    fused = peft_model()
    report = lorafusion.patch_peft(fused)
    assert len(report["fused"]) == 2 * len(TARGETS) and not report["unfused"]
    assert set(ref.state_dict()) == set(fused.state_dict())
    l_ref, l_fused = _train(ref), _train(fused)
    for a, b in zip(l_ref, l_fused):
        assert abs(a - b) <= 1e-5 * abs(a), (l_ref, l_fused)
    assert l_fused[-1] < l_fused[0]


def test_save_load_roundtrip_and_plain_peft(tmp_path):
    fused = peft_model(seed=3)
    lorafusion.patch_peft(fused)
    _train(fused, steps=3)
    fused.eval()
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        want = fused(input_ids=ids).logits
    fused.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    plain = PeftModel.from_pretrained(tiny_llama(3), tmp_path).eval()
    with torch.no_grad():
        got_plain = plain(input_ids=ids).logits
    lorafusion.patch_peft(plain)
    with torch.no_grad():
        got_fused = plain(input_ids=ids).logits
    assert torch.allclose(got_plain, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_fused, want, rtol=1e-5, atol=1e-5)


def test_custom_module_registration_builds_fused_layers():
    base = tiny_llama(4)
    cfg = lorafusion.fused_lora_config(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(9)
    model = get_peft_model(base, cfg)
    layers = [m for m in model.modules() if isinstance(m, FusedPeftLoraLinear)]
    assert len(layers) == 2 * len(TARGETS)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        fused_out = model(input_ids=ids).logits
        n = lorafusion.unpatch_peft(model)
        plain_out = model(input_ids=ids).logits
    assert n == len(layers)
    assert torch.allclose(fused_out, plain_out, rtol=1e-5, atol=1e-5)


def test_dora_and_multi_adapter_fall_back_with_one_warning():
    model = peft_model(seed=6, use_dora=True)
    with pytest.warns(UserWarning, match="variant"):
        report = lorafusion.patch_peft(model)
    assert not report["fused"] and len(report["unfused"]) == 2 * len(TARGETS)

    model = peft_model(seed=7)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    lorafusion.patch_peft(model)
    ids = torch.randint(0, 97, (2, 5))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter(["default", "second"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        x = torch.randn(3, 48)
        out1 = layer(x)
        out2 = layer(x)
    msgs = [str(w.message) for w in rec if "2 active adapters" in str(w.message)]
    assert len(msgs) == 1 and "q_proj" in msgs[0]
    # the fallback runs PEFT's math: the base plus each active adapter's term
    with torch.no_grad():
        want = layer.get_base_layer()(x) + sum(layer.scaling[a] * (x @ layer.lora_A[a].weight.t())
                                               @ layer.lora_B[a].weight.t() for a in ("default", "second"))
    assert all(not isinstance(layer.lora_dropout[a], torch.nn.Dropout) for a in ("default", "second"))
    torch.testing.assert_close(out1, want)
    torch.testing.assert_close(out2, want)
    del ids


def test_patch_peft_rejects_a_model_without_lora():
    with pytest.raises(ValueError, match="no PEFT LoRA Linear"):
        lorafusion.patch_peft(tiny_llama())
    with pytest.raises(TypeError, match="nn.Module"):
        lorafusion.patch_peft("not a model")


def test_patched_model_trains_under_autocast_without_falling_back():
    model = peft_model(seed=11)
    lorafusion.patch_peft(model, backend="cpu")
    ids = torch.randint(0, 97, (2, 12))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert not [w for w in rec if "lorafusion" in str(w.message)], [str(w.message) for w in rec]
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # the same step through PEFT's own layers under autocast: the loss agrees to bf16 precision
    lorafusion.unpatch_peft(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())


def test_backend_bound_config_pickles_unpatches_and_names_its_layers(tmp_path):
    base = tiny_llama(12)
    cfg = lorafusion.fused_lora_config(backend="cpu", r=4, lora_alpha=8, target_modules=TARGETS,
                                       init_lora_weights=False)
    model = get_peft_model(base, cfg)
    layers = [m for m in model.modules() if isinstance(m, FusedPeftLoraLinear)]
    assert len(layers) == 2 * len(TARGETS) and all(m._lorafusion_backend == "cpu" for m in layers)
    assert layers[0]._lorafusion_name == "model.layers.0.self_attn.q_proj"
    torch.save(model, tmp_path / "m.pt")  # the per-backend class is importable: pickling works
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with warnings.catch_warnings(record=True) as rec:  # a fallback warning names the layer by its path
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError):  # PEFT's own forward then fails on float64 input, as nn.Linear does
            layers[0](torch.randn(3, 48, dtype=torch.float64))
    assert any("layer model.layers.0.self_attn.q_proj runs PEFT's unfused forward" in str(w.message) for w in rec)
    assert lorafusion.unpatch_peft(model) == len(layers)
    assert not any(isinstance(m, FusedPeftLoraLinear) for m in model.modules())


def test_config_leaves_a_subclassed_or_quantized_base_to_peft():
    """An nn.Linear subclass as base (bitsandbytes' 8-bit / 4-bit layers, torchao, ...) gets the LoRA layer PEFT itself
    would pick, not a fused one that could only fall back."""
    import bitsandbytes as bnb
    from peft.tuners.lora.layer import Linear as PeftLinear

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = torch.nn.Linear(32, 32)
            self.q8 = bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=False)

        def forward(self, x):
            return self.q8(self.plain(x))

    kinds = {}
    for cfg in (LoraConfig(r=4, lora_alpha=8, target_modules=["plain", "q8"]),
                lorafusion.fused_lora_config(r=4, lora_alpha=8, target_modules=["plain", "q8"])):
        model = get_peft_model(Net(), cfg)
        kinds[type(cfg._custom_modules).__name__] = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules()
                                                     if n.endswith((".plain", ".q8"))}
    peft_kinds, fused_kinds = kinds["NoneType"], kinds["dict"]
    assert fused_kinds["plain"] is FusedPeftLoraLinear
    assert fused_kinds["q8"] is peft_kinds["q8"] and not issubclass(fused_kinds["q8"], FusedPeftLoraLinear)
    assert issubclass(peft_kinds["q8"], PeftLinear) or peft_kinds["q8"].__module__.startswith("peft.")


def test_patched_layer_checks_its_input_like_the_fused_layer():
    """A patched PEFT layer names itself and the value on bad input (it raised the ops' RuntimeError, which names
    no layer, for a wrong width, and 'no backend runs on meta' for weights on another device)."""
    model = peft_model(seed=8)
    lorafusion.patch_peft(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"q_proj.*input's last dimension is \(41,\), expected in_features=48"):
        layer(torch.randn(3, 41))
    meta = peft_model(seed=8).to("meta")
    lorafusion.patch_peft(meta)
    with pytest.raises(ValueError, match=r"q_proj.*input is on cpu but the weights are on meta"):
        meta.base_model.model.model.layers[0].self_attn.q_proj(torch.randn(3, 48))
    x = torch.randn(3, 48)
    with torch.no_grad():  # the good input still runs fused and right
        want = layer.get_base_layer()(x) + layer.scaling["default"] * (
            x @ layer.lora_A["default"].weight.t()) @ layer.lora_B["default"].weight.t()
        torch.testing.assert_close(layer(x), want)


def test_patch_peft_keeps_the_backend_a_fused_layer_was_built_with(monkeypatch):
    """A model built fused with fused_lora_config(backend=...) and patched again (say after add_adapter) keeps that
    backend unless patch_peft is given one (it was reset to 'auto')."""
    monkeypatch.delenv("LORAFUSION_BACKEND", raising=False)
    base = tiny_llama(3)
    model = get_peft_model(base, lorafusion.fused_lora_config(backend="reference", r=4, lora_alpha=8,
                                                              target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._lorafusion_backend == "reference"
    lorafusion.patch_peft(model)
    assert layer._lorafusion_backend == "reference"
    lorafusion.patch_peft(model, backend="cpu")
    assert layer._lorafusion_backend == "cpu"
    lorafusion.unpatch_peft(model)
    lorafusion.patch_peft(model)  # unpatched then patched: a new fused layer, the default backend
    assert layer._lorafusion_backend == "auto"


def _ids(seed=123, b=2, t=9):
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def test_an_offloaded_model_falls_back_to_peft_and_matches_it():
    """accelerate's offloading keeps the weights on meta and brings them in hooks on each leaf module; the fused path
    read base_layer.weight without calling it: 'input is on cpu but the weights are on meta' (a reviewer's repro)."""
    from accelerate import cpu_offload

    ref, fus = peft_model(seed=3), peft_model(seed=3)
    lorafusion.patch_peft(fus, backend="cpu")
    with torch.no_grad():
        want = ref(input_ids=_ids()).logits
    for m in (ref, fus):
        cpu_offload(m, execution_device=torch.device("cpu"))
    assert fus.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.device.type == "meta"
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = fus(input_ids=_ids()).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert any("forward hooks on Linear" in str(w.message) for w in caught)


def test_peft_compiled_hotswap_tensor_scaling_matches_peft(tmp_path):
    """prepare_model_for_compiled_hotswap makes each scaling a 0-d tensor: fused_lora_linear refused it."""
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    torch.manual_seed(9)
    other = get_peft_model(tiny_llama(2), LoraConfig(r=4, lora_alpha=3, target_modules=TARGETS,
                                                      init_lora_weights=False))
    other.save_pretrained(str(tmp_path))
    outs = []
    for patched in (False, True):
        m = peft_model(seed=2).eval()
        if patched:
            lorafusion.patch_peft(m, backend="cpu")
        prepare_model_for_compiled_hotswap(m, target_rank=8)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            before = m(input_ids=_ids()).logits
            hotswap_adapter(m, str(tmp_path), adapter_name="default")
            outs.append((before, m(input_ids=_ids()).logits))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_a_fused_config_with_fan_in_fan_out_resets_it_as_peft_does():
    """PEFT's own dispatch resets fan_in_fan_out for nn.Linear; the fused one kept it, so the layers fell back and
    merge_adapter added a transposed delta (0.52 off PEFT in a reviewer's run)."""
    ref = peft_model(seed=4, fan_in_fan_out=True)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True"):
        fus = get_peft_model(tiny_llama(4), lorafusion.fused_lora_config(
            backend="cpu", r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, fan_in_fan_out=True))
    fus.load_state_dict(ref.state_dict())
    layers = [m for m in fus.modules() if isinstance(m, FusedPeftLoraLinear)]
    assert len(layers) == 14 and not any(m.fan_in_fan_out for m in layers)
    for m in (ref, fus):
        m.merge_adapter()
    with torch.no_grad():
        assert torch.allclose(fus(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, rtol=0, atol=1e-5)


def test_torch_func_per_sample_gradients_match_peft():
    """vmap(grad(...)) (per-sample gradients, as DP-LoRA takes them) failed inside the fused autograd Function."""
    from torch.func import functional_call, grad, vmap

    def make():
        torch.manual_seed(0)
        return get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 6)).double(),
                              LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))

    ref, fus = make(), make()
    lorafusion.patch_peft(fus, backend="cpu")
    x = torch.randn(4, 8, dtype=torch.float64)
    grads = []
    for m in (ref, fus):
        params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grads.append(vmap(grad(lambda p, xi: functional_call(m, p, (xi[None],)).pow(2).sum()),
                              in_dims=(None, 0))(params, x))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert grads[0][k].shape[0] == 4 and torch.allclose(grads[0][k], grads[1][k], rtol=1e-12, atol=1e-14), k
