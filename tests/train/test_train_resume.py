"""Never lose work: a run killed with SIGKILL and resumed ends with the adapter of an uninterrupted run;
SIGTERM finishes the step, checkpoints and exits cleanly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--train.max_steps", "8", "--train.save_every", "2", "--train.eval_every", "0",
        "--train.generate_eval", "false", "--data.max_eval_samples", "8", "--batch.global_batch_size", "8",
        "--batch.micro_batch_size", "4", "--lora.r", "4", "--lora.dropout", "0.1", "--train.num_threads", "1"]


def _env(sleep=0.0):
    env = dict(os.environ, LORAFUSION_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    if sleep:
        env["LORAFUSION_DEBUG_STEP_SLEEP"] = str(sleep)
    return env


def _cmd(out, *extra):
    return [sys.executable, "-m", "lorafusion", "train", *ARGS, "--train.output_dir", str(out), *extra]


def _steps_done(out):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _wait_for_step(proc, out, step, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        if _steps_done(out) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    from lorafusion.cli import main

    ref = tmp_path / "ref"
    os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")
    assert main(_cmd(ref)[3:]) == 0  # the uninterrupted run, in this process
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed), env=_env(sleep=0.4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(proc, killed, 5)  # checkpoint at 4 is written; step 5 is in flight or done, never saved
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "latest").read_text().strip() in ("step-0000004", "step-0000006")
    assert not (killed / "adapter").exists()
    done = subprocess.run(_cmd(killed, "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    a, b = _adapter(ref), _adapter(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # the lost step's line was dropped and redone once


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, "--train.save_every", "0"), env=_env(sleep=0.4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received" in err and "continue with --resume" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert 2 <= stopped_at < 8
    done = subprocess.run(_cmd(out, "--resume", "--train.save_every", "0"), env=_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["step"] == 8


@pytest.mark.parametrize("opt", [
    ["--optimizer.name", "adamw"],
    ["--optimizer.name", "galore_adamw", "--optimizer.galore.rank", "2", "--optimizer.galore.update_proj_gap", "2"],
    ["--optimizer.name", "galore_adamw", "--optimizer.galore.rank", "2", "--optimizer.galore.layerwise", "true"],
    ["--optimizer.name", "adamw8bit"],
    ["--optimizer.name", "adamw", "--model.quantization", "nf4"],
], ids=["adamw", "galore_adamw", "galore_adamw_layerwise", "adamw8bit", "adamw_nf4_base"])
def test_resume_from_a_checkpoint_equals_running_through(tmp_path, opt):
    """In one process: resuming from the step-4 checkpoint gives the adapter of the run that went straight on."""
    pytest.importorskip("galore")
    import shutil

    from lorafusion.cli import main

    os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")
    full = tmp_path / "full"
    assert main(["train", *ARGS, *opt, "--train.keep_checkpoints", "5", "--train.output_dir", str(full)]) == 0
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000004", part / "checkpoints" / "step-0000004")
    (part / "checkpoints" / "latest").write_text("step-0000004\n")
    assert main(["train", *ARGS, *opt, "--train.keep_checkpoints", "5", "--train.output_dir", str(part),
                 "--resume"]) == 0
    a, b = _adapter(full), _adapter(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_killed_during_the_final_eval_resumes_to_the_same_adapter(tmp_path):
    """A run killed after its last checkpoint (step == max_steps) but before the final eval wrote the adapter and
    summary: --resume runs no step, does the final eval and writes the adapter of the uninterrupted run."""
    import shutil

    from lorafusion.cli import main

    os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")
    full = tmp_path / "full"
    assert main(["train", *ARGS, "--train.output_dir", str(full)]) == 0
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "adapter")
    (cut / "summary.json").unlink()
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    assert main(["train", *ARGS, "--train.output_dir", str(cut), "--resume"]) == 0
    a, b = _adapter(full), _adapter(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k])
    s_full = json.loads((full / "summary.json").read_text())
    s_cut = json.loads((cut / "summary.json").read_text())
    assert s_cut["status"] == "completed" and s_cut["step"] == 8
    assert s_cut["eval_loss_after"] == pytest.approx(s_full["eval_loss_after"], rel=1e-6)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # no step was run again
