"""Short runs of the main job on the built-in default: eval loss falls, files appear, the adapter loads in PEFT."""
import json
import os

import pytest
import torch

from lorafusion.cli import main
from lorafusion.train import load_config, run_training

os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")

SMALL = {"train": {"max_steps": 12, "eval_every": 6, "save_every": 6, "num_threads": 1, "max_new_tokens": 8},
         "data": {"max_eval_samples": 24, "max_length": 32},
         "batch": {"global_batch_size": 16, "micro_batch_size": 8}, "lora": {"r": 8}}


def _cfg(out, **sections):
    ov = {k: dict(v) for k, v in SMALL.items()}
    for k, v in sections.items():
        ov.setdefault(k, {}).update(v)
    ov["train"]["output_dir"] = str(out)
    return load_config(None, ov)


def test_default_model_eval_loss_falls_and_outputs_are_written(tmp_path):
    out = tmp_path / "run"
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(3)  # the run asks for 1 and must hand the caller's 3 back
    try:
        summary = run_training(_cfg(out))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(caller_threads)
    assert summary["status"] == "completed" and summary["step"] == 12
    assert summary["eval_loss_after"] < 0.7 * summary["eval_loss_before"]
    assert summary["lora_path"] == "lorafusion" and summary["fused_layers"] > 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss_curve.png", "train.log",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in recs if "eval_loss" in r] == [0, 6, 12]
    assert all("eval_exact_match" in r for r in recs if "eval_loss" in r)
    assert load_config(str(out / "config.yaml")).to_dict() == _cfg(out).to_dict()
    s = json.loads((out / "summary.json").read_text())
    for key in ("tokens_per_s", "peak_memory_mb", "final_train_loss", "eval_loss_before", "eval_loss_after",
                "eval_exact_match_before", "eval_exact_match_after"):
        assert s[key] is not None, key
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000006", "step-0000012"]


