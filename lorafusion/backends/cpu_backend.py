"""C++ CPU backend: the ``torch.ops.lorafusion`` composite ops, fused per block of rows around torch's own GEMM
(csrc/lora_cpu.cpp). The contract (shapes, dtypes, math) is in ``lorafusion.backends``.

Without dropout (p == 0), in fp32 / fp64 and with enough tokens, the rank-r term rides inside the big GEMMs through their weight
operand instead: W' = W + s B A (out x in x r flops, r / T of one GEMM) makes Y = X W'^T + b and dX = dY W' exact,
so each big GEMM runs once at full speed with nothing added around it; W' is rebuilt in backward, never stored.
S, dS, dB and dA are skinny GEMMs that torch's BLAS runs in one pass over X or dY (measured faster here than the
row-blocked C++ ops, which earn their keep when a dropout mask has to be regenerated)."""
from __future__ import annotations

import torch

from lorafusion import _ext
from lorafusion.reference import op_seed

DEVICE_TYPES = ("cpu",)
NAME = "cpu"


def unavailable_reason() -> str | None:
    return None if _ext.EXTENSION_AVAILABLE else _ext.EXTENSION_ERROR


# Tokens per adapter rank from which the merged-weight path is cheaper than the rank-r term per row block.
MERGE_MIN_TOKENS_PER_RANK = 8


def _merged_weight(weight, lora_A, lora_B, scale):
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.addmm(weight.to(acc), lora_B.to(acc), lora_A.to(acc), alpha=float(scale)).to(weight.dtype)


def _use_merged(x2d, lora_A, p) -> bool:
    # fp32 / fp64 only: rounding W' to bf16 / fp16 would swallow a small s B A under W's last bit.
    return (p == 0.0 and x2d.dtype in (torch.float32, torch.float64)
            and x2d.shape[0] >= MERGE_MIN_TOKENS_PER_RANK * lora_A.shape[0])


def forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p):
    if _use_merged(x2d, lora_A, p):
        w_merged = _merged_weight(weight, lora_A, lora_B, scale)
        y = torch.addmm(bias, x2d, w_merged.t()) if bias is not None else x2d @ w_merged.t()
        return y, x2d @ lora_A.to(x2d.dtype).t()
    return torch.ops.lorafusion.lora_linear_forward(x2d, weight, bias, lora_A, lora_B, float(scale), op_seed(seed),
                                                    float(p))


def backward(dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx):
    if _use_merged(x2d, lora_A, p):
        dX = dy2d @ _merged_weight(weight, lora_A, lora_B, scale) if need_dx else None
        dS = (dy2d @ lora_B.to(dy2d.dtype)).mul_(scale)
        dB = (S.t() @ dy2d).mul_(scale).t()  # S^T dY runs about twice as fast in MKL as dY^T S
        dA = dS.t() @ x2d
        return dX, dA, dB
    return torch.ops.lorafusion.lora_linear_backward(dy2d, x2d, weight, lora_A, lora_B, S, float(scale),
                                                     op_seed(seed), float(p), bool(need_dx))
