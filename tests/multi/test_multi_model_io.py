"""MultiLoRAModel over a small Llama-architecture transformers model, and per-adapter PEFT folders both ways."""
import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
# peft is imported inside the tests: importing it pulls in triton, which must not happen at collection time before
# test_multi_triton.py has set TRITON_INTERPRET=1 (on a CPU-only machine).


def _peft():
    return pytest.importorskip("peft")

from lorafusion.multi import (  # noqa: E402
    AdapterSegments, AdapterSpec, MultiLoRAModel, SequenceLayouts, load_adapter, save_adapter,
)
from lorafusion.multi.layer import active_layout  # noqa: E402


def _base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomize_B(mm, name):
    with torch.no_grad():
        for layer in mm.layers().values():
            if name in layer.adapter_specs:
                layer.lora_B[name].normal_(std=0.2)


def test_wrap_and_per_sequence_segments():
    base = _base()
    mm = MultiLoRAModel(copy.deepcopy(base), target_modules="all-linear")
    assert len(mm.layer_names) == 2 * 7 and "lm_head" not in mm.layer_names
    mm.add_adapter("x", 4, 8, dropout=0.1)
    mm.add_adapter("y", 8, 8)
    _randomize_B(mm, "x")
    ids = torch.randint(0, 64, (3, 5))
    seg = mm.make_segments(["y", None, "x"], seq_len=5)
    out = mm(input_ids=ids, segments=seg)
    with torch.no_grad():
        ref_base = base(input_ids=ids[1:2]).logits[0]
    assert torch.allclose(out.logits[1], ref_base, atol=1e-5)  # rows without adapter: the base model
    assert torch.allclose(out.logits[0], ref_base * 0 + base(input_ids=ids[0:1]).logits[0], atol=1e-5)  # y's B = 0
    # the layout is not left behind on the layers
    assert all(active_layout(layer) is None for layer in mm.layers().values())
    with pytest.raises(ValueError, match="another adapter set"):
        with mm.use_segments(AdapterSegments([0] * 15, {"x": AdapterSpec(2, 8)})):
            pass
    out.logits.sum().backward()  # a training step reaches the present adapters only
    lay = mm.layers()["model.layers.1.self_attn.q_proj"]
    assert lay.lora_A["x"].grad is not None and lay.lora_B["y"].grad is not None


def test_saved_adapter_loads_in_plain_peft(tmp_path):
    base = _base()
    mm = MultiLoRAModel(copy.deepcopy(base), target_modules=["q_proj", "v_proj", "down_proj"]).eval()
    mm.add_adapter("x", 4, 8, dropout=0.05)
    mm.add_adapter("y", 6, 3, use_rslora=True)
    _randomize_B(mm, "x")
    _randomize_B(mm, "y")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ours = mm(input_ids=ids, segments=mm.make_segments(["x", "y"], seq_len=6)).logits
    for i, name in enumerate(("x", "y")):
        folder = str(tmp_path / name)
        save_adapter(mm, name, folder)
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
        cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
        assert cfg["r"] == mm.adapter_specs[name].r and cfg["peft_type"] == "LORA"
        pm = _peft().PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        with torch.no_grad():
            theirs = pm(input_ids=ids[i:i + 1]).logits[0]
        assert torch.allclose(ours[i], theirs, atol=1e-5), f"adapter {name}: {(ours[i] - theirs).abs().max()}"


