"""One standard PEFT folder per adapter: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (the adapter name is not part
of a saved key), so ``PeftModel.from_pretrained(base, folder)`` loads a folder written here on the base model alone,
and a folder PEFT wrote for a LoRA adapter loads into a ``MultiLoRAModel``.
"""
from __future__ import annotations

import json
import os
import re

import torch

from lorafusion.multi.model import MultiLoRAModel, _matches

_PREFIX = "base_model.model."


def peft_target_modules(model: MultiLoRAModel, name: str) -> list[str] | str:
    """PEFT's ``target_modules`` that select exactly the linears adapter ``name`` targets: their last names
    (``q_proj``, ..) when PEFT, which matches a module whose path is a target or ends with ``.target``, would find
    no other module by them; else a regular expression of their full paths, which PEFT matches whole (a list of
    paths would still match as suffixes: ``fc`` would take ``sub.fc`` too)."""
    wrapped = set(model.adapter_layers[name])
    short = sorted({p.rsplit(".", 1)[-1] for p in wrapped})
    found = {n for n, _ in model.model.named_modules() if n and _matches(n, short)}
    if found == wrapped:
        return short
    return "^(" + "|".join(re.escape(p) for p in sorted(wrapped)) + ")$"


def save_adapter(model: MultiLoRAModel, name: str, folder: str, base_model_name_or_path: str | None = None) -> None:
    """Write adapter ``name`` of ``model`` to ``folder`` as a PEFT LoRA adapter."""
    if name not in model.adapter_specs:
        raise ValueError(f"unknown adapter {name!r} (held: {list(model.adapter_specs)})")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    write_adapter(folder, adapter_tensors(model, name), model.adapter_specs[name], peft_target_modules(model, name),
                  base_model_name_or_path)


def adapter_tensors(model: MultiLoRAModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights in ``model`` under PEFT's keys (on the CPU)."""
    tensors = {}
    layers = model.layers()
    for path in model.adapter_layers[name]:
        layer = layers[path]
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].detach().contiguous().cpu()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].detach().contiguous().cpu()
    return tensors


def write_adapter(folder: str, tensors: dict, spec, target_modules, base_model_name_or_path: str | None) -> None:
    """A PEFT LoRA folder of ``tensors`` (PEFT's keys) for an adapter of ``spec`` (r, alpha, dropout, rsLoRA) over
    ``target_modules``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
                        target_modules=target_modules, bias="none", base_model_name_or_path=base_model_name_or_path)
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter(model: MultiLoRAModel, folder: str, name: str, dtype: torch.dtype | None = None) -> None:
    """Add the PEFT LoRA adapter stored in ``folder`` to ``model`` as adapter ``name``.

    The adapter must be plain LoRA (no DoRA, no per-module rank / alpha patterns) over wrapped linears of the
    model: all of them or a subset (its own target modules or layers; the others give its rows the base output)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type={cfg.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "alora_invocation_tokens", "layer_replication"):
        if cfg.get(key):
            raise ValueError(f"{folder}: {key}={cfg[key]!r} is not supported by MultiLoRAModel")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        # PEFT re-runs these inits on load, changing the base weights the adapter is only right on top of
        raise ValueError(f"{folder}: init_lora_weights={init!r} adapters change the base model on load, which "
                         "MultiLoRAModel shares between adapters; convert it to a plain LoRA adapter first (PEFT's "
                         "save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        found = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(folder, f))]
        raise ValueError(f"{folder}: no adapter_model.safetensors"
                         + (f" (found {found[0]}: only safetensors is read; re-save it with PEFT's "
                            "save_pretrained(..., safe_serialization=True))" if found else ""))
    state = load_file(weights)
    paths = {}
    for key in state:
        if not key.startswith(_PREFIX) or not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise ValueError(f"{folder}: unexpected key {key!r} in adapter_model.safetensors")
        path = key[len(_PREFIX):].rsplit(".lora_", 1)[0]
        paths.setdefault(path, {})[key.rsplit(".", 2)[-2]] = state[key]
    if not paths:
        raise ValueError(f"{folder}: adapter_model.safetensors holds no LoRA weights")
    extra = sorted(set(paths) - set(model.layer_names))
    if extra:
        raise ValueError(f"{folder}: the adapter has modules the model has not wrapped: {extra[:5]}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                         + " (wrap them with MultiLoRAModel(target_modules=...))")
    half = sorted(p for p, ws in paths.items() if set(ws) != {"lora_A", "lora_B"})
    if half:
        raise ValueError(f"{folder}: modules with only one of lora_A / lora_B: {half[:5]}")
    targets = [p for p in model.layer_names if p in paths]  # the model's order
    r = int(cfg["r"])
    layers = model.layers()
    for path in targets:  # checked before anything is added
        layer = layers[path]
        for which, want in (("lora_A", (r, layer.in_features)), ("lora_B", (layer.out_features, r))):
            if tuple(paths[path][which].shape) != want:
                raise ValueError(f"{folder}: {path}.{which} has shape {tuple(paths[path][which].shape)}, expected "
                                 f"{want} (r={r})")
    model.add_adapter(name, r, float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)),
                      bool(cfg.get("use_rslora", False)), dtype, layers=targets)
    with torch.no_grad():
        for path in targets:
            for which, tensor in paths[path].items():
                param = getattr(layers[path], which)[name]
                param.copy_(tensor.to(param.device, param.dtype))
