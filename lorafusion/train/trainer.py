"""The LoRA fine-tuning loop behind ``lorafusion train``.

One optimizer step consumes ``batch.global_batch_size`` samples over all processes; each process runs
``grad_accum`` microbatches of ``micro`` samples. The loss of a step is the sum of token cross-entropies over every
completion token of the step divided by that number of tokens (known on every rank without communication), so one
process and N processes at the same global batch compute the same gradient.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import time

import torch
import torch.nn.functional as F

from lorafusion.train import checkpoint as ckpt
from lorafusion.train import distributed as dist_utils
from lorafusion.train.config import DEFAULT_MAX_STEPS, ConfigError, RunConfig, save_config
from lorafusion.train.data import Sample, StepBatches, check_data_file, collate, data_files, load_split

logger = logging.getLogger("lorafusion.train")


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says why."""


# ----------------------------------------------------------------------------------------------- model and adapter
def resolve_model_path(name_or_path: str, ds) -> str:
    if name_or_path.startswith("builtin:"):
        from lorafusion.train.presets import model_preset_path

        if ds.is_main:
            path = model_preset_path(name_or_path[len("builtin:"):])
        dist_utils.barrier(ds)
        if not ds.is_main:
            path = model_preset_path(name_or_path[len("builtin:"):])
        return path
    if not os.path.isdir(name_or_path):
        raise TrainError(f"model.name_or_path: model folder not found: {name_or_path} "
                         "(a local Hugging Face folder, or builtin:tiny-llama)")
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise TrainError(f"model.name_or_path: {name_or_path} has no config.json; is it a Hugging Face model folder?")
    return name_or_path


def load_base(path: str, cfg: RunConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise TrainError(f"model.name_or_path: cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    quant = {}
    if cfg.model.quantization != "none":
        from transformers import BitsAndBytesConfig

        # QLoRA's recipe: 4-bit weights in blocks, computing in the run's precision; the LM head stays as loaded
        quant = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quantization, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     attn_implementation=cfg.model.attn_implementation, **quant)
    except Exception as exc:  # noqa: BLE001
        raise TrainError(f"model.name_or_path: cannot load a causal LM from {path}"
                         + (f" in {cfg.model.quantization}" if quant else "") + f": {exc}") from None
    if quant:  # a 4-bit model is placed by device_map (transformers refuses .to on it)
        logger.info("model.quantization: %s base, %.1f MiB of weights", cfg.model.quantization,
                    model.get_memory_footprint() / 2**20)
        return tokenizer, model
    return tokenizer, model.to(device)


def _target_modules(model, spec):
    """PEFT's ``target_modules`` for ``spec``, after checking that it selects at least one Linear layer (and each
    list entry one) and nothing else (PEFT cannot put LoRA on an attention block or a norm)."""
    import re

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if spec == "all-linear":
        return "all-linear"
    if isinstance(spec, list):
        def matches(name: str, key: str) -> bool:  # PEFT's rule for a list: the full path or a dotted suffix
            return name == key or name.endswith("." + key)

        def selects(name: str) -> bool:
            return any(matches(name, s) for s in spec)

        missing = [s for s in spec if not any(matches(n, s) for n in linear)]
        if not any(selects(n) for n in linear) or missing:
            names = sorted({n.split(".")[-1] for n in linear})
            raise ConfigError(f"lora.target_modules: {missing or spec} match no Linear layer of the model "
                              f"(its Linear layers: {', '.join(names)})")
    else:
        try:
            rx = re.compile(spec)
        except re.error as exc:
            raise ConfigError(f"lora.target_modules: {spec!r} is neither all-linear nor a valid regex ({exc})") \
                from None

        def selects(name: str) -> bool:  # PEFT's rule for a string: a regex matching the whole path
            return rx.fullmatch(name) is not None

        if not any(selects(n) for n in linear):
            raise ConfigError(f"lora.target_modules: regex {spec!r} matches no Linear layer of the model")
    other = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
             if n and not isinstance(m, torch.nn.Linear) and selects(n)]
    if other:
        raise ConfigError(f"lora.target_modules: {spec!r} also selects modules that are not Linear layers "
                          f"({', '.join(other[:4])}{', ...' if len(other) > 4 else ''}); narrow it to Linear layers")
    return spec


