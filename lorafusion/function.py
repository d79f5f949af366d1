"""The fused LoRA linear as one autograd Function over a chosen backend (math: ``lorafusion.reference``)."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

from lorafusion import compile_ops
from lorafusion.backends import gemm_placement, get_backend, resolve_backend_name
from lorafusion.reference import op_seed

_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


def draw_dropout_seed(device: torch.device) -> int:
    """A dropout seed from torch's generator for ``device``, so ``torch.manual_seed`` reproduces a run.

    On CUDA the seed comes from the device generator's (seed, offset) pair without a host sync: the offset is
    advanced as a dropout kernel would advance it."""
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return (gen.initial_seed() * _SEED_MIX + offset) & _SEED_MASK
    return int(torch.randint(0, _SEED_MASK, (1,), dtype=torch.int64).item())


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in on ``device_type`` now, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_off(device_type: str, on: bool | None = None):
    """A context that switches autocast off on ``device_type`` where it is on (``on``: whether it is, when the caller
    knows), else a no-op one: entering ``torch.autocast`` costs host time on every layer call."""
    if on is None:
        on = torch.is_autocast_enabled(device_type)
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def cast_like_autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x``, ``weight``, ``bias`` cast as ``torch.autocast`` casts ``nn.Linear``'s inputs (float64 left alone), and
    whether autocast is on. The fused Functions then run with autocast off, so every op inside them, and their
    backward, sees one dtype; the adapters stay in their own (usually fp32) dtype, as the backends allow."""
    dt = autocast_dtype(x.device.type)
    if dt is None:
        return x, weight, bias, False
    def cast(t):
        return t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
    return cast(x), cast(weight), cast(bias), True


def refuse_double_backward(layer: str) -> None:
    """Raise if a backward runs with grad mode on (``create_graph=True``): its result would be differentiated
    again, and the fused backward is not itself differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{layer}'s backward is a fused kernel and not itself differentiable, so gradients of its gradients "
            "(create_graph=True: gradient penalties, MAML, Hessian-vector products) are not supported; use plain "
            "PEFT LoRA layers for those (lorafusion.unpatch_peft)")


class FusedLoRAFunction(torch.autograd.Function):
    """Y = X W^T + b + scale * D(X) A^T B^T; saves X, S (T x r) and the seed, never D(X) or a mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, p: float, seed, backend):
        """``seed``, ``backend``: an int and a backend module (eager), or, traced by ``torch.compile``, a 0-d int64
        tensor and "name:placement" (the requested backend, '' for the default, and the Triton GEMM placement), run
        through the opaque ops of ``lorafusion.compile_ops``."""
        x2d = x.reshape(-1, x.shape[-1])
        if isinstance(backend, str):
            y2d, S = torch.ops.lorafusion.fused_linear_forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p,
                                                               backend)
            ctx.save_for_backward(x, weight, lora_A, lora_B, S, seed)
        else:
            y2d, S = backend.forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p)
            ctx.save_for_backward(x, weight, lora_A, lora_B, S)
        ctx.scale, ctx.p, ctx.backend = scale, p, backend
        ctx.seed = None if isinstance(backend, str) else seed  # traced: the saved tensor
        ctx.has_bias = bias is not None
        return y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("the fused LoRA layer")
        with autocast_off(dy.device.type):  # a backward run inside an autocast region
            return FusedLoRAFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, weight, lora_A, lora_B, S = ctx.saved_tensors[:5]
        need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        if isinstance(ctx.backend, str):  # traced (see forward)
            dX, dA, dB = torch.ops.lorafusion.fused_linear_backward(
                dy2d, x2d, weight, lora_A, lora_B, S, ctx.scale, ctx.saved_tensors[5], ctx.p, need_dx, ctx.backend)
            dX = dX if need_dx else None
        else:
            dX, dA, dB = ctx.backend.backward(
                dy2d, x2d, weight, lora_A, lora_B, S, ctx.scale, ctx.seed, ctx.p, need_dx
            )
        dx = dX.view(x.shape) if dX is not None else None
        # A trainable base is not the LoRA use case, but stays correct: plain torch for its gradients.
        dw = (dy2d.t() @ x2d).to(weight.dtype) if need_dw else None
        db = dy2d.sum(0) if (need_db and ctx.has_bias) else None
        da = dA.to(lora_A.dtype) if need_da else None
        dbb = dB.to(lora_B.dtype) if need_dbb else None
        return dx, dw, db, da, dbb, None, None, None, None


