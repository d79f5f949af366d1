"""C++ CPU backend: the ``torch.ops.lorafusion`` composite ops, fused per block of rows around torch's own GEMM
(csrc/lora_cpu.cpp). The contract (shapes, dtypes, math) is in ``lorafusion.backends``."""
from __future__ import annotations

import torch

from lorafusion import _ext

DEVICE_TYPES = ("cpu",)
NAME = "cpu"


def unavailable_reason() -> str | None:
    return None if _ext.EXTENSION_AVAILABLE else _ext.EXTENSION_ERROR


def op_seed(seed: int) -> int:
    """The seed as the ops' int64 argument: uint64 seeds above 2**63 - 1 are passed as their two's complement."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p):
    return torch.ops.lorafusion.lora_linear_forward(x2d, weight, bias, lora_A, lora_B, float(scale), op_seed(seed),
                                                    float(p))


def backward(dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx):
    return torch.ops.lorafusion.lora_linear_backward(dy2d, x2d, weight, lora_A, lora_B, S, float(scale),
                                                     op_seed(seed), float(p), bool(need_dx))