def test_adapter_loads_with_plain_peft_and_gives_the_same_outputs(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafusion.train.data import load_split
    from lorafusion.train.trainer import evaluate_loss

    out = tmp_path / "run"
    cfg = _cfg(out, train={"eval_every": 0, "max_steps": 6, "generate_eval": False}, lora={"dropout": 0.1})
    summary = run_training(cfg)
    base_dir = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert not any("lorafusion" in type(m).__module__ for m in model.modules())  # plain PEFT layers
    tok = AutoTokenizer.from_pretrained(base_dir)
    _, evals, _, _ = load_split(cfg.data, tok, cfg.train.seed)
    from contextlib import nullcontext

    plain = evaluate_loss(model, evals, 8, cfg, tok.pad_token_id, torch.device("cpu"), nullcontext)
    assert plain == pytest.approx(summary["eval_loss_after"], rel=1e-5)
    # and by hand: W + (alpha / r) B A reproduces PEFT's outputs
    merged = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    scale = cfg.lora.alpha / cfg.lora.r
    with torch.no_grad():
        for name, mod in merged.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in weights:
                mod.weight += scale * weights[key.replace("lora_A", "lora_B")] @ weights[key]
        ids = torch.tensor([tok("ABCD=abcd")["input_ids"]])
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_nf4_base_trains_its_adapter_and_the_adapter_serves_the_full_precision_base(tmp_path):
    """QLoRA: the frozen linears are 4-bit NF4 (bitsandbytes, CPU), the LM head is not; eval loss falls; the adapter
    is standard PEFT and, on the unquantized base, gives outputs within NF4's error of the 4-bit model's."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    cfg = _cfg(out, model={"quantization": "nf4"}, train={"eval_every": 0, "max_steps": 12, "generate_eval": False})
    from lorafusion.train.presets import model_preset_path
    from lorafusion.train.trainer import build_adapter, load_base

    _, base = load_base(model_preset_path("tiny-llama"), cfg, torch.device("cpu"))
    linears = {n: type(m) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") is torch.nn.Linear
    assert linears and all(t is bnb.nn.Linear4bit for t in linears.values())
    assert build_adapter(base, cfg)[1]["path"] == "peft"  # PEFT's bitsandbytes LoRA layers, said in the log
    summary = run_training(cfg)
    assert summary["status"] == "completed"
    assert summary["eval_loss_after"] < 0.7 * summary["eval_loss_before"]
    base_dir = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     str(out / "adapter")).eval()
    _, q4 = load_base(base_dir, cfg, torch.device("cpu"))
    q4 = PeftModel.from_pretrained(q4, str(out / "adapter")).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(base_dir)("ABCD=abcd")["input_ids"]])
    with torch.no_grad():
        a, b = full(input_ids=ids).logits, q4(input_ids=ids).logits
    err = float((a - b).norm() / a.norm())
    assert 1e-4 < err < 0.2  # NF4 moves the outputs (so the 4-bit path really ran), but not far


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["train", "--lora.rank", "4"]) == 2
    assert "unknown config key 'lora.rank'" in capsys.readouterr().err
    assert main(["train", "--model.name_or_path", str(tmp_path / "missing"),
                 "--train.output_dir", str(tmp_path / "o1")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "AB=", "completion": "ab"}\n{"prompt": "CD=", "completion": "cd"}\n{oops\n'
                   '{"prompt": "EF=", "completion": "ef"}\n' * 3)
    args = ["train", "--data.train", str(bad), "--data.eval_fraction", "0.25", "--train.max_steps", "1",
            "--batch.global_batch_size", "2", "--batch.micro_batch_size", "2", "--train.generate_eval", "false",
            "--train.num_threads", "1"]
    assert main(args + ["--train.output_dir", str(tmp_path / "o2")]) == 2
    assert "bad.jsonl:3: not valid JSON" in capsys.readouterr().err
    assert main(args + ["--train.output_dir", str(tmp_path / "o3"), "--skip-bad-lines"]) == 0
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["data"]["skipped_bad_lines"] == 3
    assert main(["plan-nothing"]) == 2


def test_plan_subcommand_dispatches_to_the_planner(capsys):
    pytest.importorskip("scheduling.cli")
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--help"])
    assert exc.value.code == 0
    assert "--jobs" in capsys.readouterr().out  # the planner's own usage text


def test_corrupt_checkpoint_and_existing_output_are_clear_errors(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--train.output_dir", str(out), "--train.max_steps", "2", "--train.save_every", "1",
            "--train.generate_eval", "false", "--data.max_eval_samples", "8", "--batch.global_batch_size", "8",
            "--batch.micro_batch_size", "8", "--train.num_threads", "1"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # --resume on a finished run: nothing to do, and the summary (throughput included) is kept as it was
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text()) == summary and summary["tokens_per_s"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()].count(2) == 2  # loss, eval
    # a key that fixes the run (here the adapter rank) may not change on resume
    assert main(args + ["--resume", "--train.max_steps", "3", "--lora.r", "8"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the config differs from the run" in err and "lora.r: 16 in the run, 8 now" in err
    (out / "checkpoints" / "step-0000002" / "optimizer.pt").write_bytes(b"garbage")
    assert main(args + ["--resume", "--train.max_steps", "3"]) == 2  # extending the run loads the checkpoint
    assert "corrupt or unreadable" in capsys.readouterr().err


def test_run_killed_before_its_first_checkpoint_starts_clean(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 9.0}\n{"step": 1, "loss": 9.0}\n')  # the dead run's
    args = ["train", "--train.output_dir", str(out), "--train.max_steps", "2", "--train.generate_eval", "false",
            "--data.max_eval_samples", "8", "--batch.global_batch_size", "8", "--batch.micro_batch_size", "8",
            "--train.num_threads", "1", "--train.plot", "false"]
    assert main(args + ["--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2], steps


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_local_model_folder_of_other_architectures(tmp_path, arch):
    """A local HF folder (here a tiny random Qwen2 / Mistral with the built-in tokenizer) and a JSONL file; epochs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafusion.train.presets import build_tokenizer

    tok = build_tokenizer()
    cfg = AutoConfig.for_model(arch, vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p + "=", "completion": p.lower()}) + "\n"
                            for p in ["ABC", "DEF", "GHIA", "BCD", "EFGH", "IJK", "LKJ", "HGFE"] * 2))
    out = tmp_path / "run"
    summary = run_training(load_config(None, {
        "model": {"name_or_path": str(folder)}, "data": {"train": str(data), "eval_fraction": 0.25},
        "lora": {"target_modules": ["q_proj", "v_proj"], "r": 2},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "train": {"output_dir": str(out), "max_steps": None, "epochs": 1.0, "eval_every": 0, "num_threads": 1,
                  "max_new_tokens": 6}}))
    assert summary["status"] == "completed" and summary["step"] == 3  # 12 training samples / 4 per step
    assert summary["fused_layers"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path):
    from lorafusion.train.trainer import _read_metrics, _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 2.0}\n{"step": 1, "loss": 1.5}\n{"step": 2, "loss": 1.4}\n{"step": 3, "lo')
    assert [r["step"] for r in _read_metrics(str(path))] == [0, 1, 2]
    _truncate_metrics(str(path), 1)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1]
