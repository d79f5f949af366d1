"""Recover a LoRA adapter trained on a pruned model (:mod:`loram.prune`) to the full model.

A LoRA pair on a pruned projection has ``B`` (out_pruned x r) and ``A`` (r x in_pruned). On the full model the
same update lives in the kept rows and columns: ``B`` gets zero rows for the pruned outputs (``q/k/v_proj`` of the
removed KV groups, ``gate/up_proj`` of the removed channels) and ``A`` zero columns for the pruned inputs
(``o_proj`` of the removed heads, ``down_proj`` of the removed channels), so ``B_full A_full`` is the pruned update
scattered into the full weight's shape, zero elsewhere. The result is a standard PEFT adapter folder for the full
model (``PeftModel.from_pretrained(full_model, folder)`` loads it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

from loram.prune import ATTN, MLP, PLAN_FILE, PrunePlan, PruneError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RECOVERY_FILE = "loram_recovery.json"
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(.+)$")
_LORA = re.compile(r"lora_(A|B)(?:\.[^.]+)?\.weight$")


def recover_state_dict(state: dict[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The full-model adapter tensors for a pruned model's adapter ``state`` (PEFT keys, any adapter name)."""
    out = {}
    for key, value in state.items():
        m = _KEY.search(key)
        if m is None or m.group(3) not in (ATTN + MLP):
            out[key] = value
            continue
        layer, module, leaf = int(m.group(1)), m.group(3), m.group(4)
        if layer >= plan.num_layers:
            raise PruneError(f"adapter key {key}: layer {layer} is beyond the plan's {plan.num_layers} layers")
        rows, cols = plan.rows(layer, module), plan.cols(layer, module)
        lora = _LORA.fullmatch(leaf)
        if lora is None:
            if rows is None and cols is None:
                out[key] = value
                continue
            raise PruneError(f"adapter key {key}: only lora_A / lora_B weights of a pruned module can be recovered "
                             f"(DoRA magnitudes, LoRA biases and modules_to_save of pruned modules cannot)")
        if lora.group(1) == "B" and rows is not None:
            out[key] = _scatter(value, rows, 0, plan.full_size(module), key)
        elif lora.group(1) == "A" and cols is not None:
            out[key] = _scatter(value, cols, 1, plan.full_size(module), key)
        else:
            out[key] = value
    return out


def _scatter(value: torch.Tensor, index: torch.Tensor, dim: int, size: int, key: str) -> torch.Tensor:
    if value.dim() != 2 or value.shape[dim] != len(index):
        raise PruneError(f"adapter key {key}: shape {tuple(value.shape)} does not match the prune plan "
                         f"({len(index)} kept along dim {dim}); was the adapter trained on this plan's pruned model?")
    shape = list(value.shape)
    shape[dim] = size
    full = value.new_zeros(shape)
    full.index_copy_(dim, index.to(value.device), value)
    return full


PRUNE_META = "loram_prune.json"


def read_prune_record(folder: str) -> dict | None:
    """The ``loram_prune.json`` record of a pruned model's folder (None where there is none); a ``PruneError``
    naming it when it is not the JSON object ``loram prune`` writes."""
    path = os.path.join(folder, PRUNE_META)
    if not os.path.isfile(path):
        return None
    return _json_object(path, f"{path}: the LoRAM prune record")


