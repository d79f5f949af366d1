"""Optimizers that cut optimizer-state memory: GaLore (gradient low-rank projection) and 8-bit AdamW.

Public API
----------
``GaLoreAdamW``, ``GaLoreAdafactor``, ``GaLoreAdamW8bit``, ``AdamW8bit``: ``torch.optim.Optimizer`` subclasses.
A param group holding ``rank`` is projected (keys ``rank``, ``update_proj_gap`` = 200, ``scale`` = 0.25,
``proj_type`` in std / reverse_std / left / right, ``svd`` in exact / randomized); other groups get the plain
update. ``build_optimizer(model, name, target_modules=..., lr=..., weight_decay=..., rank=..., update_proj_gap=...,
scale=..., proj_type=..., layerwise=False, accumulation_steps=1, max_grad_norm=None, **optimizer_args)`` picks the
projected weights (``"all-linear"``, a list of module names, a regex) and returns one of them.

Layer-wise mode
---------------
``build_optimizer(..., layerwise=True, accumulation_steps=k)`` (or a name ending in ``_layerwise``, or
``optimizer.enable_layerwise(accumulation_steps=k, max_grad_norm=None)`` on any of the optimizers) registers a
post-accumulate-grad hook per parameter: each projected parameter projects its gradient as soon as it is
accumulated and frees the full gradient, summing projected gradients over the k backward passes of one step, and
is updated on the k-th. The object returned is still the optimizer: keep calling ``step()`` once per optimizer
step (it finishes anything the hooks left, and does all the work when ``max_grad_norm`` is set or under
distributed training) and ``zero_grad()`` (which also drops what the hooks accumulated since the last update);
``state_dict()`` / ``load_state_dict()`` work as usual (call them between steps); ``set_accumulation_steps(k)``
changes k; ``disable_layerwise()`` removes the hooks. Clipping is by the global norm of the projected gradients (``max_grad_norm``), not by an external
``clip_grad_norm_`` (the full gradients are gone by then). Under DDP run backward inside ``model.no_sync()``; the
optimizer averages the accumulated gradients across ranks itself.

``galore/`` never imports ``lorafusion/``. See docs/galore.md.
"""

from .adafactor import GaLoreAdafactor
from .adamw import GaLoreAdamW
from .adamw8bit import AdamW8bit, GaLoreAdamW8bit
from .base import GaLoreOptimizer
from .build import NAMES, build_optimizer, select_projected

__all__ = [
    "AdamW8bit",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreOptimizer",
    "NAMES",
    "build_optimizer",
    "select_projected",
]
