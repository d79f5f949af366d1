"""Plain-torch backend: the reference ops composed. Runs anywhere; the fallback when no kernel is built."""
from __future__ import annotations

import torch

from lorafusion import reference as ref

DEVICE_TYPES = ("cpu", "cuda")
NAME = "reference"


def forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p):
    S = ref.lora_shrink(x2d, lora_A, seed, p)
    return ref.lora_expand_forward(x2d, weight, bias, S, lora_B, scale), S


def backward(dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx):
    # dB in the accumulation dtype (float64 for float64 input, else float32), whatever B's own dtype
    acc = torch.float64 if dy2d.dtype == torch.float64 else torch.float32
    dS, dB = ref.lora_dy_shrink(dy2d, lora_B.to(acc), S, scale)
    dA = ref.lora_dropout_grad_A(x2d, dS, seed, p, dS.dtype)
    dX = ref.lora_expand_backward(dy2d, weight, dS, lora_A, seed, p) if need_dx else None
    return dX, dA, dB
