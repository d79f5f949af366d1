"""The three segmented primitives in plain torch (one loop over *present* adapters; the C++ / CUDA / Triton
versions implement the same signatures). See ``lorafusion.multi.segments`` for the flat-buffer layout.

    shrink(x, w_cat, t, seed, dropout, scaled)          flat[k] = [s_k] D?(x[rows_k]) w_k^T
    grad(l_flat, m, t, seed, dropout, scaled)           G[k]    = [s_k] l[k]^T D?(m[rows_k])
    expand_add_(out, l_flat, w_cat, t, seed, dropout, scaled)   out[rows_k] += [s_k] D'?(l[k] w_k)
"""
from __future__ import annotations

import torch

from lorafusion.multi.reference import dropout_rows
from lorafusion.reference import acc_dtype as _acc


def _rows(x, start, rows, n):
    return x[start:start + n] if start is not None else x.index_select(0, rows)


def shrink(x, w_cat, t, seed, dropout, scaled):
    acc = _acc(x.dtype)
    parts = []
    for r, w_off, _, scale, p, n, start, rows in t.slot_info:
        xk = _rows(x, start, rows, n).to(acc)
        if dropout:
            xk = dropout_rows(xk, rows, seed, p)
        sk = xk @ w_cat[w_off:w_off + r].to(acc).t()
        parts.append((sk * scale if scaled else sk).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=x.device)


def grad(l_flat, m, t, seed, dropout, scaled):
    acc = _acc(m.dtype)
    G = torch.zeros(t.total_rank, m.shape[1], dtype=acc, device=m.device)
    for r, w_off, f_off, scale, p, n, start, rows in t.slot_info:
        mk = _rows(m, start, rows, n).to(acc)
        if dropout:
            mk = dropout_rows(mk, rows, seed, p)
        lk = l_flat[f_off:f_off + n * r].view(n, r).to(acc)
        G[w_off:w_off + r] = lk.t() @ mk * (scale if scaled else 1.0)
    return G


def expand_add_(out, l_flat, w_cat, t, seed, dropout, scaled):
    acc = _acc(out.dtype)
    for r, w_off, f_off, scale, p, n, start, rows in t.slot_info:
        lk = l_flat[f_off:f_off + n * r].view(n, r).to(acc)
        term = lk @ w_cat[w_off:w_off + r].to(acc)
        if dropout:
            term = dropout_rows(term, rows, seed, p)
        if scaled:
            term = term * scale
        if start is not None:
            out[start:start + n] += term.to(out.dtype)
        else:
            out.index_add_(0, rows, term.to(out.dtype))
    return out
