"""The LoRA math every backend is checked against (plain torch, any device, any dtype; float64 is the truth).

For input X (tokens x in), frozen W (out x in) and bias b, adapter A (r x in), B (out x r), scale s = alpha / r
(alpha / sqrt(r) with rsLoRA), inverted dropout D with probability p:

    S  = D(X) A^T                        (tokens x r, small; kept in float32 or wider)
    Y  = X W^T + b + s * S B^T
    dS = s * dY B
    dB = s * dY^T S
    dA = dS^T D(X)
    dX = dY W + D'(dS A)                 (D' applies the same mask and 1/(1-p) scale)

Dropout sits on the LoRA path only. The mask is not stored: every backend regenerates it from ``(seed, row, col)``
with the counter-based generator below, so forward and backward (and every backend) agree bit for bit.

The dropout mask
----------------
Element (row, col) of a (rows x cols) input draws word ``w`` of one Philox-4x32-10 block:

    q = (col >> 6) * 16 + (col & 15)          # 16 consecutive counters serve each block of 64 columns
    w = (col >> 4) & 3                        # which of Philox's four output words
    draw = philox4x32_10(counter=(q, row, 0, 0), key=(seed & 0xffffffff, seed >> 32))[w]

and is kept iff ``draw >= threshold(p)`` (unsigned 32-bit), ``threshold(p) = min(round(p * 2**32), 2**32 - 1)``.
One Philox block thus feeds four elements, and a SIMD vector of 16 counters yields 64 contiguous columns as four
contiguous vectors. A kept element is scaled by ``1 / (1 - p)``. ``row`` is the flattened token index and ``col``
the input feature. The C++ (``csrc/philox.h``), CUDA and Triton kernels implement exactly this.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def dropout_threshold(p: float) -> int:
    """Unsigned 32-bit threshold: a draw below it is dropped."""
    return min(int(round(p * 2.0**32)), _MASK32)


def op_seed(seed: int) -> int:
    """The seed as the ops' int64 argument: uint64 seeds above 2**63 - 1 are passed as their two's complement."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a: int64 tensor holding uint32 values; b: uint32 constant. int64 products would overflow, so split b.
    b_lo, b_hi = b & 0xFFFF, b >> 16
    t = a * b_lo
    u = a * b_hi + (t >> 16)
    hi = u >> 16
    lo = (a * b) & _MASK32  # wraps mod 2**64; the low 32 bits stay exact
    return hi, lo


def philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of counters (c0, c1, 0, 0) (int64 tensors holding uint32) under key (seed lo, seed hi):
    the four output words, each as int64 in [0, 2**32)."""
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _MASK32, seed >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uint32(seed: int, rows: int, cols: int, device=None, row_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The dropout draw of every element of a rows x cols grid (int64 in [0, 2**32)), per the module docstring.

    ``row_ids`` (int64, length rows) names the global row index of each row when it is not ``arange(rows)``."""
    col = torch.arange(cols, dtype=torch.int64, device=device)
    q = ((col >> 6) * 16 + (col & 15)).expand(rows, cols)
    row = row_ids.to(device=device, dtype=torch.int64) if row_ids is not None else torch.arange(
        rows, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32_10(q.clone(), row[:, None].expand(rows, cols).clone(), seed))
    return words.gather(0, ((col >> 4) & 3).expand(1, rows, cols))[0]


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask (rows x cols) for dropout probability ``p`` drawn from ``seed``; all True when p == 0."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    return philox_uint32(seed, rows, cols, device) >= dropout_threshold(p)


def apply_dropout(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """D(X): inverted dropout of a 2-D tensor with the mask of ``dropout_keep_mask``."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return torch.where(keep, x2d / (1.0 - p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


# ---------------------------------------------------------------------------------------------------------------
# The five ops of the fused graph, written plainly. Backends implement the same signatures.
# All take 2-D row-major views: x2d (T x in), dy2d (T x out). S and dS are float32 (or float64 for float64 input).
# ---------------------------------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rank-r path accumulates and keeps S, dS, dA, dB in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_shrink(x2d, lora_A, seed: int, p: float) -> torch.Tensor:
    """S = D(X) A^T, accumulated and returned in float32 (float64 for float64 input)."""
    acc = acc_dtype(x2d.dtype)
    return apply_dropout(x2d.to(acc), seed, p) @ lora_A.to(acc).t()


def lora_expand_forward(x2d, weight, bias, S, lora_B, scale: float) -> torch.Tensor:
    """Y = X W^T + b + s * S B^T, in the input's dtype."""
    acc = acc_dtype(x2d.dtype)
    y = x2d.to(acc) @ weight.to(acc).t() + scale * (S.to(acc) @ lora_B.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x2d.dtype)


def lora_dy_shrink(dy2d, lora_B, S, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s * dY B (float32) and dB = s * dY^T S (in B's dtype)."""
    acc = acc_dtype(dy2d.dtype)
    dy = dy2d.to(acc)
    dS = scale * (dy @ lora_B.to(acc))
    dB = scale * (dy.t() @ S.to(acc))
    return dS, dB.to(lora_B.dtype)


def lora_dropout_grad_A(x2d, dS, seed: int, p: float, a_dtype: torch.dtype) -> torch.Tensor:
    """dA = dS^T D(X), in A's dtype."""
    acc = acc_dtype(x2d.dtype)
    return (dS.to(acc).t() @ apply_dropout(x2d.to(acc), seed, p)).to(a_dtype)


def lora_expand_backward(dy2d, weight, dS, lora_A, seed: int, p: float) -> torch.Tensor:
    """dX = dY W + D'(dS A), in dY's dtype."""
    acc = acc_dtype(dy2d.dtype)
    lora = apply_dropout(dS.to(acc) @ lora_A.to(acc), seed, p)
    return (dy2d.to(acc) @ weight.to(acc) + lora).to(dy2d.dtype)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale: float, p: float = 0.0, seed: int = 0):
    """Whole-layer forward with autograd (for tests: run it in float64 and differentiate)."""
    x2d = x.reshape(-1, x.shape[-1])
    xd = apply_dropout(x2d, seed, p)
    y = x2d @ weight.t() + scale * ((xd @ lora_A.t()) @ lora_B.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (r ** 0.5) if use_rslora else alpha / r
