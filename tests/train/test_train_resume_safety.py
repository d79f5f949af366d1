"""What a resumed run takes from its checkpoint and what from the new config; checkpoints found without the
``latest`` pointer; data that changed under a run; the recovery hint for a corrupt checkpoint."""
import json
import os
import shutil

import pytest
import torch

from lorafusion.cli import main

os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")

BASE = ["train", "--train.eval_every", "0", "--train.generate_eval", "false", "--data.max_eval_samples", "8",
        "--batch.global_batch_size", "8", "--batch.micro_batch_size", "8", "--train.num_threads", "1",
        "--lora.r", "4", "--train.plot", "false"]


def _args(out, *extra):
    return BASE + ["--train.output_dir", str(out), *extra]


def _lrs(out):
    return {json.loads(x)["step"]: json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "lr" in json.loads(x)}


def test_resume_trains_with_the_new_configs_lr_and_weight_decay(tmp_path):
    """lr, schedule and weight decay may change on resume: the steps after it use the new values (the checkpoint's
    optimizer state brought its run's settings with it, which used to win silently)."""
    out = tmp_path / "run"
    sched = ["--optimizer.schedule", "constant", "--optimizer.warmup_steps", "0", "--train.save_every", "2"]
    assert main(_args(out, *sched, "--train.max_steps", "2", "--optimizer.lr", "0.003")) == 0
    assert main(_args(out, *sched, "--train.max_steps", "4", "--optimizer.lr", "0.0001", "--optimizer.weight_decay",
                      "0.5", "--resume")) == 0
    lrs = _lrs(out)
    assert lrs[1] == lrs[2] == pytest.approx(0.003) and lrs[3] == lrs[4] == pytest.approx(0.0001)
    saved = torch.load(out / "checkpoints" / "step-0000004" / "optimizer.pt", weights_only=True)
    assert all(g["weight_decay"] == 0.5 and g["lr"] == pytest.approx(0.0001) for g in saved["param_groups"])
    # a cosine schedule over a longer run: the steps after the resume get the lr of a run that used the new
    # config throughout
    common = ["--optimizer.schedule", "cosine", "--optimizer.warmup_steps", "1", "--train.save_every", "2"]
    cos, through = tmp_path / "cos", tmp_path / "through"
    assert main(_args(cos, *common, "--train.max_steps", "2", "--optimizer.lr", "0.002")) == 0
    assert main(_args(cos, *common, "--train.max_steps", "6", "--optimizer.lr", "0.004", "--resume")) == 0
    assert main(_args(through, *common, "--train.max_steps", "6", "--optimizer.lr", "0.004")) == 0
    got, want = _lrs(cos), _lrs(through)
    assert [got[s] for s in (3, 4, 5, 6)] == pytest.approx([want[s] for s in (3, 4, 5, 6)])
    assert got[2] != pytest.approx(want[2])  # the steps before the resume ran under the old lr


def test_resume_on_a_finished_run_keeps_its_config(tmp_path):
    out = tmp_path / "run"
    assert main(_args(out, "--train.max_steps", "2", "--train.save_every", "2")) == 0
    before = (out / "config.yaml").read_text()
    assert main(_args(out, "--train.max_steps", "2", "--train.save_every", "2", "--optimizer.lr", "0.1",
                      "--resume")) == 0
    assert (out / "config.yaml").read_text() == before


def test_resume_asking_for_fewer_steps_than_the_run_took_is_refused(tmp_path, capsys):
    """A run at step 4 resumed with train.max_steps 2 was marked "completed" at step 4 of 2 and its config rewritten;
    now refused, the run's files untouched. A changed model.quantization is refused like the other fixed keys."""
    out = tmp_path / "run"
    assert main(_args(out, "--train.max_steps", "4", "--train.save_every", "2")) == 0
    before = {f: (out / f).read_text() for f in ("config.yaml", "summary.json", "metrics.jsonl")}
    assert main(_args(out, "--train.max_steps", "2", "--train.save_every", "2", "--resume")) == 2
    assert "is at step 4, past the 2 steps asked for" in capsys.readouterr().err
    assert {f: (out / f).read_text() for f in before} == before
    assert main(_args(out, "--train.max_steps", "6", "--train.save_every", "2", "--resume",
                      "--model.quantization", "nf4")) == 2
    assert "model.quantization: 'none' in the run, 'nf4' now" in capsys.readouterr().err


def test_checkpoints_without_the_latest_pointer_are_found_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--train.max_steps", "4", "--train.save_every", "2", "--train.keep_checkpoints",
                      "5")) == 0
    (out / "checkpoints" / "latest").unlink()
    # a fresh start in the folder is refused: it holds finished checkpoints
    assert main(_args(out, "--train.max_steps", "2")) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000002", "step-0000004"]
    # --resume continues from the newest complete one
    assert main(_args(out, "--train.max_steps", "6", "--train.save_every", "2", "--train.keep_checkpoints", "5",
                      "--resume")) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000006"


