"""Run PEFT's LoRA ``Linear`` layers through the fused kernels without changing a parameter name.

Two ways in:
  * ``patch_peft(model)`` converts the LoRA Linear layers of an existing ``PeftModel`` in place (the module's class
    is swapped; parameters, buffers and state-dict keys are untouched, so ``save_pretrained`` still writes standard
    ``adapter_model.safetensors`` + ``adapter_config.json``).
  * ``fused_lora_config(**LoraConfig kwargs)`` returns a ``LoraConfig`` whose custom-module registration makes
    ``get_peft_model`` build fused layers directly.

A layer that cannot be fused (DoRA or another LoRA variant, several active adapters at once, a quantized or
non-``nn.Linear`` base, ``fan_in_fan_out``, ``lora_bias``, a dropout module other than ``nn.Dropout``, an input whose
dtype differs from the base weight's) runs PEFT's own forward, with one warning naming the layer and the reason.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from lorafusion.backends import BACKENDS, resolve_backend_name
from lorafusion.function import fused_lora_linear
from lorafusion.layer import check_input

logger = logging.getLogger("lorafusion")

try:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
except ImportError as exc:  # PEFT is a dependency; keep the import error readable
    raise ImportError("lorafusion's PEFT integration needs `peft` (pip install peft)") from exc


def _static_reason(layer: PeftLoraLinear) -> str | None:
    """Why this layer can never run fused, or None."""
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not a plain nn.Linear (quantized or custom)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weights)"
    if getattr(layer, "lora_variant", None):
        return f"LoRA variant {sorted(type(v).__name__ for v in layer.lora_variant.values())} (e.g. DoRA)"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias=True"
    for name, drop in layer.lora_dropout.items():
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return f"dropout module of adapter {name!r} is {type(drop).__name__}"
    return None


class FusedPeftLoraLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` with its forward run by ``lorafusion``'s fused kernels when it can be."""

    _lorafusion_backend: str | None = None
    _lorafusion_name: str | None = None

    def __init__(self, base_layer, adapter_name, *args, **kwargs):
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        if kwargs.get("target_name"):  # built by get_peft_model (fused_lora_config): PEFT passes the module path
            self._lorafusion_name = kwargs["target_name"]

    def _lorafusion_label(self) -> str:
        """The layer's name in messages: its module path where known."""
        return self._lorafusion_name or f"LoRA Linear({self.in_features}->{self.out_features})"

    def _lorafusion_warn(self, reason: str) -> None:
        warned = self.__dict__.setdefault("_lorafusion_warned", set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"lorafusion: layer {self._lorafusion_label()} runs PEFT's unfused forward: {reason}", stacklevel=3)

    def _dynamic_reason(self, x: torch.Tensor, args, kwargs, active: list[str]) -> str | None:
        reason = _static_reason(self)
        if reason:
            return reason
        if args or any(k != "adapter_names" for k in kwargs):
            return f"extra forward arguments {sorted(kwargs)}"
        if len(active) > 1:
            return f"{len(active)} active adapters at once ({active})"
        name = active[0]
        # the fused path reads the modules' weights without calling them: hooks on them (accelerate's offloading,
        # which brings the weights from meta, or a user's) would be skipped
        hooked = [m for m in (self.get_base_layer(), self.lora_A[name], self.lora_B[name])
                  if m.__dict__.get("_hf_hook") is not None or m._forward_hooks or m._forward_pre_hooks]
        if hooked:
            return f"forward hooks on {', '.join(type(m).__name__ for m in hooked)} (accelerate offloading, ...)"
        if isinstance(self.scaling[name], torch.Tensor):
            return "a tensor scaling (PEFT's compiled hotswap)"
        if torch._C._are_functorch_transforms_active():
            return "a torch.func transform (vmap / grad) is active"
        if x.dtype != self.get_base_layer().weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return f"input dtype {x.dtype} differs from the base weight dtype {self.get_base_layer().weight.dtype}"
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return super().forward(x, *args, **kwargs)
        reason = self._dynamic_reason(x, args, kwargs, active)
        if reason is not None:
            self._lorafusion_warn(reason)
            return super().forward(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        name = active[0]
        base = self.get_base_layer()
        check_input(self._lorafusion_label(), x, base.weight)
        drop = self.lora_dropout[name]
        p = drop.p if (isinstance(drop, nn.Dropout) and drop.training) else 0.0
        return fused_lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.scaling[name], p, self._lorafusion_backend)


