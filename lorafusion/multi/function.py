"""The multi-adapter LoRA linear as one autograd Function (math: ``lorafusion.multi.reference``)."""
from __future__ import annotations

import torch

from lorafusion.function import (autocast_off, cast_like_autocast, check_operands, draw_dropout_seed,
                                 refuse_double_backward)
from lorafusion.multi.backends import get_multi_backend
from lorafusion.multi.segments import AdapterSegments


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it already has it (host time: this runs per adapter, per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


class MultiLoRAFunction(torch.autograd.Function):
    """Y = X W^T + b + per row i of adapter a: s_a D_a(X)[i] A_a^T B_a^T. Saves X and the flat S, never D(X).

    ``adapter_params`` = (A_0, B_0, A_1, B_1, ...) of the layout's present adapters in slot order; adapters absent
    from the microbatch are not inputs, so they cost nothing and receive no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, tables, seed: int, dropout: bool, backend, *adapter_params):
        x2d = x.reshape(-1, x.shape[-1])
        As, Bs = adapter_params[0::2], adapter_params[1::2]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 input keeps float64 adapters
        A_cat = torch.cat([_as(a, acc) for a in As]) if As else x.new_zeros((0, x.shape[-1]), dtype=acc)
        Bt_cat = (torch.cat([_as(b.t(), acc) for b in Bs]).contiguous() if Bs
                  else x.new_zeros((0, weight.shape[0]), dtype=acc))
        y2d, S = backend.forward(x2d, weight, bias, A_cat, Bt_cat, tables, seed, dropout)
        ctx.save_for_backward(x, weight, A_cat, Bt_cat, S)
        ctx.tables, ctx.seed, ctx.dropout, ctx.backend = tables, seed, dropout, backend
        ctx.has_bias = bias is not None
        ctx.param_dtypes = [p.dtype for p in adapter_params]
        return y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("the multi-adapter LoRA layer")
        with autocast_off(dy.device.type):  # a backward run inside an autocast region
            return MultiLoRAFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, weight, A_cat, Bt_cat, S = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_params = ctx.needs_input_grad[7:]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        t = ctx.tables
        if any(need_params) or need_dx:
            dX, dA, dBt = ctx.backend.backward(dy2d, x2d, weight, A_cat, Bt_cat, S, t, ctx.seed, ctx.dropout, need_dx)
        else:
            dX = dA = dBt = None
        grads = []
        for k, (r, w_off, *_rest) in enumerate(t.slot_info):
            ga = _as(dA[w_off:w_off + r], ctx.param_dtypes[2 * k]) if need_params[2 * k] else None
            gb = _as(dBt[w_off:w_off + r].t(), ctx.param_dtypes[2 * k + 1]) if need_params[2 * k + 1] else None
            grads += [ga, gb]
        dx = dX.view(x.shape) if dX is not None else None
        dw = (dy2d.t() @ x2d).to(weight.dtype) if need_dw else None  # a trainable base stays correct
        db = dy2d.sum(0).to(weight.dtype) if (need_db and ctx.has_bias) else None
        return (dx, dw, db, None, None, None, None, *grads)


def multi_lora_linear(x, weight, bias, adapters: dict, segments: AdapterSegments, training: bool = True,
                      backend: str | None = None, seed: int | None = None):
    """Functional multi-adapter LoRA linear. ``adapters``: name -> (lora_A, lora_B) for (at least) every adapter
    present in ``segments``; ``training`` enables each adapter's dropout."""
    check_operands("multi_lora_linear", x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows != segments.num_rows:
        raise ValueError(f"input has {rows} rows but the segment layout has {segments.num_rows}")
    x, weight, bias, autocast = cast_like_autocast(x, weight, bias)
    mod = get_multi_backend(x.device.type, backend, x.dtype)
    dropout = bool(training and segments.any_dropout)
    if dropout and seed is None:
        seed = draw_dropout_seed(x.device)
    params = []
    n_out, n_in = weight.shape
    dev = x.device
    for (r, *_), name in zip(segments.slot_host, segments.present_names):  # slot order: present adapters
        pair = adapters.get(name)
        if pair is None:
            raise ValueError(f"adapter {name!r} has rows in the layout but no weights here")
        # the kernels slice the stacked factors by the layout's ranks: a factor of another rank would hand this
        # adapter's rows another adapter's weights
        try:
            A, B = pair
            ok = A.shape == (r, n_in) and B.shape == (n_out, r)
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in pair]
            raise ValueError(f"adapter {name!r} (rank {r} in the layout, on a {n_in} -> {n_out} linear) needs "
                             f"(lora_A, lora_B) of shapes {(r, n_in)} and {(n_out, r)}, got {got}")
        if A.device != dev or B.device != dev:
            raise ValueError(f"adapter {name!r}: its weights are on {A.device if A.device != dev else B.device} but "
                             f"the input is on {dev}")
        params += (A, B)
    with autocast_off(x.device.type, autocast):
        return MultiLoRAFunction.apply(x, weight, bias, segments.tables(x.device), int(seed or 0) & ((1 << 64) - 1),
                                       dropout, mod, *params)
