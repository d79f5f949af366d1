"""8-bit AdamW through bitsandbytes' blockwise 8-bit update, with and without GaLore projection.

Every bitsandbytes call passes its arguments by keyword: galore-torch 1.0 passes them by position, which
bitsandbytes 0.50 binds to different parameters, so its projected parameters never update.
"""

from __future__ import annotations

import logging

import torch

from .base import GaLoreOptimizer, _check_int, check_adam_group

logger = logging.getLogger(__name__)

BLOCKSIZE = 256  # bitsandbytes' blockwise optimizer block (its CPU kernel hard-codes it)


class GaLoreAdamW8bit(GaLoreOptimizer):
    """AdamW with blockwise 8-bit moments (bitsandbytes' ``adam`` kernels; 32-bit moments for tensors under
    ``min_8bit_size`` elements, as bitsandbytes does).

    Unprojected groups: exactly bitsandbytes' ``AdamW8bit`` update (decay inside the kernel, before the update).
    Projected groups: the kernel runs on the projected gradient against a zero buffer, giving the low-rank update
    ``-lr · m̂ / (sqrt(v̂) + eps)``; it is projected back, scaled and added, then ``p -= lr · wd · p`` (galore-torch's
    order). State per parameter: ``state1``/``state2`` (uint8, or fp32 below ``min_8bit_size``) and
    ``absmax1``/``absmax2`` (fp32, one per 256-element block); the quantisation maps are constants, not state.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
    ):
        _check_int("min_8bit_size", min_8bit_size, low=0)
        self._min_8bit_size = min_8bit_size
        self._qmaps: dict = {}
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_min_8bit_size"] = self._min_8bit_size  # torch keeps only defaults, state and param_groups
        return state

    def __setstate__(self, state: dict) -> None:
        if "_min_8bit_size" in state:  # copy.deepcopy / pickle (load_state_dict passes no such key)
            self._min_8bit_size = state.pop("_min_8bit_size")
        if not hasattr(self, "_qmaps"):
            self._qmaps = {}
        super().__setstate__(state)

    def _validate_hyperparameters(self, group: dict) -> None:
        check_adam_group(group)

    def _qmap(self, signed: bool, device: torch.device) -> torch.Tensor:
        key = (signed, device)
        if key not in self._qmaps:
            import bitsandbytes.functional as F

            self._qmaps[key] = F.create_dynamic_map(signed=signed).to(device)
        return self._qmaps[key]

    def _init_state(self, state: dict, grad: torch.Tensor) -> None:
        if grad.numel() >= self._min_8bit_size:
            blocks = (grad.numel() + BLOCKSIZE - 1) // BLOCKSIZE
            for i in (1, 2):
                state[f"state{i}"] = torch.zeros(grad.shape, dtype=torch.uint8, device=grad.device)
                state[f"absmax{i}"] = torch.zeros((blocks,), dtype=torch.float32, device=grad.device)
        else:
            for i in (1, 2):
                state[f"state{i}"] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)

    def _update(self, p: torch.Tensor, group: dict, state: dict, grad: torch.Tensor) -> None:
        import bitsandbytes.functional as F

        projected = self._is_projected(group)
        if projected:
            grad = grad.float().contiguous()
            target = torch.zeros_like(grad)
            weight_decay = 0.0
        else:
            if not p.is_contiguous():
                raise ValueError(f"{type(self).__name__} needs contiguous parameters; {self._param_names[p]} is not")
            grad = grad.contiguous()
            target = p
            weight_decay = group["weight_decay"]
        if "state1" not in state:
            self._init_state(state, grad)
        beta1, beta2 = group["betas"]
        if state["state1"].dtype == torch.uint8:
            F.optimizer_update_8bit_blockwise(
                optimizer_name="adam", g=grad, p=target, state1=state["state1"], state2=state["state2"],
                beta1=beta1, beta2=beta2, beta3=0.0, alpha=0.0, eps=group["eps"], step=state["step"],
                lr=group["lr"], qmap1=self._qmap(True, grad.device), qmap2=self._qmap(False, grad.device),
                absmax1=state["absmax1"], absmax2=state["absmax2"], weight_decay=weight_decay,
                gnorm_scale=1.0, skip_zeros=False,
            )
        else:
            F.optimizer_update_32bit(
                optimizer_name="adam", g=grad, p=target, state1=state["state1"], beta1=beta1, eps=group["eps"],
                step=state["step"], lr=group["lr"], state2=state["state2"], beta2=beta2, beta3=0.0, alpha=0.0,
                weight_decay=weight_decay, gnorm_scale=1.0, unorm_vec=None, max_unorm=0.0, skip_zeros=False,
            )
        if projected:
            self._add_update(p, group, state, target, alpha=1.0)
            if group["weight_decay"] > 0.0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])


class AdamW8bit(GaLoreAdamW8bit):
    """Plain 8-bit AdamW (no projection): bitsandbytes' ``AdamW8bit`` update through the same path, with this
    package's state handling and layer-wise mode. Param groups holding ``rank`` are rejected."""

    _allows_projection = False