@pytest.mark.parametrize("targets, written", [
    (["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
     r"^(model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.down_proj)$"),
    (["q_proj", "model.layers.1.mlp.down_proj"],
     r"^(model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.down_proj|model\.layers\.1\.self_attn\.q_proj)$"),
    (["q_proj", "down_proj"], ["down_proj", "q_proj"]),
])
def test_saved_adapter_targets_exactly_the_wrapped_modules(tmp_path, targets, written):
    """A model wrapping some layers' linears writes target_modules that make plain PEFT build LoRA on exactly those
    (the last names alone once made PEFT wrap every q_proj, with missing-key warnings); whole families keep the
    short names."""
    import warnings

    base = _base()
    mm = MultiLoRAModel(copy.deepcopy(base), target_modules=targets).eval()
    mm.add_adapter("x", 4, 8)
    _randomize_B(mm, "x")
    folder = str(tmp_path / "x")
    save_adapter(mm, "x", folder)
    saved = json.load(open(os.path.join(folder, "adapter_config.json")))["target_modules"]
    assert (sorted(saved) if isinstance(saved, list) else saved) == written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = _peft().PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing  # PEFT warns when the file lacks keys of modules it wrapped
    lora_modules = sorted(n[len("base_model.model."):] for n, m in pm.named_modules() if hasattr(m, "lora_A")
                          and isinstance(m.lora_A, torch.nn.ModuleDict))
    assert lora_modules == sorted(mm.layer_names)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        ours = mm(input_ids=ids, segments=mm.make_segments(["x"], seq_len=6)).logits
        theirs = pm(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("cfg", [dict(target_modules="all-linear"), dict(target_modules=["q_proj", "v_proj"]),
                                 dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                                      layers_to_transform=[0])],
                         ids=["all_linear", "q_v", "layer0"])
def test_peft_trained_adapter_loads_into_multi_model(tmp_path, cfg):
    """A PEFT adapter on every linear, or on a subset of them (its own target modules, or layers_to_transform),
    loads into a model wrapping all of them and gives PEFT's outputs for its rows."""
    peft = _peft()
    base = _base()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    pm.save_pretrained(str(tmp_path / "p"))
    pm.eval()
    mm = MultiLoRAModel(copy.deepcopy(base), target_modules="all-linear").eval()
    mm.add_adapter("other", 8, 8)
    load_adapter(mm, str(tmp_path / "p"), "trained")
    n_modules = sum(1 for n, m in pm.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict))
    assert len(mm.adapter_layers["trained"]) == n_modules
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ours = mm(input_ids=ids, segments=mm.make_segments(["trained", "other"], seq_len=7)).logits
        theirs = pm(input_ids=ids[:1]).logits[0]
    assert torch.allclose(ours[0], theirs, atol=1e-5)
    with pytest.raises(ValueError, match="duplicate adapter name 'trained'"):
        load_adapter(mm, str(tmp_path / "p"), "trained")
    narrow = MultiLoRAModel(copy.deepcopy(base), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="not wrapped"):
        load_adapter(narrow, str(tmp_path / "p"), "trained")


def test_add_adapter_is_all_or_nothing_and_names_the_layer(monkeypatch):
    mm = MultiLoRAModel(_base(), target_modules="all-linear")
    # a layer half-way through the model refuses the adapter: the add must leave no trace
    bad = mm.layers()["model.layers.1.self_attn.k_proj"]
    monkeypatch.setattr(bad, "add_adapter", lambda *a, **k: (_ for _ in ()).throw(ValueError("refused here")))
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.self_attn\.k_proj: refused here"):
        mm.add_adapter("big", r=20, alpha=8)
    monkeypatch.undo()
    assert "big" not in mm.adapter_specs
    assert not [n for n, _ in mm.named_parameters() if ".big" in n]
    mm.add_adapter("big", r=8, alpha=8)  # the name is free again
    assert "big" in mm.adapter_specs and len(mm.adapter_parameters("big")) == 2 * 14
    # names nn.ParameterDict holds as attributes once failed half-way with a KeyError and left a ghost entry
    for taken in ("half", "train", "state_dict"):
        with pytest.raises(ValueError, match=f"adapter name '{taken}' is taken by an attribute"):
            mm.add_adapter(taken, r=4, alpha=8)
        assert all(taken not in layer.lora_A.keys() for layer in mm.layers().values())
    assert list(mm.adapter_specs) == ["big"]


