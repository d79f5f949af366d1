"""A run that cannot write (a full disk), a hand-edited checkpoint, a missing data file, a Ctrl-C before training:
one line naming the cause and where ``--resume`` continues, exit 2 (130 for the interrupt), nothing lost, and the
cheap checks made before the model loads."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from lorafusion.cli import main

os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")

BASE = ["train", "--train.eval_every", "0", "--train.generate_eval", "false", "--data.max_eval_samples", "8",
        "--batch.global_batch_size", "8", "--batch.micro_batch_size", "8", "--train.num_threads", "1",
        "--lora.r", "4", "--lora.dropout", "0.1", "--train.plot", "false", "--train.save_every", "2"]


def _args(out, *extra):
    return BASE + ["--train.output_dir", str(out), *extra]


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same_adapter(a, b):
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def through(tmp_path_factory):
    """The uninterrupted 4-step run each failed-and-resumed run must end equal to."""
    out = tmp_path_factory.mktemp("through") / "run"
    assert main(_args(out, "--train.max_steps", "4")) == 0
    return out


def _no_model_load(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the cheap checks")
    monkeypatch.setattr("lorafusion.train.trainer.load_base", refuse)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_resume_loses_nothing(tmp_path, monkeypatch, capsys,
                                                                                    through):
    """torch.save on a full disk raises a bare RuntimeError from its zip writer (measured on a 1.5 MiB tmpfs:
    "[enforce fail at inline_container.cc:672] . unexpected pos ..."); it was a traceback that left the half-written
    folder taking the space."""
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step-0000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 389696 vs 389584")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(_args(out, "--train.max_steps", "4")) == 2
    err = capsys.readouterr().err
    ckpts = out / "checkpoints"
    assert f"could not write the checkpoint of step 4 in {ckpts} (" in err and "MiB free there): RuntimeError" in err
    assert f"rerun with --resume to continue from {ckpts / 'step-0000002'}" in err and "Traceback" not in err
    assert sorted(os.listdir(ckpts)) == ["latest", "step-0000002"]  # the half-written folder is gone
    monkeypatch.setattr(torch, "save", real_save)
    assert main(_args(out, "--train.max_steps", "4", "--resume")) == 0
    _same_adapter(out, through)


def test_the_final_adapter_failing_to_write_resumes_to_it(tmp_path, monkeypatch, capsys, through):
    import peft

    out = tmp_path / "run"
    real = peft.PeftModel.save_pretrained

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", full_disk)
    assert main(_args(out, "--train.max_steps", "4")) == 2
    err = capsys.readouterr().err
    assert f"could not write the adapter to {out / 'adapter'}: OSError: [Errno 28] No space left on device" in err
    assert f"continue from {out / 'checkpoints' / 'step-0000004'}" in err and "Traceback" not in err
    monkeypatch.setattr(peft.PeftModel, "save_pretrained", real)
    assert main(_args(out, "--train.max_steps", "4", "--resume")) == 0
    _same_adapter(out, through)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    assert main(_args(out, "--train.max_steps", "4")) == 0
    return out


@pytest.mark.parametrize("content, problem", [
    ("[]", "must hold a JSON object, got list"),
    ('{"step": "4"}', "'step' must be a non-negative integer, got '4'"),
    ('{"step": -4}', "'step' must be a non-negative integer, got -4"),
    ('{"total_steps": 4}', "'step' must be a non-negative integer, got None"),
    ('{"step": true}', "'step' must be a non-negative integer, got True"),
    ('{"step": 4, "tokens_done": "many"}', "'tokens_done' must be a non-negative integer"),
    ('{"step": 4, "train_time_s": -1.0}', "'train_time_s' must be a non-negative number"),
    ('{"step": 4, "eval_loss_before": "low"}', "'eval_loss_before' must be a number or null"),
    ('{"step": 4, "data_fingerprint": 7}', "'data_fingerprint' must be a string, got 7"),
    ('{"step": 4', "JSONDecodeError"),
])
def test_a_hand_edited_trainer_state_is_a_checkpoint_error_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                                  two_checkpoints, content, problem):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    (out / "checkpoints" / "step-0000004" / "trainer_state.json").write_text(content)
    (out / "summary.json").unlink()
    _no_model_load(monkeypatch)
    assert main(_args(out, "--train.max_steps", "6", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint error: checkpoint {out / 'checkpoints' / 'step-0000004'} is corrupt or unreadable: " \
           f"trainer_state.json: " in err and problem in err, err
    assert "complete earlier checkpoints: step-0000002" in err and "Traceback" not in err


def test_the_state_a_run_writes_passes_the_check(two_checkpoints):
    from lorafusion.train.checkpoint import read_state

    state = read_state(str(two_checkpoints / "checkpoints" / "step-0000004"))
    assert state["step"] == 4 and state["tokens_done"] > 0 and len(state["data_fingerprint"]) == 64


def test_a_missing_data_file_is_named_by_its_key_before_the_model_loads(tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    assert main(_args(tmp_path / "a", "--data.train", str(tmp_path / "nope.jsonl"))) == 2
    assert f"data error: data.train: data file not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "abc"}\n' * 4)
    assert main(_args(tmp_path / "b", "--data.train", str(good), "--data.eval", str(tmp_path))) == 2
    assert f"data error: data.eval: data file {tmp_path} is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("checkpointed", [False, True])
def test_ctrl_c_before_training_exits_130_with_where_to_resume(tmp_path, monkeypatch, capsys, checkpointed,
                                                               two_checkpoints):
    out = tmp_path / "run"
    if checkpointed:
        shutil.copytree(two_checkpoints, out)
        (out / "summary.json").unlink()

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("lorafusion.train.trainer.load_base", interrupted)
    assert main(_args(out, "--train.max_steps", "6", *(["--resume"] if checkpointed else []))) == 130
    err = capsys.readouterr().err
    want = (f"rerun with --resume to continue from {out / 'checkpoints' / 'step-0000004'}" if checkpointed
            else "no checkpoint was written yet, so a rerun starts from step 0")
    assert f"lorafusion train: interrupted; {want}" in err and "Traceback" not in err


def _can_mount_tmpfs(path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode
    if ok == 0:
        subprocess.run(["umount", str(path)], check=True)
    return ok == 0


def test_a_real_full_disk(tmp_path, capsys, through):
    """The same on a real full disk: a tmpfs sized to hold a run at its step-2 checkpoint and half of another."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("needs root and a mountable tmpfs to make a small disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "run"
        shutil.copytree(through, out)  # back to step 2, as the corrupt-checkpoint hint says to
        shutil.rmtree(out / "checkpoints" / "step-0000004")
        shutil.rmtree(out / "adapter")
        (out / "checkpoints" / "latest").write_text("step-0000002\n")
        (out / "summary.json").unlink()
        used = shutil.disk_usage(disk).used
        ckpt = sum(f.stat().st_size for f in (out / "checkpoints" / "step-0000002").iterdir())
        subprocess.run(["mount", "-o", f"remount,size={used + ckpt // 2}", str(disk)], check=True)
        assert main(_args(out, "--train.max_steps", "4", "--resume")) == 2
        err = capsys.readouterr().err
        assert "could not write the checkpoint of step 4" in err and "Traceback" not in err
        assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000002"]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(_args(out, "--train.max_steps", "4", "--resume")) == 0
        _same_adapter(out, through)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("extra, message", [
    (["--optimizer.name", "galore_adamw"], "config error: optimizer.name: galore_adamw cannot run under deepspeed"),
    (["--optimizer.galore.layerwise", "true"],
     "config error: optimizer.galore.layerwise: true cannot run under deepspeed"),
])
def test_galore_and_layerwise_hooks_are_refused_under_deepspeed_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                                        extra, message):
    """ZeRO replaces the parameters with flat 1-D partitions after the optimizer is built: GaLore's first step was a
    KeyError on a tensor, the layer-wise hooks' one inside engine.backward (a reviewer ran both under ZeRO-2)."""
    from lorafusion.train.distributed import DistState

    monkeypatch.setattr("lorafusion.train.distributed.setup", lambda *_a, **_k: DistState("deepspeed"))
    _no_model_load(monkeypatch)
    assert main(_args(tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "use torchrun (DDP) or" in err and "Traceback" not in err


def test_a_second_run_in_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two runs in one folder both ran, interleaving metrics.jsonl and overwriting each other's checkpoints: the
    folder was refused only once it held a checkpoint (a reviewer started two main jobs in the same second)."""
    import sys
    import time

    out = tmp_path / "run"
    env = dict(os.environ, LORAFUSION_NO_PROGRESS="1", LORAFUSION_DEBUG_STEP_SLEEP="0.5")
    first = subprocess.Popen([sys.executable, "-m", "lorafusion", *_args(out, "--train.max_steps", "40")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < end:  # it holds the folder by now
            time.sleep(0.1)
        assert main(_args(out, "--train.max_steps", "2")) == 2
        assert f"train.output_dir {out} is in use by another run (pid {first.pid})" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    from lorafusion.train.trainer import _lock_output

    os.close(_lock_output(str(out)))  # a killed run's lock goes with it


def test_sigterm_while_the_builtin_model_is_made_exits_143_and_leaves_no_half_built_folder(tmp_path):
    """SIGTERM before the training loop (here: while builtin:tiny-llama pre-trains into an empty cache) killed the
    process on the spot, with no message and its temporary folder left in the cache. It now unwinds: exit 143, one
    line saying where --resume continues, the temporary folder removed."""
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    env = dict(os.environ, LORAFUSION_CACHE=str(cache), LORAFUSION_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorafusion", "train", "--train.output_dir", str(tmp_path / "run"),
                             "--train.max_steps", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    end = time.time() + 120
    building = []
    while not building and time.time() < end and proc.poll() is None:
        time.sleep(0.05)
        building = [p for p in (cache / "presets").glob("tiny-llama-*.tmp-*")] if (cache / "presets").is_dir() else []
    assert building, "the built-in model's build never started"
    time.sleep(1.0)  # into the pre-training loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert ("lorafusion train: terminated (SIGTERM); no checkpoint was written yet, so a rerun starts from step 0"
            in err) and "Traceback" not in err
    assert not list((cache / "presets").glob("tiny-llama-*")), list((cache / "presets").iterdir())


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_at_once_and_keeps_its_kind(sig, capsys):
    """The first signal finishes the step and checkpoints; a second one stops now. A second SIGTERM (an
    orchestrator's kill after its grace period) exited 130 as if it were Ctrl-C; it exits 143 now."""
    import signal

    from lorafusion.cli import _sigterm_interrupts
    from lorafusion.train.trainer import Terminated, _Stop

    signum = getattr(signal, sig)
    before = signal.getsignal(signal.SIGTERM)
    with _sigterm_interrupts(), _Stop() as stop:
        stop._handle(signum, None)
        assert stop.signal == sig
        with pytest.raises(KeyboardInterrupt) as exc:
            stop._handle(signum, None)
    assert isinstance(exc.value, Terminated) == (sig == "SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before  # both handlers put back
