"""``FusedLoRALinear``: a frozen ``nn.Linear`` plus a low-rank adapter, run by the fused kernels.

    y = base(x) + scale * dropout(x) @ A^T @ B^T,    scale = alpha / r  (alpha / sqrt(r) with rsLoRA)

A is Kaiming-uniform and B zero (PEFT's init), so a fresh layer equals its base. Dropout is on the adapter path only
and its mask is regenerated in backward from a seed drawn from torch's generator for the input's device.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from lorafusion.backends import resolve_backend_name
from lorafusion.function import fused_lora_linear
from lorafusion.reference import lora_scale


def check_lora_args(name: str, in_features: int, out_features: int, r, alpha, dropout,
                    rank_within_shape: bool = True) -> None:
    """Validate adapter hyper-parameters; errors name the layer and the value. ``rank_within_shape``: r must not
    exceed min(in_features, out_features) (the single-adapter layer's contract; the multi-adapter layer, like
    PEFT, allows a rank-deficient adapter on a narrow layer, e.g. a 1-output gate under an all-linear adapter)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name}: r must be an int, got {r!r}")
    if r < 1 or (rank_within_shape and r > min(in_features, out_features)):
        bound = f"min(in_features, out_features)={min(in_features, out_features)}" if rank_within_shape else "..."
        raise ValueError(f"{name}: r={r} must be in [1, {bound}]")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise TypeError(f"{name}: alpha must be a finite number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout={dropout!r} must be in [0, 1)")


def check_float_base(name: str, base: nn.Linear) -> None:
    """A quantized ``nn.Linear`` subclass (bitsandbytes' Linear8bitLt / Linear4bit) passes ``isinstance`` but holds
    an integer weight the fused kernels cannot read: a TypeError naming it, not a failure deep in ``__init__``."""
    if not isinstance(base.weight, torch.Tensor) or not base.weight.is_floating_point():
        dtype = getattr(base.weight, "dtype", type(base.weight).__name__)
        raise TypeError(f"{name}: base {type(base).__name__} holds a {dtype} weight (a quantized layer?); the fused "
                        "layer needs a floating-point nn.Linear (on a quantized base, PEFT's own LoRA forward runs: "
                        "see lorafusion.patch_peft)")


def check_input(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: input's last dimension is {tuple(x.shape)[-1:]}, expected in_features={weight.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device} but the weights are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts both, as nn.Linear
        raise ValueError(f"{name}: input dtype {x.dtype} differs from the weight dtype {weight.dtype}")


class FusedLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"FusedLoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        check_float_base("FusedLoRALinear", base)
        check_lora_args("FusedLoRALinear", base.in_features, base.out_features, r, alpha, dropout)
        self.base = base
        base.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.backend = resolve_backend_name(backend)
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.disabled = False
        # the state dict always holds the unmerged base weight: a merged layer's file loads right into a fresh layer
        # (it held W + s B A beside A and B, and a fresh layer added the term a second time), and a merged layer
        # that loads one merges it again
        self.register_state_dict_post_hook(FusedLoRALinear._unmerged_state)
        self.register_load_state_dict_pre_hook(FusedLoRALinear._unmerge_before_load)
        self.register_load_state_dict_post_hook(FusedLoRALinear._merge_loaded)

    def adapter_params(self) -> list[str]:
        """Names of the trainable adapter parameters."""
        return ["lora_A", "lora_B"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight
        check_input("FusedLoRALinear", x, w)
        if self.disabled and self.merged:  # take the merged delta back out on the fly, no dropout; a disabled
            # adapter gets no gradient (detached), as if the layer ran its base alone
            return fused_lora_linear(x, w, self.base.bias, self.lora_A.detach(), self.lora_B.detach(), -self.scale,
                                     0.0, self.backend)
        if self.disabled or self.merged:
            return self.base(x)
        p = self.dropout if self.training else 0.0
        return fused_lora_linear(x, w, self.base.bias, self.lora_A, self.lora_B, self.scale, p, self.backend)

    def _base_plus_delta(self, sign: int) -> torch.Tensor:
        """The base weight with ``sign`` * s B A added, in float32 (float64 for a float64 layer), rounded once to the
        weight's dtype."""
        w = self.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = self.scale * (self.lora_B.to(acc) @ self.lora_A.to(acc))
        return (w.to(acc) + sign * delta).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale * B A into the base weight; forward then runs the base GEMM alone."""
        if not self.merged:
            self.base.weight.copy_(self._base_plus_delta(+1))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.copy_(self._base_plus_delta(-1))
            self.merged = False

    @staticmethod
    @torch.no_grad()
    def _unmerged_state(module, state_dict, prefix, local_metadata) -> None:
        if module.merged:
            state_dict[prefix + "base.weight"] = module._base_plus_delta(-1)

    @staticmethod
    @torch.no_grad()
    def _unmerge_before_load(module, *_args) -> None:
        """A merged layer loading a file that lacks the base weight (an adapter-only checkpoint, strict=False) kept the
        old term in it and added the loaded one too: the term in the weight now goes before anything loads, and
        ``_merge_loaded`` folds in the loaded one."""
        if module.merged:
            module.base.weight.copy_(module._base_plus_delta(-1))

    @staticmethod
    @torch.no_grad()
    def _merge_loaded(module, incompatible_keys) -> None:
        if module.merged:  # the file's weight is unmerged (see _unmerged_state): fold the loaded term in again
            module.base.weight.copy_(module._base_plus_delta(+1))

    @contextmanager
    def adapter_disabled(self):
        """Run the base layer alone inside the block."""
        prev, self.disabled = self.disabled, True
        try:
            yield self
        finally:
            self.disabled = prev

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, rslora={self.use_rslora}, "
                f"backend={self.backend}, merged={self.merged}")