def test_multi_model_under_autocast():
    mm = MultiLoRAModel(_base(), target_modules="all-linear")
    mm.add_adapter("x", 4, 8)
    mm.add_adapter("y", 8, 8)
    _randomize_B(mm, "x")
    _randomize_B(mm, "y")
    ids = torch.randint(0, 64, (2, 6))
    seg = mm.make_segments(["x", "y"], seq_len=6)
    with torch.no_grad():
        ref = mm(input_ids=ids, segments=seg).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mm(input_ids=ids, segments=seg).logits
    out.float().sum().backward()
    assert torch.allclose(out.float(), ref, atol=5e-2 * ref.abs().max().item())
    for name in ("x", "y"):
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mm.adapter_parameters(name))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_each_block_under_its_own_layout(reentrant):
    """With transformers' gradient checkpointing, the blocks are recomputed in backward, after the forward's
    layout was handed back. Two microbatches of the same shape but different layouts run forward before one
    backward: every adapter gradient equals the run without checkpointing (a recomputation under the wrong layout,
    or none, would change them or fail)."""
    def grads(checkpointing):
        mm = MultiLoRAModel(_base(), target_modules="all-linear")
        mm.add_adapter("x", 4, 8, dropout=0.1)
        mm.add_adapter("y", 8, 16, target_modules=["q_proj", "v_proj"])  # layers holding different adapter sets
        _randomize_B(mm, "x")
        _randomize_B(mm, "y")
        if checkpointing:
            mm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert mm.model.is_gradient_checkpointing
        mm.train()
        torch.manual_seed(5)  # the dropout seeds
        ids1 = torch.randint(0, 64, (2, 6))
        ids2 = torch.randint(0, 64, (2, 6))
        loss = mm(input_ids=ids1, labels=ids1, segments=mm.make_segments(["x", "y"], seq_len=6)).loss
        loss = loss + mm(input_ids=ids2, labels=ids2, segments=mm.make_segments(["y", None], seq_len=6)).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 14 + 2 * 4
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_adapters_with_their_own_target_modules(tmp_path):
    """Jobs keep their own LoRA targets in one model: x on every linear, y on q_proj / v_proj only, z on one layer's
    down_proj. Each adapter's rows equal plain PEFT with that adapter alone (in the layers an adapter does not
    target its rows get the base output), its folder loads in PEFT with the same modules, and a training step
    reaches exactly its own parameters."""
    peft = _peft()
    base = _base()
    mm = MultiLoRAModel(copy.deepcopy(base), target_modules="all-linear")
    mm.add_adapter("x", 4, 8)
    mm.add_adapter("y", 8, 16, target_modules=["q_proj", "v_proj"])
    mm.add_adapter("z", 2, 4, target_modules="model.layers.1.mlp.down_proj")
    assert len(mm.adapter_layers["y"]) == 4 and mm.adapter_layers["z"] == ["model.layers.1.mlp.down_proj"]
    assert len(mm.adapter_parameters("y")) == 8
    with torch.no_grad():
        for name in ("x", "y", "z"):
            for p in mm.adapter_parameters(name):
                if p.shape[1] == mm.adapter_specs[name].r:  # B
                    p.normal_(std=0.2)
    ids = torch.randint(0, 64, (4, 6))
    seg = mm.make_segments(["x", "y", "z", None], seq_len=6)
    mm.eval()
    with torch.no_grad():
        ours = mm(input_ids=ids, segments=seg).logits
    for i, name in enumerate(("x", "y", "z")):
        folder = str(tmp_path / name)
        save_adapter(mm, name, folder)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        wrapped = sorted(n[len("base_model.model."):] for n, m in pm.named_modules()
                         if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict))
        assert wrapped == sorted(mm.adapter_layers[name])
        with torch.no_grad():
            theirs = pm(input_ids=ids[i:i + 1]).logits[0]
        assert torch.allclose(ours[i], theirs, atol=1e-5), (name, (ours[i] - theirs).abs().max())
    with torch.no_grad():
        assert torch.allclose(ours[3], base(input_ids=ids[3:4]).logits[0], atol=1e-5)
    mm.train()
    mm(input_ids=ids[1:2], labels=ids[1:2], segments=mm.make_segments(["y"], seq_len=6)).loss.backward()
    with_grad = {n for n, p in mm.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in mm.named_parameters() if p.requires_grad and n.endswith(".y")}
    assert len(with_grad) == 8
    # nested blocks (a model call inside use_segments opens its own): the outer layouts come back on exit
    outer = mm.make_segments(["x", "y", "z", None], seq_len=6)
    with torch.no_grad(), mm.use_segments(outer):
        first = mm.model(input_ids=ids).logits
        mm(input_ids=ids[:1], segments=mm.make_segments(["y"], seq_len=6))
        assert torch.equal(mm.model(input_ids=ids).logits, first)
    assert all(active_layout(layer) is None for layer in mm.layers().values())
    removed = mm.remove_adapter("y")
    assert len(removed) == 8 and "y" not in mm.adapter_layers
    with pytest.raises(ValueError, match="match none of the wrapped linears"):
        mm.add_adapter("w", 2, 2, target_modules=["no_such_proj"])


