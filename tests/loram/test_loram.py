"""LoRAM: structured pruning, adapter recovery, the pipeline, on tiny models built from configs (float64 truth)."""
import json
import os

import pytest
import torch

from loram import PrunePlan, PruneError, importance_scores, make_plan, parameter_count, prune_model, recover_adapter
from loram.prune import ATTN, MLP

os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")


def _model(kind: str = "llama", seed: int = 0, layers: int = 2):
    from transformers import (LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=40, hidden_size=48, intermediate_size=56, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64,
                  tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    if kind == "qwen2":  # q / k / v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "qwen3":  # q_norm / k_norm of head_dim, shared by every head
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=10))
    elif kind == "olmo2":  # q_norm / k_norm over all heads: not prunable by heads
        model = Olmo2ForCausalLM(Olmo2Config(**common, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=10))  # head_dim not hidden / heads
    model = model.double().eval()
    with torch.no_grad():  # weights big enough that every structure matters to the output
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.25)
    return model


def _random_plan(model, n_kv: int, n_ch: int, seed: int) -> PrunePlan:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pick = lambda n, k: tuple(sorted(torch.randperm(n, generator=g)[:k].tolist()))  # noqa: E731
    return PrunePlan(layers, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.intermediate_size,
                     tuple(pick(cfg.num_key_value_heads, n_kv) for _ in range(layers)),
                     tuple(pick(cfg.intermediate_size, n_ch) for _ in range(layers)))


