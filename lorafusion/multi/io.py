"""One standard PEFT folder per adapter: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (the adapter name is not part
of a saved key), so ``PeftModel.from_pretrained(base, folder)`` loads a folder written here on the base model alone,
and a folder PEFT wrote for a LoRA adapter loads into a ``MultiLoRAModel``.
"""
from __future__ import annotations

import json
import os

import torch

from lorafusion.multi.model import MultiLoRAModel

_PREFIX = "base_model.model."


def _target_modules(model: MultiLoRAModel) -> list[str]:
    """PEFT's ``target_modules`` that select exactly the wrapped linears: their last names (``q_proj``, ..) when
    PEFT, which matches a module whose path is a target or ends with ``.target``, would find no other module by
    them; else the full module paths (a subset such as one layer's ``q_proj`` must not grow to every ``q_proj``)."""
    wrapped = set(model.layer_names)
    short = sorted({p.rsplit(".", 1)[-1] for p in wrapped})
    found = {n for n, _ in model.model.named_modules()
             if n and any(n == t or n.endswith("." + t) for t in short)}
    return short if found == wrapped else sorted(wrapped)


def save_adapter(model: MultiLoRAModel, name: str, folder: str, base_model_name_or_path: str | None = None) -> None:
    """Write adapter ``name`` of ``model`` to ``folder`` as a PEFT LoRA adapter."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if name not in model.adapter_specs:
        raise ValueError(f"unknown adapter {name!r} (held: {list(model.adapter_specs)})")
    spec = model.adapter_specs[name]
    tensors = {}
    for path, layer in model.layers().items():
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].detach().contiguous().cpu()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].detach().contiguous().cpu()
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
                        target_modules=_target_modules(model), bias="none",
                        base_model_name_or_path=base_model_name_or_path)
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter(model: MultiLoRAModel, folder: str, name: str, dtype: torch.dtype | None = None) -> None:
    """Add the PEFT LoRA adapter stored in ``folder`` to ``model`` as adapter ``name``.

    The adapter must be plain LoRA (no DoRA, no per-module rank / alpha patterns) over exactly the model's wrapped
    linears."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type={cfg.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{folder}: {key}={cfg[key]!r} is not supported by MultiLoRAModel")
    state = load_file(os.path.join(folder, "adapter_model.safetensors"))
    paths = {}
    for key in state:
        if not key.startswith(_PREFIX) or not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise ValueError(f"{folder}: unexpected key {key!r} in adapter_model.safetensors")
        path = key[len(_PREFIX):].rsplit(".lora_", 1)[0]
        paths.setdefault(path, {})[key.rsplit(".", 2)[-2]] = state[key]
    missing = sorted(set(model.layer_names) - set(paths))
    extra = sorted(set(paths) - set(model.layer_names))
    if missing or extra:
        raise ValueError(f"{folder}: adapter modules differ from the wrapped linears: missing {missing[:5]}, "
                         f"not wrapped {extra[:5]}")
    model.add_adapter(name, int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)),
                      bool(cfg.get("use_rslora", False)), dtype)
    with torch.no_grad():
        for path, layer in model.layers().items():
            for which, tensor in paths[path].items():
                param = getattr(layer, which)[name]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{folder}: {path}.{which} has shape {tuple(tensor.shape)}, expected "
                                     f"{tuple(param.shape)}")
                param.copy_(tensor.to(param.device, param.dtype))