def test_a_module_path_that_ends_another_is_kept_apart(tmp_path):
    """Paths are matched as suffixes (``fc`` also names ``sub.fc``): an adapter on ``fc`` alone saves a folder PEFT
    applies to ``fc`` alone, and loads back into a model wrapping both onto ``fc`` alone."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.sub = torch.nn.Module()
            self.sub.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.sub.fc(self.fc(x))

    torch.manual_seed(0)
    base = Net()
    mm = MultiLoRAModel(copy.deepcopy(base), exclude_modules=("sub.fc",))
    assert mm.layer_names == ["fc"]
    mm.add_adapter("c", 2, 4)
    _randomize_B(mm, "c")
    folder = str(tmp_path / "c")
    save_adapter(mm, "c", folder)
    pm = _peft().PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert [n for n, m in pm.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)] == [
        "base_model.model.fc"]
    both = MultiLoRAModel(copy.deepcopy(base))
    assert both.layer_names == ["fc", "sub.fc"]
    load_adapter(both, folder, "c")
    assert both.adapter_layers["c"] == ["fc"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        ours = both(x, segments=both.make_segments(["c"] * 3))
        assert torch.allclose(ours, pm(x), atol=1e-6)
    with pytest.raises(ValueError, match="layers must be paths of wrapped linears"):
        both.add_adapter("d", 2, 2, layers=["nope"])


def _two_adapter_model(base):
    mm = MultiLoRAModel(copy.deepcopy(base), target_modules="all-linear")
    mm.add_adapter("x", 4, 8, dropout=0.1)
    mm.add_adapter("y", 6, 12, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for layer in mm.layers().values():
            for name in layer.adapter_specs:
                layer.lora_A[name].normal_(std=0.3)
                layer.lora_B[name].normal_(std=0.3)
    return mm


def test_adapter_names_forward_equals_the_row_layout():
    """One adapter per sequence (adapter_names=) is the per-sequence row layout: same logits and same gradients,
    dropout on; and the layers keep no layout afterwards."""
    mm = _two_adapter_model(_base()).train()
    B, L = 4, int(torch.randint(3, 9, ()))
    ids = torch.randint(0, 64, (B, L))
    names = ["y", None, "x", "y"]
    outs, grads = [], []
    for kw in (dict(segments=mm.make_segments(names, seq_len=L)), dict(adapter_names=names)):
        mm.zero_grad()
        torch.manual_seed(7)  # the same dropout seeds for both
        out = mm(input_ids=ids, labels=ids, **kw)
        out.loss.backward()
        outs.append(out.logits.detach())
        grads.append({n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * (14 + 6)
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert all(active_layout(layer) is None for layer in mm.layers().values())


def test_adapter_names_bad_input_is_a_clear_error():
    mm = _two_adapter_model(_base())
    ids = torch.randint(0, 64, (3, 5))
    with pytest.raises(ValueError, match="exactly one of segments= .* and adapter_names="):
        mm(input_ids=ids)
    with pytest.raises(ValueError, match="exactly one of"):
        mm(input_ids=ids, adapter_names=["x"] * 3, segments=mm.make_segments(["x"] * 3, seq_len=5))
    with pytest.raises(ValueError, match="'z' is not a known adapter"):
        mm(input_ids=ids, adapter_names=["x", "z", None])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the input holds 3 sequences"):
        mm(input_ids=ids, adapter_names=["x", "y"])
    with pytest.raises(ValueError, match="adapter_names has 6 entries but the input holds 3 sequences"):
        mm(input_ids=ids, adapter_names=["x", "y", None] * 2)
    with pytest.raises(ValueError, match="seq_adapters is empty"):
        SequenceLayouts([], mm.adapter_specs)
    with pytest.raises(ValueError, match="input of 3 sequences does not match the 2 per-sequence adapters"):
        SequenceLayouts(["x", "y"], mm.adapter_specs).layout((3, 5, 32))
    assert all(active_layout(layer) is None for layer in mm.layers().values())


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beams2_return2"])
def test_generate_continues_each_sequence_with_its_own_adapter_as_plain_peft_does(tmp_path, beams):
    """Mixed-adapter generation in one batch (left-padded prompts, KV cache) gives, sequence by sequence, the
    tokens plain PEFT generates with that adapter alone (the base model for None), and the same scores."""
    peft = _peft()
    base = _base()
    mm = _two_adapter_model(base).eval()
    for name in ("x", "y"):
        save_adapter(mm, name, str(tmp_path / name))
    g = torch.Generator().manual_seed(3)  # fixed data: greedy / beam choices must not sit on a near tie
    lengths = [5, 3, 4, 5]
    ids = torch.zeros(4, 5, dtype=torch.long)
    mask = torch.zeros(4, 5, dtype=torch.long)
    for i, n in enumerate(lengths):  # left padding, as for batched generation
        ids[i, 5 - n:] = torch.randint(1, 64, (n,), generator=g)
        mask[i, 5 - n:] = 1
    names = ["y", None, "x", "y"]
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=beams, num_return_sequences=beams, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    ours = mm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
    assert ours.sequences.shape[0] == 4 * beams
    assert all(active_layout(layer) is None for layer in mm.layers().values())
    models = {None: copy.deepcopy(base).eval()}
    for name in ("x", "y"):
        models[name] = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name)).eval()
    for i, name in enumerate(names):
        n = lengths[i]
        theirs = models[name].generate(input_ids=ids[i:i + 1, 5 - n:], attention_mask=mask[i:i + 1, 5 - n:], **kw)
        got = ours.sequences[i * beams:(i + 1) * beams, 5 - n:]
        assert torch.equal(got, theirs.sequences), f"sequence {i} ({name}): {got.tolist()} vs {theirs.sequences.tolist()}"
        if beams == 1:
            for s_ours, s_theirs in zip(ours.scores, theirs.scores):
                assert torch.allclose(s_ours[i], s_theirs[0], atol=1e-4)


def _opt():
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=64)).eval()


def _fsmt():
    torch.manual_seed(0)
    return transformers.FSMTForConditionalGeneration(transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()


@pytest.mark.parametrize("arch", ["opt", "fsmt"])
def test_adapter_names_on_models_whose_linears_see_flattened_or_time_first_rows(tmp_path, arch):
    """OPT's MLP sees (batch * tokens, features), FSMT's layers (tokens, batch, features): each sequence still gets
    its own adapter, as plain PEFT gives it (and the base model for None). (A time-first input whose token count
    equals the batch size cannot be told from a sequence-first one; SequenceLayouts documents that.)"""
    peft = _peft()
    make = _opt if arch == "opt" else _fsmt
    mm = MultiLoRAModel(make())
    mm.add_adapter("a", r=4, alpha=8)
    with torch.no_grad():
        for layer in mm.layers().values():
            layer.lora_B["a"].normal_(std=0.3)
    mm.eval()
    save_adapter(mm, "a", str(tmp_path / "a"))
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path / "a")).eval()
    base = make()
    for B, T in ((2, 4), (4, 6), (4, 2)):  # token counts that are multiples of the batch, and the other way round
        names = ["a", None] * (B // 2)
        ids = torch.randint(3, 64, (B, T))
        extra = {"decoder_input_ids": torch.randint(3, 64, (B, T))} if arch == "fsmt" else {}
        # per sequence by name, and by a row layout built per sequence (make_segments(seq_len=T)): FSMT's
        # time-first layers take the latter in time-major order (it once gave their tokens other sequences' adapters)
        for how in ({"adapter_names": names}, {"segments": mm.make_segments(names, seq_len=T)}):
            with torch.no_grad():
                ours = mm(input_ids=ids, **how, **extra).logits
                for i, name in enumerate(names):
                    one = {k: v[i:i + 1] for k, v in extra.items()}
                    ref = (pm if name else base)(input_ids=ids[i:i + 1], **one).logits[0]
                    assert torch.allclose(ours[i], ref, atol=1e-5), \
                        f"{arch} {list(how)} B={B} row {i}: {(ours[i] - ref).abs().max()}"
    # beam search: the decoder's stack runs on the expanded batch (its own embedding tells the layers so)
    g = torch.Generator().manual_seed(5)  # fixed prompts: beam choices must not sit on a near tie
    ids = torch.randint(3, 64, (2, 5), generator=g)
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=4, do_sample=False, pad_token_id=1)
    ours = mm.generate(input_ids=ids, adapter_names=["a", None], **kw)
    for i, ref_model in enumerate((pm, base)):
        ref = ref_model.generate(input_ids=ids[i:i + 1], **kw)
        assert torch.equal(ours[2 * i:2 * i + 2, :ref.shape[1]], ref), f"{arch} beams, sequence {i}"


def test_model_wrapping_and_loading_edge_cases(tmp_path):
    peft = _peft()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="matches Conv1D modules: only nn.Linear is supported"):
        MultiLoRAModel(gpt2, target_modules=["c_attn"])
    mm = MultiLoRAModel(_base(), target_modules=["q_proj", "lm_head"])  # an explicit target beats the exclusion
    assert "lm_head" in mm.layer_names
    assert "lm_head" not in MultiLoRAModel(_base()).layer_names
    pm = peft.get_peft_model(_base(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    with pytest.raises(ValueError, match="found adapter_model.bin: only safetensors is read"):
        load_adapter(MultiLoRAModel(_base()), str(tmp_path / "bin"), "x")
    pm.save_pretrained(str(tmp_path / "alora"))
    cfg_path = tmp_path / "alora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alora_invocation_tokens"] = [7]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[7\] is not supported"):
        load_adapter(MultiLoRAModel(_base()), str(tmp_path / "alora"), "x")
    half = MultiLoRAModel(_base().to(torch.bfloat16))
    half.add_adapter("x", 4, 8)  # fp32 adapters over a bf16 base, as PEFT keeps them
    assert all(p.dtype == torch.float32 for p in half.adapter_parameters("x"))


def test_adapter_names_on_a_model_whose_encoder_has_no_token_embedding():
    """Speech encoders (Speech2Text, wav2vec2) raise from transformers' default get_input_embeddings: the batch
    size is then read from the input shape alone, and the forward still runs per sequence."""
    class Encoder(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError("`get_input_embeddings` not auto-handled")

    class Speechy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 5)
            self.encoder = Encoder()

        def get_encoder(self):
            return self.encoder

        def forward(self, x):
            return self.proj(x)

    mm = MultiLoRAModel(Speechy())
    mm.add_adapter("a", 2, 4)
    with torch.no_grad():
        mm.layers()["proj"].lora_B["a"].normal_()
    x = torch.randn(2, 3, 6)
    out = mm(x, adapter_names=["a", None])
    seg = mm(x, segments=mm.make_segments(["a", None], seq_len=3))
    assert torch.equal(out, seg) and not torch.allclose(out[0], mm.model.proj.base(x[0]))


def test_threads_running_forwards_on_one_model_each_use_their_own_layout():
    """A serving loop: the layout lived on the shared layers, so two threads' forwards used each other's layouts (317
    of 400 outputs wrong in a reviewer's run), and a stale one could stay behind for later forwards."""
    import threading

    mm = MultiLoRAModel(_base(), backend="reference").eval()
    mm.add_adapter("a", 4, 8)
    mm.add_adapter("b", 4, 8)
    _randomize_B(mm, "a")
    _randomize_B(mm, "b")
    g = torch.Generator().manual_seed(1)
    ids_a, ids_b = torch.randint(0, 64, (2, 6), generator=g), torch.randint(0, 64, (3, 6), generator=g)
    with torch.no_grad():
        want_a = mm(input_ids=ids_a, segments=mm.make_segments(["a", "a"], seq_len=6)).logits
        want_b = mm(input_ids=ids_b, adapter_names=["b", None, "b"]).logits
    assert not torch.allclose(want_a[0], mm(input_ids=ids_a, adapter_names=["b", "b"]).logits[0])
    problems = []

    def worker(kind):
        for _ in range(60):
            try:
                with torch.no_grad():
                    if kind == "a":
                        out = mm(input_ids=ids_a, segments=mm.make_segments(["a", "a"], seq_len=6)).logits
                        ok = torch.equal(out, want_a)
                    else:  # the per-sequence path, with its embedding hook
                        out = mm(input_ids=ids_b, adapter_names=["b", None, "b"]).logits
                        ok = torch.equal(out, want_b)
                if not ok:
                    problems.append(f"{kind}: wrong output")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{kind}: {type(exc).__name__}: {exc}")

    torch.set_num_threads(1)
    threads = [threading.Thread(target=worker, args=(k,)) for k in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == [], problems[:3]
    assert all(active_layout(layer) is None for layer in mm.layers().values())
    with pytest.raises(ValueError, match="no segment layout"):
        mm.model(input_ids=ids_a)


def test_a_per_sequence_layout_on_a_batch_cut_otherwise_is_refused():
    mm = MultiLoRAModel(_base(), backend="reference")
    mm.add_adapter("a", 4, 8)
    mm.add_adapter("b", 4, 8)
    seg = mm.make_segments(["a", "b"], seq_len=6)  # 2 x 6 = 12 rows
    with pytest.raises(ValueError, match=r"the layout is per sequence, 2 sequences x 6 tokens, but the input is "
                                         r"\(3, 4\)"):
        mm(input_ids=torch.randint(0, 64, (3, 4)), segments=seg)  # 12 rows too, other sequences
    mm(input_ids=torch.randint(0, 64, (2, 6)), segments=seg)


@pytest.mark.parametrize("key, value", [
    ("use_dora", True), ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"q_proj": 4}),
    # a reviewer's two: loaded silently, with outputs 0.47 (replication) and 0.06-0.23 (pissa / olora) off PEFT's
    ("layer_replication", [[0, 2], [1, 2]]), ("init_lora_weights", "pissa"), ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"), ("init_lora_weights", "corda"), ("init_lora_weights", "loftq"),
])
def test_peft_adapters_it_cannot_reproduce_are_refused(tmp_path, key, value):
    peft = _peft()
    pm = peft.get_peft_model(_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    mm = MultiLoRAModel(_base(), backend="reference")
    load_adapter(mm, str(tmp_path), "plain")  # as saved: loads
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=rf"{key}={value!r}"[:40].replace("[", r"\[").replace("{", r"\{")):
        load_adapter(mm, str(tmp_path), "other")
    assert list(mm.adapter_specs) == ["plain"]