def _zero_removed(model, plan: PrunePlan):
    """The independent statement of pruning: the full model with the removed heads' o_proj columns and the removed
    channels' down_proj columns set to zero (contiguous slices, not the plan's index lists)."""
    n_rep, d = plan.n_rep, plan.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for k in range(plan.num_key_value_heads):
                if k not in plan.kv_groups[i]:
                    layer.self_attn.o_proj.weight[:, k * n_rep * d:(k + 1) * n_rep * d] = 0
            for j in range(plan.intermediate_size):
                if j not in plan.channels[i]:
                    layer.mlp.down_proj.weight[:, j] = 0
    return model


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# transformers' RMSNorm computes in float32 whatever the model's dtype, so two float64 models that sum in another
# order agree to ~1e-7, not to float64's 1e-15; a wrong head or channel moves the logits by far more (> 1e-2)
EXACT = 1e-6


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_pruned_model_computes_the_full_model_with_removed_structures_zeroed(kind):
    full = _model(kind, seed=1)
    plan = _random_plan(full, 2, 23, seed=2)
    small = prune_model(full, plan)
    assert small.config.num_key_value_heads == 2 and small.config.num_attention_heads == 4
    assert small.config.intermediate_size == 23
    assert parameter_count(small.config) == sum(p.numel() for p in small.parameters())
    assert parameter_count(full.config) == sum(p.numel() for p in full.parameters())
    ids = torch.randint(0, 40, (3, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = small(input_ids=ids).logits
        reference = _zero_removed(_model(kind, seed=1), plan)(input_ids=ids).logits
        unpruned = full(input_ids=ids).logits
    assert _rel(got, reference) < EXACT
    assert _rel(unpruned, reference) > 1e-2  # the removed structures did matter


def test_keeping_everything_changes_nothing_and_plan_round_trips(tmp_path):
    full = _model(seed=4)
    plan = make_plan(full, 1.0, importance="magnitude")
    assert plan.kv_groups == ((0, 1, 2),) * 2 and plan.channels == (tuple(range(56)),) * 2
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(prune_model(full, plan)(input_ids=ids).logits, full(input_ids=ids).logits)
    plan = _random_plan(full, 1, 30, seed=5)
    plan.save(str(tmp_path))
    assert PrunePlan.load(str(tmp_path)) == plan


def _adapter_on(model, seed: int, out_dir):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTN + MLP)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # B is zero at init: give both factors values
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    peft_model.save_pretrained(str(out_dir))
    return peft_model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_recovered_adapter_is_the_pruned_update_scattered_into_the_full_model(tmp_path, kind):
    from peft import PeftModel

    full = _model(kind, seed=6)
    plan = _random_plan(full, 2, 40, seed=7)
    pruned_adapted = _adapter_on(prune_model(full, plan), 8, tmp_path / "pruned_adapter")
    recover_adapter(str(tmp_path / "pruned_adapter"), plan, str(tmp_path / "full_adapter"))
    cfg = json.loads((tmp_path / "full_adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8

    full_adapted = PeftModel.from_pretrained(_model(kind, seed=6), str(tmp_path / "full_adapter")).eval()
    n_checked = 0
    for i in range(plan.num_layers):
        for part, names in (("self_attn", ATTN), ("mlp", MLP)):
            for n in names:
                small_mod = getattr(getattr(pruned_adapted.base_model.model.model.layers[i], part), n)
                full_mod = getattr(getattr(full_adapted.base_model.model.model.layers[i], part), n)
                dw_small = small_mod.get_delta_weight("default")
                dw_full = full_mod.get_delta_weight("default")
                rows = plan.rows(i, n) if plan.rows(i, n) is not None else torch.arange(dw_full.shape[0])
                cols = plan.cols(i, n) if plan.cols(i, n) is not None else torch.arange(dw_full.shape[1])
                kept = dw_full[rows][:, cols]
                # float64 GEMMs of another shape: equal to the last bits or so
                assert _rel(kept, dw_small.detach()) < 1e-13, (i, n)
                rest = dw_full.clone()
                rest[rows.unsqueeze(1), cols.unsqueeze(0)] = 0
                assert torch.count_nonzero(rest) == 0, (i, n)
                n_checked += 1
    assert n_checked == 14
    # the full model, structures removed by zeroing (independently of the plan's index code), computes exactly what
    # the pruned model with its adapter computes
    masked = PeftModel.from_pretrained(_zero_removed(_model(kind, seed=6), plan), str(tmp_path / "full_adapter"))
    ids = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert _rel(masked.eval()(input_ids=ids).logits, pruned_adapted.eval()(input_ids=ids).logits) < EXACT


def _loss(model, ids):
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def test_taylor_importance_is_the_first_order_loss_change_of_removing_the_structure():
    model = _model(seed=10)
    ids = torch.randint(0, 40, (4, 11), generator=torch.Generator().manual_seed(11))
    batches = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    groups, channels = importance_scores(model, "taylor", batches)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # state restored
    d, n_rep = 10, 2
    layer = model.model.layers[1]
    a, m = layer.self_attn, layer.mlp

    def directional(slices) -> float:
        """d/dt of the loss with the structure's weights scaled by (1 - t), at t = 0, by central differences."""
        eps = 1e-3  # the loss carries float32 noise (RMSNorm), ~1e-5 absolute: a smaller step amplifies it
        saved = [w[s].clone() for w, s in slices]
        out = []
        with torch.no_grad():
            for sign in (1, -1):
                for (w, s), orig in zip(slices, saved):
                    w[s] = orig * (1 - sign * eps)
                out.append(_loss(model, ids).item())
            for (w, s), orig in zip(slices, saved):
                w[s] = orig
        return (out[0] - out[1]) / (2 * eps)

    for k in range(3):
        q = slice(k * n_rep * d, (k + 1) * n_rep * d)
        kv = slice(k * d, (k + 1) * d)
        fd = directional([(a.q_proj.weight, (q,)), (a.k_proj.weight, (kv,)), (a.v_proj.weight, (kv,)),
                          (a.o_proj.weight, (slice(None), q))])
        assert abs(groups[1][k].item() - abs(fd)) <= 1e-3 * max(1.0, abs(fd)), (k, groups[1][k].item(), fd)
    for j in (0, 17, 55):
        fd = directional([(m.gate_proj.weight, (j,)), (m.up_proj.weight, (j,)), (m.down_proj.weight, (slice(None), j))])
        assert abs(channels[1][j].item() - abs(fd)) <= 1e-3 * max(1.0, abs(fd)), (j, channels[1][j].item(), fd)


def test_magnitude_importance_and_plans_drop_dead_structures():
    model = _model(seed=12)
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():
        a.q_proj.weight[20:40] *= 0.01  # KV group 1 (query heads 2, 3; head_dim 10)
        a.k_proj.weight[10:20] *= 0.01
        a.v_proj.weight[10:20] *= 0.01
        a.o_proj.weight[:, 20:40] *= 0.01
        m.gate_proj.weight[5] = 0
        m.up_proj.weight[5] = 0
        m.down_proj.weight[:, 5] = 0
    groups, channels = importance_scores(model, "magnitude")
    w = torch.cat([a.q_proj.weight[0:20].flatten(), a.k_proj.weight[0:10].flatten(), a.v_proj.weight[0:10].flatten(),
                   a.o_proj.weight[:, 0:20].flatten()])
    assert groups[0][0].item() == pytest.approx(w.norm().item(), rel=1e-12)
    assert channels[0][5].item() == 0
    plan = make_plan(model, 0.5, attn_keep_ratio=0.67, importance="magnitude")
    assert 1 not in plan.kv_groups[0] and len(plan.kv_groups[0]) == 2  # 3 x 0.67 rounds to 2
    assert 5 not in plan.channels[0] and plan.kept_channels == 28
    assert make_plan(model, 0.5, importance="magnitude", channel_multiple=8).kept_channels == 32  # 28 -> 3.5 -> 4 x 8
    assert make_plan(model, 0.01, importance="magnitude").kept_kv_heads == 1  # at least one of each


def test_bad_input_is_refused_with_the_argument_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _model(seed=13)
    for bad in (0, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(PruneError, match="keep_ratio"):
            make_plan(model, bad, importance="magnitude")
    with pytest.raises(PruneError, match="channel_multiple"):
        make_plan(model, 0.5, importance="magnitude", channel_multiple=0)
    with pytest.raises(PruneError, match="importance"):
        make_plan(model, 0.5, importance="random")
    with pytest.raises(PruneError, match="calibration"):
        make_plan(model, 0.5, importance="taylor")
    with pytest.raises(PruneError, match="Llama-family"):
        make_plan(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)), 0.5,
                  importance="magnitude")
    good = _random_plan(model, 2, 30, seed=14).to_dict()
    for field, value, match in (("channels", [[3, 1, 2] + list(range(4, 31)), list(range(30))], "ascending"),
                                ("channels", [list(range(30)), list(range(31))], "same"),
                                ("kv_groups", [[0, 3], [0, 1]], r"\[0, 3\)"),
                                ("kv_groups", [[0, 1]], "lists 1 layers"),
                                ("num_key_value_heads", 4, "multiple")):
        with pytest.raises(PruneError, match=match):
            PrunePlan.from_dict({**good, field: value})
    for field, value in (("channels", [["x"]]), ("channels", [[0.7, 1.2]]), ("kv_groups", [0]),
                         ("kv_groups", None), ("channels", [[True]])):
        with pytest.raises(PruneError, match=f"plan {field} must be a list"):
            PrunePlan.from_dict({**good, field: value})
    with pytest.raises(PruneError, match="format"):
        PrunePlan.from_dict({**good, "format": "other"})
    with pytest.raises(PruneError, match="does not fit"):
        prune_model(_model(seed=13, layers=3), PrunePlan.from_dict(good))
    with pytest.raises(PruneError, match="no LoRAM prune plan"):
        PrunePlan.load(str(tmp_path))

    # an adapter trained on another plan's pruned model, a DoRA adapter, a folder that is no adapter
    plan = PrunePlan.from_dict(good)
    _adapter_on(prune_model(model, _random_plan(model, 1, 30, seed=15)), 1, tmp_path / "other")
    with pytest.raises(PruneError, match="does not match the prune plan"):
        recover_adapter(str(tmp_path / "other"), plan, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written
    cfg = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(PruneError, match="use_dora"):
        recover_adapter(str(tmp_path / "other"), plan, str(tmp_path / "out"))
    with pytest.raises(PruneError, match="adapter_model.safetensors"):
        recover_adapter(str(tmp_path), plan, str(tmp_path / "out"))
    (tmp_path / "other" / "adapter_config.json").write_text("{not json")
    with pytest.raises(PruneError, match="adapter_config.json is not readable JSON"):
        recover_adapter(str(tmp_path / "other"), plan, str(tmp_path / "out"))
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "other" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(PruneError, match="not a readable safetensors file"):
        recover_adapter(str(tmp_path / "other"), plan, str(tmp_path / "out"))


def test_models_inputs_and_outputs_loram_cannot_take_are_refused_by_name(tmp_path, capsys):
    """A reviewer's cases, each a traceback (exit 1) or a silent wrong or destructive result before."""
    from transformers import ViTConfig

    from loram.cli import main
    from loram.memory import estimate

    # OLMo2's q_norm spans every head: pruning heads crashed in load_state_dict, and estimate gave figures for it
    olmo2 = _model("olmo2", seed=20)
    with pytest.raises(PruneError, match=r"layer 0 self_attn.q_norm.weight has shape \(48,\), which spans the "
                                         "attention heads pruning removes"):
        make_plan(olmo2, 0.5, importance="magnitude")
    with pytest.raises(PruneError, match="q_norm"):
        estimate(olmo2.config, 0.5)
    with pytest.raises(PruneError, match="model: a ViTConfig is not a causal LM config LoRAM prunes"):
        estimate(ViTConfig(), 0.5)

    model_dir, pruned_dir = tmp_path / "model", tmp_path / "pruned"
    full = _model(seed=21)
    full.save_pretrained(str(model_dir))  # no tokenizer in it
    prune = ["prune", "--model", str(model_dir), "--keep-ratio", "0.5", "--importance", "magnitude"]
    assert main(prune + ["--out", str(pruned_dir)]) == 2
    assert f"model: {model_dir} has no loadable tokenizer" in capsys.readouterr().err
    from lorafusion.train.presets import model_preset_path
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(model_preset_path("tiny-llama")).save_pretrained(str(model_dir))
    for extra, message in ((["--out", str(model_dir)], f"out: {model_dir} is the model folder {model_dir}"),
                           (["--out", str(tmp_path)], f"out: {tmp_path} holds the model folder {model_dir}"),
                           (["--out", str(pruned_dir), "--prune-device", "meta"], "device: 'meta' holds no values"),
                           (["--out", str(pruned_dir), "--seed", str(2**64)], "seed must be an integer in [0, 2**63)")):
        assert main(prune + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert (model_dir / "config.json").is_file() and not pruned_dir.exists()  # nothing replaced, nothing written
    assert main(prune + ["--out", str(pruned_dir)]) == 0

    # recover: out naming an input, an adapter trained on another pruned model of the same shapes, a broken record
    _adapter_on(prune_model(full, PrunePlan.load(str(pruned_dir))), 22, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(pruned_dir)  # what training on the pruned folder writes
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    recover = ["recover", "--adapter", str(tmp_path / "adapter")]
    for out in (pruned_dir, tmp_path / "adapter"):
        assert main(recover + ["--pruned", str(pruned_dir), "--out", str(out)]) == 2
        assert f"out: {out} is the " in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    plan = PrunePlan.load(str(pruned_dir))
    swapped = PrunePlan.from_dict({**plan.to_dict(), "channels": [[c for c in range(56) if c not in kept][:len(kept)]
                                                                  for kept in plan.channels]})
    assert swapped.kept_channels == plan.kept_channels and swapped.channels != plan.channels
    swapped.save(str(other))
    assert main(recover + ["--pruned", str(other), "--out", str(tmp_path / "rec")]) == 2
    assert (f"was trained on the pruned model {pruned_dir}, whose plan keeps other heads / channels"
            in capsys.readouterr().err) and not (tmp_path / "rec").exists()
    for record in ("{broken", "[1]"):
        (pruned_dir / "loram_prune.json").write_text(record)
        assert main(recover + ["--pruned", str(pruned_dir), "--out", str(tmp_path / "rec")]) == 2
        assert f"{pruned_dir / 'loram_prune.json'}: " in capsys.readouterr().err
    (pruned_dir / "loram_prune.json").unlink()
    assert main(recover + ["--pruned", str(pruned_dir), "--out", str(tmp_path / "rec")]) == 0


def test_prune_command_writes_a_loadable_model_in_the_chosen_dtype(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from loram.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", "builtin:tiny-llama", "--out", str(out), "--keep-ratio", "0.5",
                 "--attn-keep-ratio", "1", "--importance", "magnitude", "--prune-dtype", "bf16"]) == 0
    assert "the record is" in capsys.readouterr().out
    record = json.loads((out / "loram_prune.json").read_text())
    assert record["kept_channels"] == 128 and record["dtype"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16 and model.config.intermediate_size == 128
    assert PrunePlan.load(str(out)).kept_channels == 128
    assert sum(p.numel() for p in model.parameters()) == record["parameters_pruned"]


def test_cli_errors_name_the_argument(tmp_path, capsys):
    from loram.cli import main

    assert main(["estimate", "--model", str(tmp_path / "none"), "--keep-ratio", "0.5"]) == 2
    assert "model: cannot read a config from" in capsys.readouterr().err
    assert main(["prune", "--model", str(tmp_path), "--out", str(tmp_path / "p"), "--keep-ratio", "0.5"]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err
    assert main(["recover", "--pruned", str(tmp_path), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no LoRAM prune plan" in capsys.readouterr().err
    prune = ["prune", "--out", str(tmp_path / "p"), "--keep-ratio", "0.5", "--importance", "magnitude"]
    for extra, message in ((["--model", "builtin:nosuch"], "is not a built-in model"),
                           (["--model", "builtin:tiny-llama", "--prune-device", "cuda:0"], "torch sees no CUDA"),
                           (["--model", "builtin:tiny-llama", "--calibration", "builtin:nosuchtask"],
                            "is not a built-in dataset"),
                           (["--model", "builtin:tiny-llama", "--calibration", str(tmp_path / "none.jsonl")],
                            "is not a file")):
        if "cuda:0" in extra and torch.cuda.is_available():
            continue
        assert main(prune + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    (tmp_path / "gpt2").mkdir()
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(str(tmp_path / "gpt2"))
    assert main(["estimate", "--model", str(tmp_path / "gpt2"), "--keep-ratio", "0.5"]) == 2
    assert "Llama-family" in capsys.readouterr().err
    import unittest.mock

    with unittest.mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}):
        assert main(["run", "--out", str(tmp_path / "r"), "--keep-ratio", "0.5"]) == 2
    assert "loram run is one process (WORLD_SIZE=2)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["prune", "--model", "builtin:tiny-llama", "--out", str(tmp_path / "p"), "--keep-ratio", "1.5"])
    assert "--keep-ratio: must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_loram_run_recovers_a_working_adapter_to_the_full_model_and_reruns_resume(tmp_path, capsys):
    """The built-in default, MLP pruned to a quarter: the adapter trained on the pruned model, recovered, teaches
    the full model the task (measured: exact match 0% -> 100%, eval loss 9.45 -> 0.003)."""
    from loram.cli import main

    out = tmp_path / "loram"
    args = ["run", "--config", "configs/default.yaml", "--out", str(out), "--keep-ratio", "0.25",
            "--attn-keep-ratio", "1", "--train.max_steps", "200", "--train.eval_every", "0",
            "--data.max_eval_samples", "64"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["prune"]["parameters_pruned"] < 0.55 * s["prune"]["parameters_full"]
    base, rec = s["full_model"], s["full_model_with_recovered_adapter"]
    assert base["eval_exact_match"] == 0.0 and rec["eval_exact_match"] >= 0.9
    assert rec["eval_loss"] < 0.05 * base["eval_loss"]
    from safetensors.torch import load_file
    w = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    down_a = next(v for k, v in w.items() if "layers.0.mlp.down_proj.lora_A" in k)
    assert down_a.shape[1] == 256 and int((down_a.abs().sum(0) > 0).sum()) == 64  # 64 of 256 channels trained
    mtime = os.path.getmtime(out / "pruned" / "model.safetensors")
    assert main(args) == 0  # a rerun reuses the pruned model and the finished training
    assert os.path.getmtime(out / "pruned" / "model.safetensors") == mtime
    assert json.loads((out / "summary.json").read_text())["full_model_with_recovered_adapter"] == rec
    # killed after the step-100 checkpoint: the rerun resumes training there and ends with the same adapter
    import shutil

    from safetensors.torch import load_file as load
    before = load(str(out / "adapter" / "adapter_model.safetensors"))
    ckpts = out / "train" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000200"
    shutil.rmtree(ckpts / "step-0000200")
    (ckpts / "latest").write_text("step-0000100\n")
    for gone in ("train/adapter", "train/summary.json", "adapter", "summary.json"):
        shutil.rmtree(out / gone) if (out / gone).is_dir() else (out / gone).unlink()
    assert main(args) == 0
    after = load(str(out / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    assert main(args[:-6] + ["--keep-ratio", "0.5"]) == 2
    assert "pruned with other settings keep_ratio=0.25 (now 0.5)" in capsys.readouterr().err
    # the pruned folder removed and made again with other settings: training done on the old plan is not reused
    shutil.rmtree(out / "pruned")
    assert main(args + ["--importance", "magnitude"]) == 2
    assert "holds training on another pruned model" in capsys.readouterr().err


def test_memory_estimate_matches_the_pruned_model_and_bitsandbytes_nf4_storage():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from loram.memory import estimate

    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(16)
    full = LlamaForCausalLM(config)
    e = estimate(config, 0.25, attn_keep_ratio=0.5)
    small = prune_model(full, make_plan(full, 0.25, attn_keep_ratio=0.5, importance="magnitude"))
    assert e["full"]["parameters"] == sum(p.numel() for p in full.parameters())
    assert e["pruned"]["parameters"] == sum(p.numel() for p in small.parameters())
    assert (e["kept_kv_heads"], e["kept_channels"]) == (1, 128)
    # NF4 bytes as bitsandbytes stores them (packed 4-bit weights, 8-bit block absmax, float32 second-level absmax),
    # the rest in the run's precision, loaded as lorafusion train loads an nf4 base
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        small.save_pretrained(d)
        for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            q = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(
                                                         load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
            stored = 0
            for p in q.parameters():
                stored += p.numel() * p.element_size()
                qs = getattr(p, "quant_state", None)
                if qs is not None:
                    stored += qs.absmax.numel() * qs.absmax.element_size()
                    stored += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            got = estimate(config, 0.25, attn_keep_ratio=0.5, precision=precision)["pruned"]["gib_nf4"] * 2**30
            assert got == pytest.approx(stored, rel=1e-3), precision
    assert e["reduction_16bit_to_pruned_nf4"] > 4



def test_write_folder_replaces_whole_or_not_at_all(tmp_path):
    from loram.recover import write_folder

    out = tmp_path / "out"
    write_folder(str(out), lambda d: open(os.path.join(d, "a"), "w").close())
    assert sorted(os.listdir(out)) == ["a"]

    def broken(d):
        open(os.path.join(d, "b"), "w").close()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder(str(out), broken)
    assert sorted(os.listdir(out)) == ["a"]  # the old folder stands
    real_rename, calls = os.rename, []

    def rename_failing_second(a, b):
        calls.append(a)
        if len(calls) == 2:  # the new folder into place
            raise OSError(18, "Invalid cross-device link")
        return real_rename(a, b)

    import unittest.mock
    with unittest.mock.patch("os.rename", rename_failing_second), pytest.raises(OSError):
        write_folder(str(out), lambda d: open(os.path.join(d, "z"), "w").close())
    assert sorted(os.listdir(out)) == ["a"]  # put back
    write_folder(str(out), lambda d: open(os.path.join(d, "c"), "w").close())
    assert sorted(os.listdir(out)) == ["c"]
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left behind