def test_corrupt_latest_checkpoint_names_the_intact_earlier_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--train.max_steps", "4", "--train.save_every", "2", "--train.keep_checkpoints",
                      "2")) == 0
    (out / "checkpoints" / "step-0000004" / "adapter.safetensors").write_bytes(b"x" * 100)
    assert main(_args(out, "--train.max_steps", "6", "--train.save_every", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "corrupt or unreadable" in err and "complete earlier checkpoints: step-0000002" in err
    before = (out / "config.yaml").read_text()
    assert main(_args(out, "--train.max_steps", "6", "--train.save_every", "2", "--optimizer.lr", "0.5",
                      "--resume")) == 2
    assert (out / "config.yaml").read_text() == before  # a refused resume leaves the run's config
    (out / "checkpoints" / "latest").write_text("step-0000002\n")  # what the hint says to do
    assert main(_args(out, "--train.max_steps", "6", "--train.save_every", "2", "--resume")) == 0


def test_skip_bad_lines_with_a_data_section_override(tmp_path, capsys):
    assert main(_args(tmp_path / "run", "--train.max_steps", "1", "--data", "{packing: false}",
                      "--skip-bad-lines")) == 0
    assert main(_args(tmp_path / "bad", "--data", "5", "--skip-bad-lines")) == 2
    assert "--data must be a mapping" in capsys.readouterr().err


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    from lorafusion.train import checkpoint as ckpt

    d = tmp_path / "checkpoints"
    for step in (8, 9):  # a higher-numbered leftover
        (d / f"step-{step:07d}").mkdir(parents=True)
        (d / f"step-{step:07d}" / "COMPLETE").write_text("ok\n")
    ckpt.begin(str(tmp_path), 3)
    ckpt.commit(str(tmp_path), 3, keep=2)
    assert sorted(os.listdir(d)) == ["latest", "step-0000003", "step-0000009"]


def test_resume_with_changed_data_is_refused(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    recs = [{"prompt": w.upper() + "=", "completion": w} for w in ("abc", "defg", "hi", "jkl", "mnop", "qr") * 4]
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "run"
    extra = ["--data.train", str(data), "--data.eval_fraction", "0.25", "--train.save_every", "1"]
    assert main(_args(out, *extra, "--train.max_steps", "1")) == 0
    with data.open("a") as fh:
        fh.write(json.dumps({"prompt": "XYZ=", "completion": "xyz"}) + "\n")
    assert main(_args(out, *extra, "--train.max_steps", "2", "--resume")) == 2
    assert "differs from the data the run" in capsys.readouterr().err
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")  # the run's data again: resumes
    # a trimmed eval set would put the before / after eval figures on different samples: a key the run keeps
    assert main(_args(out, *extra, "--train.max_steps", "2", "--resume", "--data.max_eval_samples", "4")) == 2
    assert "data.max_eval_samples: 8 in the run, 4 now" in capsys.readouterr().err
    assert main(_args(out, *extra, "--train.max_steps", "2", "--resume")) == 0


def test_regex_target_that_also_matches_other_modules_is_a_config_error(tmp_path, capsys):
    assert main(_args(tmp_path / "r", "--train.max_steps", "1", "--lora.target_modules", r".*layers\.1\..*")) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "not Linear layers" in err and "LlamaAttention" in err


def test_throughput_of_a_resumed_run_covers_every_segment(tmp_path):
    out = tmp_path / "run"
    assert main(_args(out, "--train.max_steps", "3", "--train.save_every", "2")) == 0
    first = json.loads((out / "summary.json").read_text())
    assert main(_args(out, "--train.max_steps", "5", "--train.save_every", "2", "--resume")) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    # resumed from the final step-3 checkpoint: its tokens and time come from it, steps 4-5 from this segment
    assert summary["tokens"] == sum(r["tokens"] for r in steps) > first["tokens"]
    assert summary["train_time_s"] == pytest.approx(sum(r["time_s"] for r in steps), rel=1e-9)
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_time_s"])


def test_a_lora_backend_that_cannot_run_here_is_a_config_error(tmp_path, capsys):
    """lora.backend cuda on a machine without the CUDA kernels passed validation and crashed with a traceback in
    the first forward; now a config error naming the key, before training."""
    from lorafusion.backends import available_backends

    if available_backends()["cuda"] == "available":
        pytest.skip("the cuda backend runs here")
    assert main(_args(tmp_path / "run", "--train.max_steps", "1", "--lora.backend", "cuda")) == 2
    err = capsys.readouterr().err
    assert "lora.backend: backend 'cuda' was requested but is unavailable" in err and "Traceback" not in err


def test_a_kill_after_the_final_checkpoint_does_not_repeat_the_final_eval_line(tmp_path):
    """Killed after the final checkpoint and its eval line but before summary.json, each --resume logged the final
    eval again (a reviewer's kill loop piled up 30 identical lines)."""
    out = tmp_path / "run"
    args = ["--train.max_steps", "2", "--train.save_every", "2", "--train.eval_every", "1"]
    assert main(_args(out, *args)) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    finals = [x for x in lines if json.loads(x)["step"] == 2 and "loss" not in json.loads(x)]
    assert len(finals) == 1
    for _ in range(2):  # as if killed after the final eval line, before the summary
        (out / "summary.json").unlink()
        assert main(_args(out, *args, "--resume")) == 0
        assert (out / "metrics.jsonl").read_text().splitlines() == lines
