"""LoRAM end to end: prune the base, train LoRA on the pruned model, recover the adapter to the full model, and
evaluate it there.

    out/pruned/     the pruned model (an ordinary HF folder) + loram_plan.json + loram_prune.json
    out/train/      ``lorafusion train`` on the pruned model (checkpoints, metrics, adapter/)
    out/adapter/    the recovered adapter for the full model (standard PEFT folder)
    out/summary.json

Each stage is skipped when its output is complete, so a killed run started again with the same arguments picks up
where it stopped (training itself resumes from its last checkpoint); different prune settings over an existing
``out/pruned`` are refused rather than silently mixed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time

import torch

from loram.prune import IMPORTANCE, PLAN_FILE, PruneError, make_plan, prune_model
from loram.memory import estimate
from loram.recover import PRUNE_META, read_prune_record, recover_adapter, refuse_overwriting, write_folder

logger = logging.getLogger("loram")
TRAIN_PLAN_MARKER = "train_plan.sha256"  # which plan out/train was trained on
DTYPES = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def calibration_batches(path: str, tokenizer, samples: int, max_length: int, batch_size: int = 16, seed: int = 0):
    """Tokenized microbatches (with labels) of ``samples`` records drawn (seeded) from a JSONL file or
    ``builtin:<task>`` (its training split), as ``lorafusion train`` feeds them."""
    from lorafusion.train.data import collate, read_jsonl, tokenize_records
    from lorafusion.train.presets import data_preset_paths

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise PruneError(f"calibration_samples must be a positive integer, got {samples!r}")
    if path.startswith("builtin:"):
        try:
            path = data_preset_paths(path[len("builtin:"):])[0]
        except ValueError as exc:
            raise PruneError(f"calibration: {path!r} is not a built-in dataset ({exc})") from None
    elif not os.path.isfile(path):
        raise PruneError(f"calibration: {path!r} is not a file (a JSONL file or builtin:<task>)")
    records, _ = read_jsonl(path)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(records), generator=gen)[:samples].tolist()
    data, _ = tokenize_records([records[i] for i in sorted(pick)], tokenizer, max_length)
    if not data:
        raise PruneError(f"calibration: {path} gave no sample with a loss token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate(data[i:i + batch_size], pad, max_length, packing=False) for i in range(0, len(data), batch_size)]


def _resolve_model(name_or_path: str) -> str:
    from lorafusion.train.presets import model_folder

    try:
        return model_folder(name_or_path)
    except ValueError as exc:
        raise PruneError(f"model: {exc}") from None


def prune_to_folder(model: str, out_dir: str, *, keep_ratio: float, attn_keep_ratio: float | None = None,
                    importance: str = "taylor", calibration: str | None = None, calibration_samples: int = 128,
                    max_length: int = 32, channel_multiple: int = 1, seed: int = 0, dtype: str = "auto",
                    device: str = "cpu") -> dict:
    """Prune the model folder (or ``builtin:`` model) ``model`` and write the pruned model, its tokenizer, the plan
    and ``loram_prune.json`` (settings, parameter counts, calibration loss before / after) to ``out_dir``, whole or
    not at all. Returns the ``loram_prune.json`` record.

    ``dtype``: the precision the model is loaded, scored and saved in ("auto": as stored); ``device``: where."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importance not in IMPORTANCE:
        raise PruneError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    if dtype not in DTYPES:
        raise PruneError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise PruneError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PruneError(f"device: {device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneError(f"device: {str(device)!r}, but torch sees no CUDA device here")
    if device.type == "meta":
        raise PruneError("device: 'meta' holds no values; importance needs the weights (use cpu or cuda)")
    try:  # a device type this torch build has no backend for (mps, xpu, ...)
        torch.empty(1, device=device).add_(1)
    except (RuntimeError, AssertionError) as exc:
        raise PruneError(f"device: {str(device)!r} cannot run here ({type(exc).__name__}: {exc})") from None
    path = _resolve_model(model)
    refuse_overwriting(out_dir, {"model folder": path})
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # no tokenizer files, or ones that cannot be loaded
        raise PruneError(f"model: {path} has no loadable tokenizer (the pruned folder carries the full model's; "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    full = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    batches = None
    if calibration is not None:
        batches = calibration_batches(calibration, tokenizer, calibration_samples, max_length, seed=seed)
    elif importance == "taylor":
        raise PruneError("importance='taylor' needs calibration data (a JSONL file or builtin:<task>)")
    plan = make_plan(full, keep_ratio, attn_keep_ratio=attn_keep_ratio, importance=importance, batches=batches,
                     channel_multiple=channel_multiple)
    small = prune_model(full, plan)
    memory = estimate(full.config, keep_ratio, attn_keep_ratio, channel_multiple)
    record = {"full_model": os.path.abspath(path), "source": model, "keep_ratio": keep_ratio,
              "attn_keep_ratio": attn_keep_ratio, "importance": importance, "calibration": calibration,
              "calibration_samples": calibration_samples, "channel_multiple": channel_multiple, "seed": seed,
              "dtype": dtype,
              "kept_kv_heads": plan.kept_kv_heads, "kv_heads": plan.num_key_value_heads,
              "kept_channels": plan.kept_channels, "channels": plan.intermediate_size,
              "parameters_full": memory["full"]["parameters"], "parameters_pruned": memory["pruned"]["parameters"],
              "memory": memory}
    if batches is not None:
        record["calibration_loss_full"] = _mean_loss(full, batches)
        record["calibration_loss_pruned"] = _mean_loss(small, batches)
    def build(tmp: str) -> None:
        small.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        plan.save(tmp)
        with open(os.path.join(tmp, PRUNE_META), "w") as fh:
            json.dump(record, fh, indent=2)

    write_folder(out_dir, build)
    return record


@torch.no_grad()
def _mean_loss(model, batches) -> float:
    from lorafusion.train.trainer import loss_sum

    total, count = 0.0, 0
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    for b in batches:
        loss, n = loss_sum(model, b, device, contextlib.nullcontext)
        total += loss.item()
        count += n
    model.train(was)
    return total / max(count, 1)


def run(cfg, out_dir: str, *, keep_ratio: float, attn_keep_ratio: float | None = None, importance: str = "taylor",
        calibration: str | None = "train", calibration_samples: int = 128, channel_multiple: int = 1,
        dtype: str = "auto", device: str = "cpu") -> dict:
    """Prune ``cfg.model.name_or_path``, train ``cfg`` (a ``lorafusion.train`` RunConfig) on the pruned model,
    recover the adapter, and evaluate the full model with it. ``calibration="train"``: the run's training data;
    ``dtype`` / ``device``: where the pruning loads and scores the full model (:func:`prune_to_folder`)."""
    from lorafusion.train import checkpoint as ckpt
    from lorafusion.train import load_config, run_training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PruneError("loram run is one process (WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}); for a distributed run, prune with 'loram prune', train the "
                         "pruned folder with 'torchrun ... -m lorafusion train', then 'loram recover'")
    os.makedirs(out_dir, exist_ok=True)
    model = cfg.model.name_or_path
    if calibration == "train":
        calibration = cfg.data.train
    pruned_dir = os.path.join(out_dir, "pruned")
    settings = {"source": model, "keep_ratio": keep_ratio, "attn_keep_ratio": attn_keep_ratio,
                "importance": importance, "calibration": calibration, "calibration_samples": calibration_samples,
                "channel_multiple": channel_multiple, "seed": cfg.train.seed, "dtype": dtype}
    meta_path = os.path.join(pruned_dir, PRUNE_META)
    t0 = time.perf_counter()
    if os.path.isfile(meta_path) and os.path.isfile(os.path.join(pruned_dir, PLAN_FILE)):
        prune_record = read_prune_record(pruned_dir)
        differ = {k: (prune_record.get(k), v) for k, v in settings.items() if prune_record.get(k) != v}
        if differ:
            raise PruneError(f"{pruned_dir} was pruned with other settings "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in differ.items())
                             + "; use another output folder or remove it")
        logger.info("prune: %s is complete, reusing it", pruned_dir)
    else:
        prune_record = prune_to_folder(model, pruned_dir, keep_ratio=keep_ratio, attn_keep_ratio=attn_keep_ratio,
                                       importance=importance, calibration=calibration,
                                       calibration_samples=calibration_samples, max_length=cfg.data.max_length,
                                       channel_multiple=channel_multiple, seed=cfg.train.seed, dtype=dtype,
                                       device=device)
    logger.info("prune: %d -> %d parameters (KV heads %d/%d, channels %d/%d)", prune_record["parameters_full"],
                prune_record["parameters_pruned"], prune_record["kept_kv_heads"], prune_record["kv_heads"],
                prune_record["kept_channels"], prune_record["channels"])
    t_prune = time.perf_counter() - t0

    train_settings = cfg.to_dict()
    train_settings["model"]["name_or_path"] = pruned_dir
    train_settings["train"]["output_dir"] = os.path.join(out_dir, "train")
    train_cfg = load_config(None, train_settings)

    # the training folder belongs to one pruned model: a re-pruned folder (other settings, or removed and made
    # again) must not resume or reuse training done on another plan
    with open(os.path.join(pruned_dir, PLAN_FILE), "rb") as fh:
        plan_digest = hashlib.sha256(fh.read()).hexdigest()
    marker = os.path.join(out_dir, TRAIN_PLAN_MARKER)
    trained_on = None
    if os.path.isfile(marker):
        with open(marker) as fh:
            trained_on = fh.read().strip()
    if os.path.exists(train_cfg.train.output_dir) and trained_on != plan_digest:
        raise PruneError(f"{train_cfg.train.output_dir} holds training on "
                         + ("another pruned model" if trained_on else "a pruned model of unknown plan")
                         + f" than {pruned_dir} now holds; remove it (or use another output folder) to train anew")
    with open(marker, "w") as fh:
        fh.write(plan_digest + "\n")
    resume = ckpt.latest(train_cfg.train.output_dir) is not None
    t0 = time.perf_counter()
    train_summary = run_training(train_cfg, resume=resume)
    t_train = time.perf_counter() - t0
    if train_summary.get("status") != "completed":
        logger.warning("training stopped (%s); run the same command again to resume", train_summary.get("status"))
        return {"status": train_summary.get("status"), "train": train_summary}

    adapter_dir = os.path.join(out_dir, "adapter")
    recover_adapter(train_summary["adapter_dir"], pruned_dir, adapter_dir,
                    base_model_name_or_path=prune_record["full_model"])
    t0 = time.perf_counter()
    evals = evaluate_full(cfg, prune_record["full_model"], adapter_dir)
    summary = {"status": "completed", "prune": prune_record, "adapter_dir": adapter_dir,
               "pruned_model_with_adapter": {"eval_loss": train_summary.get("eval_loss_after"),
                                             "eval_exact_match": train_summary.get("eval_exact_match_after")},
               "full_model": evals["base"], "full_model_with_recovered_adapter": evals["adapted"],
               "seconds": {"prune": t_prune, "train": t_train, "evaluate": time.perf_counter() - t0}}
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def evaluate_full(cfg, full_model: str, adapter_dir: str) -> dict:
    """Eval loss and exact match of the full model alone and with the recovered adapter, on ``cfg``'s eval data."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafusion.train.data import load_split
    from lorafusion.train.trainer import evaluate_loss, exact_match

    tokenizer = AutoTokenizer.from_pretrained(full_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _, evals, _, gen_records = load_split(cfg.data, tokenizer, cfg.train.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(full_model, dtype=torch.float32).to(device)

    def scores(model) -> dict:
        out = {"eval_loss": evaluate_loss(model, evals, 32, cfg, tokenizer.pad_token_id, device,
                                          contextlib.nullcontext) if evals else None}
        if gen_records and cfg.train.generate_eval:
            out["eval_exact_match"] = exact_match(model, tokenizer, gen_records, cfg.train.max_new_tokens, device,
                                                  contextlib.nullcontext)
        return out

    result = {"base": scores(base)}
    result["adapted"] = scores(PeftModel.from_pretrained(base, adapter_dir))
    return result