def build_adapter(model, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    l = cfg.lora
    lcfg = LoraConfig(r=l.r, lora_alpha=l.alpha, lora_dropout=l.dropout, use_rslora=l.rslora,
                      target_modules=_target_modules(model, l.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    fused_info = {"fused": 0, "unfused": 0, "path": "peft"}
    if l.fused and cfg.model.quantization != "none":
        logger.warning("lora.fused: the %s base keeps PEFT's bitsandbytes LoRA layers (the fused kernels read the "
                       "base weight in 16 / 32 bits)", cfg.model.quantization)
    elif l.fused:
        try:
            from lorafusion import patch_peft
        except ImportError as exc:
            logger.warning("lora.fused: lorafusion.patch_peft is unavailable (%s); running PEFT's own layers", exc)
        else:
            if l.backend not in (None, "auto"):  # a backend that cannot run here: a config error before training,
                # not a RuntimeError from the first forward after the model has loaded
                from lorafusion.backends import get_backend

                device_type = next(model.parameters()).device.type
                try:
                    get_backend(device_type, l.backend)
                except (RuntimeError, ValueError) as exc:
                    raise ConfigError(f"lora.backend: {exc} (got {l.backend!r}; 'auto' picks one that runs)") \
                        from None
            info = patch_peft(model, backend=l.backend)
            fused_info = {"fused": len(info["fused"]), "unfused": len(info["unfused"]), "path": "lorafusion"}
            logger.info("lora: %d LoRA Linear layers fused (%d unfused)", fused_info["fused"], fused_info["unfused"])
    else:
        logger.info("lora: PEFT's own LoRA layers (lora.fused=false)")
    return model, fused_info


# ----------------------------------------------------------------------------------------------- optimizer
def _torch_adamw(model, cfg: RunConfig, **_):
    o = cfg.optimizer
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                             weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)


def _galore(name):
    def build(model, cfg: RunConfig, grad_accum: int = 1):
        try:
            import galore
        except ImportError as exc:
            raise TrainError(f"optimizer.name={name!r} needs the galore package: {exc}") from None
        o, g = cfg.optimizer, cfg.optimizer.galore
        extra = {} if name == "galore_adafactor" else {"betas": tuple(o.betas), "eps": o.eps}
        return galore.build_optimizer(model, name, "all-linear", lr=o.lr, weight_decay=o.weight_decay,
                                      rank=cfg.galore_rank(), update_proj_gap=g.update_proj_gap, scale=g.scale,
                                      proj_type=g.proj_type, layerwise=g.layerwise, accumulation_steps=grad_accum,
                                      max_grad_norm=(o.max_grad_norm or None) if g.layerwise else None, **extra)
    return build


def _adamw(model, cfg: RunConfig, grad_accum: int = 1):
    """``adamw``: galore's plain AdamW when galore is importable (one code path for every name), else torch's."""
    try:
        import galore  # noqa: F401
    except ImportError as exc:
        if cfg.optimizer.galore.layerwise:
            raise TrainError(f"optimizer.galore.layerwise needs the galore package: {exc}") from None
        logger.warning("optimizer adamw: galore is not importable (%s); using torch.optim.AdamW", exc)
        return _torch_adamw(model, cfg)
    return _galore("adamw")(model, cfg, grad_accum)


OPTIMIZERS = {
    "adamw": _adamw,
    "adamw8bit": _galore("adamw8bit"),
    "galore_adamw": _galore("galore_adamw"),
    "galore_adamw8bit": _galore("galore_adamw8bit"),
    "galore_adafactor": _galore("galore_adafactor"),
}


def lr_schedule(optimizer, schedule: str, warmup_steps: int, min_lr_ratio: float, total_steps: int):
    """A linear warm-up over ``warmup_steps``, then ``schedule`` (cosine / linear / constant) down to
    ``min_lr_ratio`` of the learning rate at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            decay = 1.0 - frac
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * frac))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int):
    o = cfg.optimizer
    return lr_schedule(optimizer, o.schedule, o.warmup_steps, o.min_lr_ratio, total_steps)


# ----------------------------------------------------------------------------------------------- loss and eval
def loss_sum(model, batch: dict, device, autocast) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the label tokens of one microbatch, and their count."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(device)
    with autocast():
        # use_cache=False matters: transformers only derives the packed-sequence (block-diagonal) mask from
        # position_ids when no KV cache is present (masking_utils.find_packed_sequence_indices)
        logits = model(**inputs, use_cache=False).logits
    tgt = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((tgt != -100).sum())


@torch.no_grad()
def evaluate_loss(model, samples: list[Sample], micro: int, cfg: RunConfig, pad_id: int, device, autocast) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), micro):
        batch = collate(samples[i:i + micro], pad_id, cfg.data.max_length, cfg.data.packing)
        s, n = loss_sum(model, batch, device, autocast)
        total += s.item()
        count += n
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int, device, autocast,
                batch_size: int = 64) -> float:
    """Fraction of prompts whose greedy completion (up to EOS) equals the reference completion, both stripped."""
    was = model.training
    model.eval()
    hits = 0
    pad = tokenizer.pad_token_id
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(prompts):  # left padding
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        with autocast():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        for j, r in enumerate(chunk):
            gen = out[j, width:].tolist()
            if tokenizer.eos_token_id in gen:
                gen = gen[:gen.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(gen, skip_special_tokens=True)
            hits += int(text.strip() == r["completion"].strip())
    model.train(was)
    return hits / max(len(records), 1)


# ----------------------------------------------------------------------------------------------- the run
class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop, or a second one inside it: unwinds like Ctrl-C (half-made folders are
    removed on the way out), and the command exits 143 instead of 130."""


class _Stop:
    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        logger.warning("%s received: finishing the current step, then checkpointing and exiting", self.signal)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup_logging(output_dir: str, is_main: bool) -> None:
    root = logging.getLogger("lorafusion")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for h in [h for h in root.handlers if getattr(h, "_lorafusion_train", False)]:
        root.removeHandler(h)
        h.close()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("[lorafusion %(levelname)s] %(message)s"))
    h._lorafusion_train = True
    root.addHandler(h)
    if is_main:
        fh = logging.FileHandler(os.path.join(output_dir, "train.log"))
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh._lorafusion_train = True
        root.addHandler(fh)
    root.propagate = False


def _plot(output_dir: str, history: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no loss-curve PNG")
        return None
    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / completion token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(output_dir, "loss_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Keys a resumed run must share with the run it continues: they fix the model, the data order, the adapter and the
# optimizer's state layout (``--resume`` with any of them changed would continue a different run under the same
# name). Others (lr, schedule, steps, eval / checkpoint cadence, backend, threads) may change on resume.
RESUME_FIXED_KEYS = (
    "model.name_or_path", "model.quantization", "data.train", "data.eval", "data.eval_fraction", "data.max_eval_samples",
    "data.max_length", "data.packing",
    "lora.r", "lora.alpha", "lora.dropout", "lora.rslora", "lora.target_modules", "optimizer.name",
    "optimizer.galore.rank", "optimizer.galore.proj_type", "optimizer.galore.layerwise",
    "batch.tokens_per_microbatch", "batch.micro_batch_size", "batch.global_batch_size", "train.seed",
    "train.precision",
)


def _check_resume_config(cfg: RunConfig, saved_path: str) -> None:
    """Refuse ``--resume`` when a key of ``RESUME_FIXED_KEYS`` differs from the run's saved ``config.yaml``."""
    import yaml

    if not os.path.isfile(saved_path):
        return  # a checkpoint without its config (copied by hand): nothing to compare against
    with open(saved_path) as fh:
        saved = yaml.safe_load(fh) or {}
    now = cfg.to_dict()
    diffs = []
    for key in RESUME_FIXED_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a != b:
            diffs.append(f"{key}: {a!r} in the run, {b!r} now")
    if diffs:
        raise ConfigError(f"--resume: the config differs from the run in {saved_path} on keys a resumed run must "
                          f"keep ({'; '.join(diffs)}); use the run's values or start a new train.output_dir")


def _completed_summary(out: str, step: int, total_steps: int) -> dict | None:
    """The summary of a run that already finished its ``total_steps`` at its latest checkpoint (at ``step``), else
    None (a larger ``train.max_steps`` on resume extends the run instead)."""
    path = os.path.join(out, "summary.json")
    try:
        with open(path) as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    if summary.get("status") == "completed" and summary.get("step") == summary.get("total_steps") == step \
            == total_steps:
        return summary
    return None


def _hyperparameters(optimizer, scheduler) -> tuple[list[dict], list[float]]:
    """The optimizer's per-group settings (all but the parameters and the scheduled lr) and the scheduler's base
    learning rates, as this run's config built them."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
              for g in optimizer.param_groups]
    return groups, list(scheduler.base_lrs)


def _apply_hyperparameters(optimizer, scheduler, fresh) -> None:
    """After a resume: the checkpoint brought the optimizer's moments and the scheduler's step, and with them its
    run's settings (lr, weight decay, betas, eps, GaLore scale / update gap); this config's settings replace them,
    and the lr is recomputed for the restored step under this config's schedule."""
    groups, base_lrs = fresh
    for g, settings in zip(optimizer.param_groups, groups):
        g.update(settings)
    scheduler.base_lrs = list(base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
    for g, base, lr in zip(optimizer.param_groups, base_lrs, lrs):
        g["initial_lr"], g["lr"] = base, lr
    scheduler._last_lr = lrs


def _data_fingerprint(train, evals) -> str:
    """A digest of the tokenized train and eval samples in order: what a resumed run must continue on (the same
    data order and train / eval split, and the eval set its before / after figures are measured on)."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for part in (train, evals):
        for smp in part:
            h.update(array("q", smp.input_ids).tobytes())
            h.update(array("q", smp.labels).tobytes())
            h.update(b";")
        h.update(b"|")
    return h.hexdigest()


def _check_resume_data(latest: str, saved: str | None, fingerprint: str, stats: dict) -> None:
    """Refuse ``--resume`` when the data differs from the run's (its fingerprint ``saved``): the data order and the
    eval split would change, and records already trained on could land in the eval set."""
    if saved is not None and saved != fingerprint:
        raise ConfigError(f"--resume: the data ({stats['train_path']}: {stats['train_samples']} train / "
                          f"{stats['eval_samples']} eval samples now) differs from the data the run in {latest} "
                          "trained on; resume with the run's data (and data settings), or start a new "
                          "train.output_dir")


def run_training(cfg: RunConfig, resume: bool = False) -> dict:
    """Train, checkpoint, evaluate and save the adapter; returns the summary dict (every rank). ``train.num_threads``
    holds for the run only: the caller's torch thread count is restored after it (a run inside a notebook or a test
    process leaves that process as it found it)."""
    threads = torch.get_num_threads()
    ds = dist_utils.setup(cfg.train.distributed, cfg.train.device)
    locks: list[int] = []
    try:
        return _run(cfg, resume, ds, locks)
    finally:
        for fd in locks:
            os.close(fd)  # releases the output folder
        dist_utils.cleanup(ds)
        torch.set_num_threads(threads)


def _lock_output(out: str, key: str = "train.output_dir") -> int | None:
    """Rank 0: hold ``out/.lock`` for the run (released when the process ends, however it ends); a TrainError
    naming config key ``key`` when another run holds it. Two runs in one folder interleaved their metrics and
    overwrote each other's checkpoints, since the folder is refused only once it holds a checkpoint."""
    from lorafusion.train.checkpoint import LockBusy, lock_file

    try:
        return lock_file(os.path.join(out, ".lock"))
    except ImportError:  # no flock (Windows): unlocked, as before
        return None
    except LockBusy as exc:
        raise TrainError(f"{key} {out} is in use by another run{f' (pid {exc.holder})' if exc.holder else ''}; "
                         "wait for it to end, or choose another output folder") from None


def _run(cfg: RunConfig, resume: bool, ds, locks: list) -> dict:
    from lorafusion.train.config import validate

    t = cfg.train
    validate(cfg, ds.world_size)  # the batch arithmetic depends on the number of processes
    # what cannot run under this launcher, on every rank alike, before anything is made or loaded
    if cfg.model.quantization != "none" and ds.kind == "deepspeed":
        raise TrainError(f"model.quantization: {cfg.model.quantization} is not supported under deepspeed (ZeRO "
                         "re-places and casts the base weights); use torchrun (DDP) or one process")
    if ds.kind == "deepspeed":  # ZeRO replaces the parameters with flat 1-D partitions after the optimizer is built
        if cfg.optimizer.name.startswith("galore"):
            raise ConfigError(f"optimizer.name: {cfg.optimizer.name} cannot run under deepspeed (ZeRO flattens the "
                              "parameters into 1-D partitions, which GaLore cannot project); use torchrun (DDP) or "
                              "one process, or optimizer.name adamw / adamw8bit")
        if cfg.optimizer.galore.layerwise:
            raise ConfigError("optimizer.galore.layerwise: true cannot run under deepspeed (its per-parameter "
                              "hooks are on the parameters ZeRO replaces with flat partitions); use torchrun (DDP) "
                              "or one process")
    out = t.output_dir
    busy = None
    if ds.is_main:
        os.makedirs(out, exist_ok=True)
        try:
            fd = _lock_output(out)
            if fd is not None:
                locks.append(fd)
        except TrainError as exc:
            busy = exc
    if dist_utils.any_flag(ds, busy is not None):  # every rank stops (also the barrier the others wait at)
        raise busy or TrainError(f"train.output_dir {out} is in use by another run (rank 0 says which)")
    _setup_logging(out, ds.is_main)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    import random

    import numpy as np

    random.seed(t.seed)
    np.random.seed(t.seed)

    latest = None
    if resume:
        latest = ckpt.latest(out)
        if latest is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", ckpt.checkpoints_dir(out))
    elif os.path.isdir(ckpt.checkpoints_dir(out)) and ckpt.latest(out) is not None:  # every rank: no hang
        raise TrainError(f"train.output_dir {out} already holds checkpoints; pass --resume to continue it or "
                         "choose another output folder")
    saved_state = None
    if latest is not None:
        saved_state = ckpt.read_state(latest)  # a corrupt checkpoint is reported before the model loads
        _check_resume_config(cfg, os.path.join(out, "config.yaml"))
    if t.deepspeed_config is not None and ds.kind != "deepspeed":
        logger.warning("train.deepspeed_config %s is not used: this run is not under the deepspeed launcher "
                       "(train.distributed=%s)", t.deepspeed_config, ds.kind)

    for key, path in data_files(cfg.data):  # before the model load, which can take minutes
        check_data_file(path, key)
    model_path = resolve_model_path(cfg.model.name_or_path, ds)
    tokenizer, base = load_base(model_path, cfg, ds.device)
    train, evals, stats, gen_records = load_split(cfg.data, tokenizer, t.seed)
    micro = cfg.micro_batch_samples(ds.world_size)
    accum = cfg.grad_accum_steps(ds.world_size)
    G = cfg.batch.global_batch_size
    total_steps = (t.max_steps if t.max_steps is not None else DEFAULT_MAX_STEPS if t.epochs is None
                   else max(1, math.ceil(t.epochs * len(train) / G)))
    done = _completed_summary(out, saved_state["step"], total_steps) if latest is not None else None
    if done is not None:
        logger.info("--resume: %s already completed its %d steps; nothing to do (summary.json kept)", out, total_steps)
        return done
    if latest is not None:  # a run past the steps now asked for would be marked "completed" at step 12 of 8
        at = saved_state["step"]
        if at > total_steps:
            raise ConfigError(f"--resume: the run in {out} is at step {at}, past the {total_steps} steps asked for "
                              f"(train.max_steps / train.epochs); ask for at least {at}, or start a new "
                              "train.output_dir")
    fingerprint = _data_fingerprint(train, evals)
    if latest is not None:
        _check_resume_data(latest, saved_state.get("data_fingerprint"), fingerprint, stats)
    if ds.is_main and latest is None and os.path.exists(os.path.join(out, "metrics.jsonl")):
        # a run killed before its first checkpoint: it starts again from step 0, so its lines go
        os.remove(os.path.join(out, "metrics.jsonl"))
    model, fused_info = build_adapter(base, cfg)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a 4-bit weight (bitsandbytes Params4bit) packs two values a byte; its quant_state has the logical shape
    n_total = sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
                  for p in model.parameters())
    logger.info("model %s: %d parameters, %d trainable (LoRA r=%d); %d train / %d eval samples; %d steps of %d "
                "samples = %d process(es) x %d microbatches x %d samples", model_path, n_total, n_trainable,
                cfg.lora.r, len(train), len(evals), total_steps, G, ds.world_size, accum, micro)

    optimizer = OPTIMIZERS[cfg.optimizer.name](model, cfg, grad_accum=accum)
    layerwise = cfg.optimizer.galore.layerwise  # galore steps from gradient hooks and clips itself
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    autocast = (contextlib.nullcontext if t.precision == "fp32" else
                (lambda: torch.autocast(ds.device.type,
                                        dtype=torch.bfloat16 if t.precision == "bf16" else torch.float16)))
    scaler = torch.amp.GradScaler("cuda") if (t.precision == "fp16" and ds.device.type == "cuda"
                                              and ds.kind != "deepspeed") else None

    engine = None
    peft_model = model
    if ds.kind == "ddp":
        model = dist_utils.wrap_ddp(model, ds)
    elif ds.kind == "deepspeed":
        ds_cfg = dist_utils.deepspeed_config(t.deepspeed_config, micro, accum, G, cfg.optimizer.max_grad_norm,
                                             t.precision)
        engine, optimizer = dist_utils.wrap_deepspeed(model, optimizer, ds_cfg)
        model = engine

    step, history, metric_before, eval_before = 0, [], None, None
    tokens_done, train_time = 0, 0.0  # over the whole run: a resumed run starts from its checkpoint's totals
    if latest is not None:
        fresh = _hyperparameters(optimizer, scheduler)  # this config's: the checkpoint's must not override them
        state = ckpt.load(latest, peft_model, optimizer, scheduler, ds.rank, load_optimizer=engine is None)
        if engine is not None:
            engine.load_checkpoint(os.path.join(latest, "deepspeed"), tag="state", load_module_strict=False,
                                   load_lr_scheduler_states=False)
        _apply_hyperparameters(optimizer, scheduler, fresh)
        step = state["step"]
        metric_before, eval_before = state.get("eval_exact_match_before"), state.get("eval_loss_before")
        tokens_done, train_time = int(state.get("tokens_done", 0)), float(state.get("train_time_s", 0.0))
        logger.info("resumed from %s at step %d", latest, step)
    if ds.is_main:  # once the run will train: a refused or finished --resume leaves the run's own config
        save_config(cfg, os.path.join(out, "config.yaml"))
    if latest is not None:
        if ds.is_main:
            # resumed at the last step, the run goes straight to its final eval: a killed attempt's final-eval line
            # goes (it was logged after the last checkpoint), else every resume there added one more
            _truncate_metrics(os.path.join(out, "metrics.jsonl"), step,
                              drop_eval_at=step if step == total_steps else None)
            history = _read_metrics(os.path.join(out, "metrics.jsonl"))

    pad_id = tokenizer.pad_token_id
    eval_fn = (lambda: evaluate_loss(peft_model, evals, micro, cfg, pad_id, ds.device, autocast)) if evals else None
    gen_fn = ((lambda: exact_match(peft_model, tokenizer, gen_records, t.max_new_tokens, ds.device, autocast))
              if (gen_records and t.generate_eval) else None)
    metrics_path = os.path.join(out, "metrics.jsonl")

    def written(what: str, write):
        """``write()``'s result; its failure (a full disk) a TrainError naming the file and where --resume goes on."""
        try:
            return write()
        except Exception as exc:  # noqa: BLE001
            raise TrainError(f"could not write {what}: {type(exc).__name__}: {exc}; fix the cause, then "
                             f"{ckpt.resume_hint(out)}") from None

    def log_metrics(rec: dict) -> None:
        history.append(rec)
        if ds.is_main:
            def append():
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            written(metrics_path, append)

    def run_eval(at: int) -> dict:
        rec = {"step": at}
        if ds.is_main:
            if eval_fn:
                rec["eval_loss"] = eval_fn()
            if gen_fn:
                rec["eval_exact_match"] = gen_fn()
        dist_utils.barrier(ds)
        if len(rec) > 1:
            log_metrics(rec)
            logger.info("eval at step %d: %s", at, ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step"))
        return rec

    if step == 0 and (eval_fn or gen_fn):
        rec = run_eval(0)
        eval_before, metric_before = rec.get("eval_loss"), rec.get("eval_exact_match")

    def save_checkpoint(at: int) -> None:
        tmp = ckpt.tmp_path(out, at)

        def write_rank_files():
            ckpt.write_rank_files(tmp, ds.rank)
            if engine is not None:
                engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state", exclude_frozen_parameters=True)
            if ds.is_main:
                ckpt.write_main_files(tmp, peft_model, optimizer, scheduler,
                                      {"step": at, "total_steps": total_steps, "world_size": ds.world_size,
                                       "eval_exact_match_before": metric_before, "eval_loss_before": eval_before,
                                       "data_fingerprint": fingerprint, "tokens_done": tokens_done,
                                       "train_time_s": train_time},
                                      write_optimizer=engine is None)

        # each phase's failure (a full disk, a lost mount) stops every rank together with the reason: the earlier
        # checkpoints stay intact, and the half-written one is removed
        for phase in ((lambda: ckpt.begin(out, at)) if ds.is_main else None, write_rank_files,
                      (lambda: ckpt.commit(out, at, t.keep_checkpoints)) if ds.is_main else None):
            error = None
            if phase is not None:
                try:
                    phase()
                except Exception as exc:  # noqa: BLE001 - whatever the cause, this checkpoint is lost
                    error = exc
            if dist_utils.any_flag(ds, error is not None):
                if ds.is_main:
                    raise ckpt.write_failed(out, at, error if error is not None else
                                            RuntimeError("it failed on another rank"))
                raise ckpt.CheckpointError(f"rank {ds.rank}: the checkpoint of step {at} failed"
                                           + (f": {type(error).__name__}: {error}" if error is not None
                                              else " on another rank (rank 0 reports why)"))
        if ds.is_main:
            logger.info("checkpoint %s", ckpt.final_path(out, at))

    batches = StepBatches(len(train), G, micro, ds.world_size, ds.rank, t.seed)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    bar = None
    if ds.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=os.environ.get("LORAFUSION_NO_PROGRESS") == "1")
    debug_sleep = float(os.environ.get("LORAFUSION_DEBUG_STEP_SLEEP", "0"))  # tests: widen the window for a kill
    last_loss = None
    stopped_by = None
    if ds.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ds.device)
    model.train()
    with _Stop() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            micro_idx, step_idx = batches.microbatches(step)
            n_tokens = sum(train[i].n_loss_tokens for i in step_idx)  # label tokens of the whole step
            # labels are shifted by one inside loss_sum; the first label of each sample is always ignored, so the
            # count of non-ignored labels equals the count of predicted tokens
            step_tokens = sum(len(train[i].input_ids) for i in step_idx)
            loss_acc = 0.0
            for k, idx in enumerate(micro_idx):
                batch = collate([train[i] for i in idx], pad_id, cfg.data.max_length, cfg.data.packing)
                last = k == len(micro_idx) - 1
                sync = contextlib.nullcontext() if (ds.kind != "ddp" or (last and not layerwise)) else model.no_sync()
                with sync:
                    s, _ = loss_sum(model, batch, ds.device, autocast)
                    loss = s / n_tokens * ds.world_size
                    if engine is not None:
                        engine.backward(loss, scale_wrt_gas=False)
                        engine.step()
                    elif scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                loss_acc += s.item()
            if ds.kind != "none":
                tot = torch.tensor([loss_acc], dtype=torch.float64)
                torch.distributed.all_reduce(tot)
                loss_acc = tot.item()
            step_loss = loss_acc / n_tokens
            grad_norm = None
            if engine is None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.optimizer.max_grad_norm > 0 and not layerwise:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optimizer.max_grad_norm))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            lr_used = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            if debug_sleep:
                time.sleep(debug_sleep)
            dt = time.perf_counter() - t0
            train_time += dt
            tokens_done += step_tokens
            last_loss = step_loss
            if step % t.log_every == 0 or step == total_steps:
                rec = {"step": step, "loss": step_loss, "lr": lr_used,
                       "tokens": step_tokens, "tokens_per_s": step_tokens / dt if dt else None,
                       "epoch": batches.epoch_of(step), "time_s": dt}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                log_metrics(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_done / max(train_time, 1e-9):.0f}")
            if t.eval_every and step % t.eval_every == 0 and step < total_steps:
                run_eval(step)
            stop_now = dist_utils.any_flag(ds, stop.signal is not None)
            if stop_now or (t.save_every and step % t.save_every == 0) or step == total_steps:
                save_checkpoint(step)
            if stop_now:
                stopped_by = stop.signal or "signal on another rank"
                break
    if bar is not None:
        bar.close()

    summary = {"status": "interrupted" if stopped_by else "completed", "step": step, "total_steps": total_steps,
               "world_size": ds.world_size, "distributed": ds.kind, "device": str(ds.device),
               "lora_path": fused_info["path"], "fused_layers": fused_info["fused"],
               "trainable_parameters": n_trainable, "optimizer": cfg.optimizer.name, "data": stats}
    if stopped_by:
        summary["stopped_by"] = stopped_by
        logger.warning("stopped by %s at step %d; continue with --resume", stopped_by, step)
        return summary
    final = run_eval(step) if (eval_fn or gen_fn) else {}
    if ds.is_main:
        adapter_dir = os.path.join(out, "adapter")
        written(f"the adapter to {adapter_dir}", lambda: peft_model.save_pretrained(adapter_dir))
        summary["adapter_dir"] = adapter_dir
    train_losses = [h["loss"] for h in history if "loss" in h]
    summary.update({
        "tokens_per_s": tokens_done * 1.0 / train_time if train_time else None,  # over every segment of the run
        "train_time_s": train_time,
        "tokens": tokens_done,
        "peak_memory_mb": peak_memory_mb(ds.device),
        "final_train_loss": last_loss if last_loss is not None else (train_losses[-1] if train_losses else None),
        "eval_loss_before": eval_before, "eval_loss_after": final.get("eval_loss"),
        "eval_exact_match_before": metric_before, "eval_exact_match_after": final.get("eval_exact_match"),
    })
    if ds.is_main:
        if t.plot:
            summary["loss_curve"] = written(f"the loss curve to {out}", lambda: _plot(out, history))

        def write_summary():
            with open(os.path.join(out, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=1)
        written(os.path.join(out, "summary.json"), write_summary)
        _print_summary(summary)
    return summary


def _fmt(v, spec=".4f"):
    return "n/a" if v is None else format(v, spec)


def _print_summary(s: dict) -> None:
    lines = [
        "── lorafusion train: summary ──",
        f"steps {s['step']}/{s['total_steps']} on {s['world_size']} process(es) ({s['distributed']}, {s['device']}), "
        f"LoRA layers: {s['lora_path']} ({s['fused_layers']} fused), optimizer {s['optimizer']}",
        f"throughput {_fmt(s['tokens_per_s'], '.0f')} tokens/s over {_fmt(s['train_time_s'], '.1f')} s; "
        f"peak memory {_fmt(s['peak_memory_mb'], '.0f')} MiB",
        f"final train loss {_fmt(s['final_train_loss'])}; eval loss {_fmt(s['eval_loss_before'])} -> "
        f"{_fmt(s['eval_loss_after'])}",
        f"eval exact match {_fmt(s['eval_exact_match_before'], '.1%')} (base) -> "
        f"{_fmt(s['eval_exact_match_after'], '.1%')} (fine-tuned)",
        f"adapter: {s.get('adapter_dir')}",
    ]
    print("\n".join(lines), flush=True)


def _read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a crash mid-write (the last one) is dropped with a
    warning, since the resumed run writes that step again."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: dropped an unreadable metrics line (cut short by a crash?)", path, lineno)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


def _truncate_metrics(path: str, step: int, drop_eval_at: int | None = None) -> None:
    """Drop metric lines past the resumed step (they came from work the kill threw away), and eval lines (no training
    loss) at step ``drop_eval_at``."""
    recs = [r for r in _read_metrics(path) if r["step"] <= step
            and not (drop_eval_at is not None and r["step"] == drop_eval_at and "loss" not in r)]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
