"""Launchers: torchrun (DDP, 2 CPU processes over gloo) gives the 1-process adapter at the same global batch;
the deepspeed launcher (ZeRO-2, 2 CPU processes) completes and saves an adapter plain PEFT loads."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--train.max_steps", "4", "--train.eval_every", "0", "--train.generate_eval", "false",
        "--data.max_eval_samples", "8", "--batch.global_batch_size", "8", "--batch.micro_batch_size", "2",
        "--lora.r", "4", "--train.num_threads", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra):
    env = dict(os.environ, LORAFUSION_NO_PROGRESS="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd, **env):
    done = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _single(tmp_path, *extra):
    out = tmp_path / "single"
    _run([sys.executable, "-m", "lorafusion", "train", *ARGS, *extra, "--train.output_dir", str(out)])
    return out


# layer-wise GaLore averages its accumulated (projected, or full before an SVD) gradients across ranks itself:
# rank 2 refreshed every 2 steps crosses both paths in 4 steps
GALORE_LAYERWISE = ("--optimizer.name", "galore_adamw", "--optimizer.galore.layerwise", "true",
                    "--optimizer.galore.rank", "2", "--optimizer.galore.update_proj_gap", "2")


@pytest.mark.parametrize("extra", [(), GALORE_LAYERWISE], ids=["adamw", "galore_adamw_layerwise"])
def test_torchrun_two_processes_equal_one_process(tmp_path, extra):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    one = _single(tmp_path, *extra)
    out = tmp_path / "ddp"
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29517" if not extra else "29518", "-m", "lorafusion",
          "train", *ARGS, *extra, "--train.output_dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["distributed"], summary["world_size"]) == ("ddp", 2)
    _close(_adapter(one), _adapter(out))
    assert json.loads((one / "summary.json").read_text())["final_train_loss"] == pytest.approx(
        summary["final_train_loss"], rel=1e-5)


@pytest.mark.slow
def test_deepspeed_launcher_zero2_saves_a_loadable_adapter_and_resumes(tmp_path):
    pytest.importorskip("deepspeed")
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("deepspeed launcher not on PATH")
    ds_args = ["--train.deepspeed_config", os.path.join(ROOT, "configs", "ds_config.json"),
               "--train.save_every", "2", "--train.keep_checkpoints", "5"]
    out = tmp_path / "ds"
    _run([launcher, "--num_gpus", "2", "--master_port", "29518", "--module", "lorafusion", "train", *ARGS,
          "--train.output_dir", str(out), *ds_args], DS_ACCELERATOR="cpu")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["distributed"], summary["world_size"]) == ("deepspeed", 2)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out / "adapter"))
    assert sum(p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n) > 0
    _close(_adapter(_single(tmp_path)), _adapter(out))  # ZeRO-2 at the same global batch: the same update
    # resume from the step-2 checkpoint (ZeRO-2 optimizer partitions included) and finish: the same adapter
    part = tmp_path / "ds_part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    (part / "checkpoints" / "latest").write_text("step-0000002\n")
    done = _run([launcher, "--num_gpus", "2", "--master_port", "29519", "--module", "lorafusion", "train", *ARGS,
                 "--train.output_dir", str(part), *ds_args, "--resume"], DS_ACCELERATOR="cpu")
    assert "resumed from" in done.stderr + done.stdout
    _close(_adapter(out), _adapter(part))
