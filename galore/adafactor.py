"""GaLore Adafactor: factored second moments of the projected gradient."""

from __future__ import annotations

import math

import torch

from .base import GaLoreOptimizer, _check_number


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor (Shazeer & Stern 2018) whose param groups holding ``rank`` factor the projected gradient's second
    moment. Same algorithm and defaults as galore-torch 1.0's ``GaLoreAdafactor`` (the transformers Adafactor):
    ``relative_step=True`` and ``lr=None`` by default; pass ``lr=..., relative_step=False, scale_parameter=False``
    for a manual schedule. Weight decay is applied before the update, scaled by the effective lr.
    """

    def __init__(
        self,
        params,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ):
        defaults = {
            "lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate, "beta1": beta1,
            "weight_decay": weight_decay, "scale_parameter": scale_parameter, "relative_step": relative_step,
            "warmup_init": warmup_init,
        }
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict) -> None:
        # per group, so a group's own lr / relative_step / warmup_init are checked like the constructor's
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        where = f"param group {gi}: " if gi > 0 else ""
        lr, relative = group["lr"], group["relative_step"]
        if lr is not None and relative:
            raise ValueError(f"{where}lr={lr!r} cannot be combined with relative_step=True (pass relative_step=False)")
        if lr is None and not relative:
            raise ValueError(f"{where}lr=None needs relative_step=True")
        if group["warmup_init"] and not relative:
            raise ValueError(f"{where}warmup_init=True requires relative_step=True")
        for flag in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"{where}{flag} must be True or False, got {group[flag]!r}")
        if lr is not None:
            _check_number("lr", lr, low=0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"eps must be a pair (eps_sq, eps_scale), got {eps!r}")
        _check_number("eps[0]", eps[0], low=0.0)
        _check_number("eps[1]", eps[1], low=0.0)
        _check_number("clip_threshold", group["clip_threshold"], low=0.0, low_inclusive=False)
        # the second-moment decay 1 - t^decay_rate must not fall below 0 as t grows: decay_rate <= 0 (default -0.8)
        _check_number("decay_rate", group["decay_rate"], high=0.0, high_inclusive=True)
        if group["beta1"] is not None:
            _check_number("beta1", group["beta1"], low=0.0, high=1.0)
        _check_number("weight_decay", group["weight_decay"], low=0.0)

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    def _update(self, p: torch.Tensor, group: dict, state: dict, grad: torch.Tensor) -> None:
        if grad.dtype != torch.float32:
            grad = grad.float()
        factored = grad.dim() >= 2
        use_first_moment = group["beta1"] is not None
        if "RMS" not in state:
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], dtype=grad.dtype, device=grad.device)
                state["exp_avg_sq_col"] = torch.zeros(
                    grad.shape[:-2] + grad.shape[-1:], dtype=grad.dtype, device=grad.device
                )
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        p32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        step = state["step"]
        state["RMS"] = self._rms(p32)
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr = max(group["eps"][1], state["RMS"]) * lr
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if use_first_moment:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = exp_avg
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * lr)
        self._add_update(p32, group, state, update, alpha=-1.0)
        if p32 is not p:
            p.copy_(p32)
