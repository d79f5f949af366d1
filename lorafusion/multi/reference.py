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
    return ref.philox_uint32(seed, rows.numel(), cols, rows.device, row_ids=rows.reshape(-1))


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