def test_exclude_modules_takes_one_name_or_none():
    """A bare string was matched character by character, so it excluded nothing; None was a TypeError."""
    mm = MultiLoRAModel(_base(), exclude_modules="o_proj")
    assert mm.layer_names and not any(n.endswith("o_proj") for n in mm.layer_names)
    assert "lm_head" in mm.layer_names  # the default exclusion is replaced, as a tuple would replace it
    assert "lm_head" in MultiLoRAModel(_base(), exclude_modules=None).layer_names
    assert "lm_head" not in MultiLoRAModel(_base()).layer_names


def test_release_layers_keeps_the_adapters_of_the_linears_left():
    """A pipeline stage drops the layers other stages hold: the adapters keep their names and specs, their
    parameters shrink to the linears kept (none for an adapter that targets only dropped ones), and the saved
    tensors name only the linears kept."""
    from lorafusion.multi.io import adapter_tensors

    mm = MultiLoRAModel(_base())
    mm.add_adapter("all", r=2, alpha=4)
    names = list(mm.layer_names)
    mm.add_adapter("one", r=2, alpha=4, layers=[names[0]])
    before = len(mm.adapter_parameters("all"))
    mm.release_layers(names[:1])
    assert mm.layer_names == names[1:]
    assert len(mm.adapter_parameters("all")) == before - 2
    assert mm.adapter_parameters("one") == [] and "one" in mm.adapter_specs
    assert adapter_tensors(mm, "one") == {}
    assert not any(names[0] + "." in k for k in adapter_tensors(mm, "all"))
    with pytest.raises(ValueError, match="not wrapped linears of the model"):
        mm.release_layers(["no.such.layer"])
