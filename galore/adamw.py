"""GaLore AdamW: Adam moments kept in the projected space, decoupled weight decay."""

from __future__ import annotations

import math

import torch

from .base import GaLoreOptimizer, check_adam_group


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW whose param groups holding ``rank`` run Adam on the projected gradient.

    Per step t, with g the (projected) gradient::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g²
        p -= lr · sqrt(1 - b2ᵗ) / (1 - b1ᵗ) · scale · back(m / (sqrt(v) + eps))
        p -= lr · wd · p                      (decoupled decay, after the update)

    This is galore-torch 1.0's ``GaLoreAdamW`` exactly (eps outside the bias correction, decay applied after the
    update; for unprojected groups ``scale`` and ``back`` drop out), so trajectories match it. Moments are fp32
    whatever the parameter dtype (galore-torch keeps them in the gradient's dtype).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict) -> None:
        check_adam_group(group)
        if not isinstance(group["correct_bias"], bool):
            raise TypeError(f"correct_bias must be a bool, got {group['correct_bias']!r}")

    def _update(self, p: torch.Tensor, group: dict, state: dict, grad: torch.Tensor) -> None:
        if grad.dtype != torch.float32:
            grad = grad.float()
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        step = state["step"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        self._add_update(p, group, state, exp_avg / denom, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