def _json_object(path: str, what: str) -> dict:
    """The JSON object in ``path``; a ``PruneError`` naming ``what`` when it is unreadable or not an object."""
    try:
        with open(path) as fh:
            value = json.load(fh)
    except (OSError, ValueError) as exc:
        raise PruneError(f"{what} is not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise PruneError(f"{what} must hold a JSON object, got {type(value).__name__}")
    return value


def refuse_overwriting(out_dir: str, inputs: dict) -> None:
    """A ``PruneError`` when writing ``out_dir`` would replace an input folder (``inputs``: what -> path): ``out_dir``
    is one of them, or holds one."""
    out = os.path.realpath(out_dir)
    for what, path in inputs.items():
        if path is None or not os.path.exists(path):
            continue
        src = os.path.realpath(path)
        if src == out or os.path.commonpath([src, out]) == out:
            where = "is" if src == out else "holds"
            raise PruneError(f"out: {out_dir} {where} the {what} {path}; writing it would replace that; choose "
                             "another folder")


def write_folder(out_dir: str, build) -> None:
    """Have ``build(tmp)`` fill a temporary folder beside ``out_dir``, then put it in place of ``out_dir``: a
    failure leaves the old folder (or, past the last rename, the new one), never a half-written one."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=name + ".tmp", dir=parent)
    aside = None
    try:
        build(tmp)
        if os.path.isdir(out_dir):
            aside = os.path.join(tempfile.mkdtemp(prefix=name + ".old", dir=parent), name)
            os.rename(out_dir, aside)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if aside is not None:  # put the old folder back
                os.rename(aside, out_dir)
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and os.path.isdir(out_dir):  # the old folder is only dropped once one stands there
            shutil.rmtree(os.path.dirname(aside), ignore_errors=True)


def _check_trained_on(config: dict, adapter_dir: str, plan: PrunePlan) -> None:
    """Where the adapter's own config names a pruned model folder that is still here, its plan must be ``plan``:
    two pruned models of the same ratios have the same shapes but keep other channels, and recovering with the other
    plan scatters the update onto channels the adapter never saw."""
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return
    here = base if os.path.isabs(base) else os.path.join(adapter_dir, base)
    for folder in dict.fromkeys((base, here)):  # relative: to the working folder, or to the adapter's
        if not os.path.isfile(os.path.join(folder, PLAN_FILE)):
            continue
        kept = lambda p: {k: v for k, v in p.to_dict().items() if k != "importance"}  # noqa: E731
        if kept(PrunePlan.load(folder)) != kept(plan):
            raise PruneError(f"adapter folder {adapter_dir} was trained on the pruned model {base}, whose plan keeps "
                             "other heads / channels than the plan given; recover it with that pruned folder")
        return


def recover_adapter(adapter_dir: str, plan: PrunePlan | str, out_dir: str, *,
                    base_model_name_or_path: str | None = None) -> str:
    """Write the full-model PEFT adapter for the pruned model's adapter in ``adapter_dir`` to ``out_dir``.

    ``plan``: a :class:`PrunePlan` or the pruned model's folder (or its plan file). ``base_model_name_or_path``:
    written into the new ``adapter_config.json`` (default: the full model the plan's folder records, else kept).
    The folder is written whole or not at all (a temporary folder renamed into place).
    """
    from safetensors.torch import load_file, save_file

    plan_folder = None  # the pruned model's folder, where the plan came from one
    if not isinstance(plan, PrunePlan):
        plan_folder = plan if os.path.isdir(plan) else os.path.dirname(plan)
        plan = PrunePlan.load(plan)
    refuse_overwriting(out_dir, {"adapter folder": adapter_dir, "pruned model folder": plan_folder})
    weights, config_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS), os.path.join(adapter_dir, ADAPTER_CONFIG)
    for path in (weights, config_path):
        if not os.path.isfile(path):
            raise PruneError(f"adapter folder {adapter_dir} has no {os.path.basename(path)}; is it a PEFT adapter "
                             "folder?")
    config = _json_object(config_path, f"adapter folder {adapter_dir}: {ADAPTER_CONFIG}")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise PruneError(f"adapter folder {adapter_dir} uses {flag}; LoRAM recovers plain LoRA adapters only")
    try:
        state = load_file(weights)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        raise PruneError(f"adapter folder {adapter_dir}: {ADAPTER_WEIGHTS} is not a readable safetensors file "
                         f"({exc})") from None
    _check_trained_on(config, adapter_dir, plan)
    full = recover_state_dict(state, plan)
    if base_model_name_or_path is None and plan_folder is not None:
        record = read_prune_record(plan_folder)
        if record is not None:
            base_model_name_or_path = record.get("full_model")
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    def build(tmp: str) -> None:
        save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(tmp, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as fh:
            json.dump(config, fh, indent=2)
        with open(os.path.join(tmp, RECOVERY_FILE), "w") as fh:
            json.dump({"source_adapter": os.path.abspath(adapter_dir), "plan": plan.to_dict()}, fh)

    write_folder(out_dir, build)
    return out_dir