def _check_operands(x, weight, bias, lora_A, lora_B) -> None:
    """Shapes and devices, from host metadata only: the ops index raw pointers (and a tensor on another device
    reached the kernels of the input's device, or none: a meta A gave no error and no result on the cpu backend).
    A few microseconds: it runs on every call of every layer."""
    try:
        dev = x.device
        ok_dev = weight.device == dev and lora_A.device == dev and lora_B.device == dev and (
            bias is None or bias.device == dev)
        ws, As, Bs = weight.shape, lora_A.shape, lora_B.shape
        ok_shape = (len(ws) == 2 and len(As) == 2 and x.dim() >= 1 and x.shape[-1] == ws[1] == As[1]
                    and Bs == (ws[0], As[0]) and (bias is None or bias.shape == (ws[0],)))
    except AttributeError:  # not tensors
        ok_dev = ok_shape = False
    if ok_dev and ok_shape:
        return
    check_operands("fused_lora_linear", x, weight, bias, {"lora_A": lora_A, "lora_B": lora_B})
    raise ValueError(f"fused_lora_linear: shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                     f"(out x in), bias {None if bias is None else tuple(bias.shape)}, lora_A "
                     f"{tuple(lora_A.shape)} (r x in), lora_B {tuple(lora_B.shape)} (out x r)")


def check_operands(op: str, x, weight, bias, others: dict | None = None) -> None:
    """The checks shared by the single- and multi-adapter ops: ``x``, ``weight``, ``bias`` (optional) and the
    ``others`` (name -> tensor) are tensors on the input's device, and x (..., in) / weight (out, in) / bias (out,)
    chain. A TypeError / ValueError naming ``op``, the operand and its device or shape."""
    named = (("x", x), ("weight", weight), ("bias", bias), *(others or {}).items())
    for name, t in named:
        if (t is not None or name != "bias") and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in named[1:]:
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or (
            bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{op}: shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                         f"(out x in), bias {None if bias is None else tuple(bias.shape)}")


def fused_lora_linear(x, weight, bias, lora_A, lora_B, scale: float, p: float = 0.0, backend: str | None = None,
                      seed: int | None = None):
    """Functional fused LoRA linear. ``p`` is the dropout probability to apply now (0 in eval).

    Traced by ``torch.compile`` the seed is drawn by an op in the graph (the same draw, in the same order, as eager)
    and the backend, chosen when the compiled code runs as in eager, runs inside opaque ops
    (``lorafusion.compile_ops``), so nothing breaks the graph. The Triton GEMM placement (``gemm_placement``) is
    read when the graph is traced and stays fixed in it."""
    # the backends disagreed on a bad p (the reference scaled by 1 / (1 - p) for p < 0 and returned the base alone
    # for p >= 1; the C++ ops raised): every backend now gets the same clear error (a symbolic float, traced
    # unspecialised, is checked by no one here: its value is not known until the graph runs)
    if not isinstance(p, torch.SymFloat) and (isinstance(p, bool) or not isinstance(p, numbers.Real)
                                              or not 0.0 <= p < 1.0):
        raise ValueError(f"fused_lora_linear: dropout p must be a number in [0, 1), got {p!r}")
    if not isinstance(scale, torch.SymFloat) and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                                                  or not math.isfinite(scale)):
        raise ValueError(f"fused_lora_linear: scale must be a finite number, got {scale!r}")
    _check_operands(x, weight, bias, lora_A, lora_B)
    if torch.compiler.is_compiling():
        # "name:placement": the requested backend ('' for the default choice) and the Triton GEMM placement, read
        # once here so the forward and backward ops resolve the same one
        try:
            placement = gemm_placement()
        except ValueError:  # a bad value matters only where the Triton backend is chosen: the op reads it again
            placement = ""
        mod = (resolve_backend_name(backend) if backend is not None else "") + ":" + placement
        if seed is not None:  # a caller's fixed seed
            seed = torch.tensor(op_seed(seed), dtype=torch.int64)
        elif p > 0.0:
            seed = torch.ops.lorafusion.draw_dropout_seed(x, compile_ops.DRAW_STATE)
        else:
            seed = torch.zeros((), dtype=torch.int64)
    else:
        mod = get_backend(x.device.type, backend)
        if p > 0.0 and seed is None:
            seed = draw_dropout_seed(x.device)
        seed = int(seed or 0)
    x, weight, bias, autocast = cast_like_autocast(x, weight, bias)
    with autocast_off(x.device.type, autocast):
        return FusedLoRAFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), float(p), seed, mod)
