"""``build_optimizer``: choose which parameters are projected and build the named optimizer."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .adafactor import GaLoreAdafactor
from .adamw import GaLoreAdamW
from .adamw8bit import AdamW8bit, GaLoreAdamW8bit
from .base import _check_int
from .projector import matrix_view

logger = logging.getLogger(__name__)

OPTIMIZERS = {
    "adamw": (GaLoreAdamW, False),
    "adamw8bit": (AdamW8bit, False),
    "galore_adamw": (GaLoreAdamW, True),
    "galore_adamw8bit": (GaLoreAdamW8bit, True),
    "galore_adafactor": (GaLoreAdafactor, True),
}
NAMES = tuple(OPTIMIZERS) + tuple(f"{n}_layerwise" for n in OPTIMIZERS)


def _matches(module_name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)


def select_projected(model: nn.Module, target_modules, rank: int) -> tuple[list, list]:
    """Split ``model``'s trainable parameters into (projected, plain) lists of (name, parameter).

    ``target_modules``: ``"all-linear"`` (the weight of every ``nn.Linear`` except an output head named
    ``lm_head``; matrices whose smaller side is below ``rank`` — e.g. LoRA adapters — stay plain, logged), a list of
    module names (a module matches when its name equals an entry or ends with ``"." + entry``), a regex string
    (full match on the module name), or ``None`` (nothing projected). Only a module's ``weight`` with 2+ dims is
    projected; biases, norms and everything else get the plain update.
    """
    if target_modules is not None and (not isinstance(target_modules, (str, list, tuple, set)) or (
            not isinstance(target_modules, str) and not all(isinstance(t, str) and t for t in target_modules))):
        raise TypeError(f"target_modules must be 'all-linear', a regex, a list of names or None, got {target_modules!r}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {err}") from None
    chosen = {}
    skipped = []
    if target_modules is not None:
        for mname, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or not weight.requires_grad or weight.dim() < 2:
                continue
            if target_modules == "all-linear":
                if not isinstance(module, nn.Linear) or mname.split(".")[-1] == "lm_head":
                    continue
                if min(matrix_view(weight).shape) < rank:
                    skipped.append(mname)
                    continue
            elif not _matches(mname, target_modules):
                continue
            chosen[weight] = f"{mname}.weight" if mname else "weight"
    if skipped:
        logger.info("GaLore all-linear: %d linear layers smaller than rank %d stay unprojected (e.g. %s)",
                    len(skipped), rank, skipped[0])
    projected, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (projected if p in chosen else plain).append((name, p))
    return projected, plain


def build_optimizer(
    model: nn.Module,
    name: str,
    target_modules="all-linear",
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: str = "exact",
    layerwise: bool = False,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    **optimizer_args,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model``'s trainable parameters.

    ``name``: one of ``adamw``, ``adamw8bit``, ``galore_adamw``, ``galore_adamw8bit``, ``galore_adafactor``; a
    ``_layerwise`` suffix is the same as ``layerwise=True``. For the ``galore_*`` names the weights chosen by
    ``target_modules`` (see ``select_projected``) form a projected group (``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type``, ``svd``) and every other trainable parameter a plain group, so a LoRA model whose adapters
    match nothing projectable still trains (plain updates). For the plain names the GaLore arguments are ignored.
    ``layerwise``: step from gradient hooks (``enable_layerwise(accumulation_steps, max_grad_norm)``).
    Other keyword arguments (``betas``, ``eps``, ...) go to the optimizer class. ``lr`` may be ``None`` for
    ``galore_adafactor`` (relative step); with a number, Adafactor runs with ``relative_step=False,
    scale_parameter=False`` unless told otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    if name.endswith("_layerwise"):
        name, layerwise = name[: -len("_layerwise")], True
    if not isinstance(layerwise, bool):
        raise TypeError(f"layerwise must be a bool, got {layerwise!r}")
    cls, galore = OPTIMIZERS[name]
    _check_int("accumulation_steps", accumulation_steps, low=1)
    if galore:
        _check_int("rank", rank, low=1)
        projected, plain = select_projected(model, target_modules, rank)
    else:
        projected, plain = [], [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not projected and not plain:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    groups = []
    if projected:
        groups.append({
            "params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
            "proj_type": proj_type, "svd": svd,
        })
    if plain:
        groups.append({"params": plain})
    if galore:
        logger.info("%s: %d projected matrices (rank %d), %d plain parameters", name, len(projected), rank, len(plain))
        if not projected:
            logger.warning("%s: target_modules=%r matched no projectable weight; every parameter gets the plain "
                           "update", name, target_modules)
    kwargs = dict(optimizer_args)
    kwargs["weight_decay"] = weight_decay
    if cls is GaLoreAdafactor:
        if lr is not None:
            kwargs.setdefault("relative_step", False)
            kwargs.setdefault("scale_parameter", False)
    kwargs["lr"] = lr
    optimizer = cls(groups, **kwargs)
    if layerwise:
        optimizer.enable_layerwise(accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm)
    elif max_grad_norm is not None:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} applies to layer-wise mode only; clip the gradients "
                         "yourself (torch.nn.utils.clip_grad_norm_) before step()")
    return optimizer
