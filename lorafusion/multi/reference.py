"""The multi-adapter float64 reference: each adapter's rows through the single-adapter math of
``lorafusion.reference``, with the dropout mask of that module keyed by (seed, *global* row, col).

    Y[i] = X[i] W^T + b + s_a * D_a(X)[i] A_a^T B_a^T     for row i of adapter a
    Y[i] = X[i] W^T + b                                   for a row with no adapter

where D_a is ``lorafusion.reference.apply_dropout(X, seed, p_a)`` over the whole microbatch (so row i's mask is the
single-adapter mask of row i). With one adapter owning every row this *is* ``lorafusion.reference.lora_linear_reference``.
"""
from __future__ import annotations

import torch

from lorafusion import reference as ref
from lorafusion.multi.segments import AdapterSegments


def philox_rows(seed: int, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """``lorafusion.reference.philox_uint32`` for an arbitrary set of global row indices (int64 in [0, 2**32))."""
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & ref._MASK32, seed >> 32
    n = rows.numel()
    c0 = torch.arange(cols, dtype=torch.int64, device=rows.device).expand(n, cols).clone()
    c1 = rows.to(torch.int64).reshape(-1, 1).expand(n, cols).clone()
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = ref._mul_hi_lo(c2, ref._PHILOX_ROUND_B)
        hi_a, lo_a = ref._mul_hi_lo(c0, ref._PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + ref._PHILOX_KEY_A) & ref._MASK32
        k1 = (k1 + ref._PHILOX_KEY_B) & ref._MASK32
    return c0


def dropout_rows(x_rows: torch.Tensor, rows: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """Inverted dropout of ``x_rows`` (n x cols) whose rows are the microbatch rows ``rows``."""
    if p == 0.0:
        return x_rows
    keep = philox_rows(seed, rows, x_rows.shape[1]) >= ref.dropout_threshold(p)
    return torch.where(keep, x_rows / (1.0 - p), torch.zeros((), dtype=x_rows.dtype, device=x_rows.device))


def multi_lora_reference(x, weight, bias, adapters: dict, segments: AdapterSegments, seed: int = 0,
                         training: bool = True):
    """Whole-layer multi-adapter forward with autograd (run it in float64 and differentiate).

    ``adapters`` maps adapter name -> (lora_A, lora_B); adapters absent from ``segments`` are never read.
    ``training=False`` disables dropout (as the layers do in eval mode)."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] != segments.num_rows:
        raise ValueError(f"input has {x2d.shape[0]} rows but the layout has {segments.num_rows}")
    y = x2d @ weight.t()
    if bias is not None:
        y = y + bias
    for a in segments.present:
        name, spec = segments.names[a], segments.specs[a]
        A, B = adapters[name]
        rows = torch.as_tensor(segments.rows_of(name), device=x.device)
        p = spec.dropout if training else 0.0
        xd = dropout_rows(x2d[rows], rows, seed, p)
        y = y.index_add(0, rows, spec.scale * ((xd @ A.t()) @ B.t()))
    return y.reshape(*x.shape[:-1], weight.shape[0])