def patch_peft(model: nn.Module, backend: str | None = None) -> dict:
    """Convert every LoRA ``Linear`` of a PEFT model to the fused implementation, in place.

    It converts the layers there are now: a later ``add_adapter`` that puts LoRA on modules that had none (PEFT
    builds them as plain ``lora.Linear``) needs another ``patch_peft`` call (already fused layers are kept, with
    the backend they were built or patched with unless ``backend`` is given), or build the model with
    :func:`fused_lora_config` so PEFT builds fused layers itself.

    Returns ``{"fused": [layer names], "unfused": {layer name: reason}}``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_peft: model must be an nn.Module, got {type(model).__name__}")
    requested = backend
    backend = resolve_backend_name(backend)
    fused, unfused = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLinear):
            continue
        reason = _static_reason(module)
        if reason is not None:
            unfused[name] = reason
            warnings.warn(f"lorafusion: layer {name} keeps PEFT's unfused forward: {reason}", stacklevel=2)
            continue
        already = isinstance(module, FusedPeftLoraLinear)
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedPeftLoraLinear
        if requested is not None or not already:  # a fused layer keeps the backend it was built or patched with
            module._lorafusion_backend = backend
        module._lorafusion_name = name
        fused.append(name)
    if not fused and not unfused:
        raise ValueError("patch_peft: the model has no PEFT LoRA Linear layers (is it a PeftModel with LoRA?)")
    logger.info("lorafusion: fused %d LoRA Linear layers, %d kept unfused", len(fused), len(unfused))
    return {"fused": fused, "unfused": unfused}


def unpatch_peft(model: nn.Module) -> int:
    """Restore PEFT's own forward on every fused layer; returns how many were restored."""
    n = 0
    for module in model.modules():
        if isinstance(module, FusedPeftLoraLinear):  # also fused_lora_config(backend=...)'s per-backend classes
            module.__class__ = PeftLoraLinear
            n += 1
    return n


def fused_lora_config(backend: str | None = None, **lora_config_kwargs) -> "LoraConfig":
    """A ``LoraConfig`` that makes ``get_peft_model`` build fused LoRA Linear layers directly."""
    cfg = LoraConfig(**lora_config_kwargs)
    cfg._register_custom_module({nn.Linear: _FusedDispatch(None if backend is None else resolve_backend_name(backend))})
    return cfg


class _FusedDispatch:
    """PEFT's custom-module hook for ``nn.Linear``: a fused layer for a plain ``nn.Linear`` base, and None for a
    subclass (bitsandbytes' 8-bit / 4-bit layers, torchao, ...), so PEFT's own dispatch gives those their own LoRA
    layer instead of a fused one that would fall back. A module-level class, so a config holding it pickles."""

    def __init__(self, backend: str | None):
        self.backend = backend

    def __call__(self, target, adapter_name, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if type(base) is not nn.Linear:
            return None
        config = kwargs.get("config")
        if kwargs.get("fan_in_fan_out") or getattr(config, "fan_in_fan_out", False):
            # what PEFT's own dispatch does for an nn.Linear (its weight is never transposed); a layer left with it
            # fell back, and merging it added a transposed delta
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                          "fan_in_fan_out to False.", stacklevel=2)
            kwargs["fan_in_fan_out"] = False
            if config is not None:
                config.fan_in_fan_out = False
        cls = FusedPeftLoraLinear if self.backend is None else _BACKEND_CLASSES[self.backend]
        return cls(target, adapter_name, **kwargs)


def _backend_class(backend: str) -> type:
    """``FusedPeftLoraLinear`` bound to one backend: a module-level class (``FusedPeftLoraLinear_<backend>``), so a
    model holding it pickles and ``torch.save``s like any other."""
    qualname = f"FusedPeftLoraLinear_{backend}"
    cls = type(qualname, (FusedPeftLoraLinear,), {"_lorafusion_backend": backend, "__module__": __name__,
                                                   "__qualname__": qualname})
    globals()[qualname] = cls
    return cls


_BACKEND_CLASSES = {b: _backend_class(b) for b in BACKENDS + ("auto",)}
