"""The fused LoRA linear as ``torch.compile`` sees it: three opaque custom ops, so a compiled model traces the layer
without graph breaks, dropout included.

Eager calls never come here (``lorafusion.function`` takes this path only while ``torch.compiler.is_compiling()``).
Traced, two things would break the graph: the dropout seed is a Python int drawn from torch's generator (a
``.item()`` on CPU, the generator's offset on CUDA), and the backends launch kernels with it. Here:

* ``lorafusion::draw_dropout_seed(x, state)`` draws the seed exactly as the eager layer does and returns it as a
  0-d int64 CPU tensor. It mutates ``state`` (a counter), which keeps every draw in the graph, in program order: an
  op without that side effect was merged by the compiler's common-subexpression pass when two layers read the same
  input (q / k / v projections), giving them one mask.
* ``lorafusion::fused_linear_forward`` / ``fused_linear_backward`` run a backend's forward / backward with the seed
  read from that tensor (a host read, no device sync), and have fake implementations with the contract's shapes and
  dtypes.

So a compiled model draws the same seeds in the same order as the eager one, and its masks are the same
(``tests/lorafusion/test_compile.py``).
"""
from __future__ import annotations

import torch

from lorafusion.backends import get_backend
from lorafusion.reference import acc_dtype as _acc_dtype  # S, dA, dB: float64 for float64 input, else float32

# The draws' ordering token: each draw increments it (see the module docstring). Lives on CPU, never read.
DRAW_STATE = torch.zeros(1, dtype=torch.int64)


def _backend(x: torch.Tensor, backend: str):
    """``backend``: "name:placement" (see ``fused_lora_linear``); an empty name or placement is the default."""
    name, _, placement = backend.partition(":")
    return get_backend(x.device.type, name or None, placement or None)


@torch.library.custom_op("lorafusion::draw_dropout_seed", mutates_args=("state",))
def draw_dropout_seed_op(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A dropout seed for ``x``'s device, from torch's generator (``lorafusion.function.draw_dropout_seed``)."""
    from lorafusion.function import draw_dropout_seed

    state.add_(1)
    return torch.tensor(draw_dropout_seed(x.device), dtype=torch.int64)


@draw_dropout_seed_op.register_fake
def _(x, state):
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("lorafusion::fused_linear_forward", mutates_args=())
def fused_linear_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                         lora_B: torch.Tensor, scale: float, seed: torch.Tensor, p: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S) of the backend contract; ``backend`` is "name:placement" (see ``_backend``)."""
    y, S = _backend(x2d, backend).forward(x2d, weight, bias, lora_A, lora_B, scale, int(seed.item()), p)
    return y.contiguous(), S.to(_acc_dtype(x2d.dtype)).contiguous()


@fused_linear_forward.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scale, seed, p, backend):
    return (x2d.new_empty(x2d.shape[0], weight.shape[0]),
            x2d.new_empty(x2d.shape[0], lora_A.shape[0], dtype=_acc_dtype(x2d.dtype)))


@torch.library.custom_op("lorafusion::fused_linear_backward", mutates_args=())
def fused_linear_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, S: torch.Tensor, scale: float, seed: torch.Tensor, p: float,
                          need_dx: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dA, dB) of the backend contract; dX is an empty tensor when ``need_dx`` is False (an op cannot return
    None)."""
    dX, dA, dB = _backend(x2d, backend).backward(dy2d, x2d, weight, lora_A, lora_B, S, scale, int(seed.item()), p,
                                                 need_dx)
    acc = _acc_dtype(x2d.dtype)
    dX = dX.contiguous() if dX is not None else dy2d.new_empty(0)
    return dX, dA.to(acc).contiguous(), dB.to(acc).contiguous()


@fused_linear_backward.register_fake
def _(dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx, backend):
    acc = _acc_dtype(x2d.dtype)
    dX = dy2d.new_empty(x2d.shape) if need_dx else dy2d.new_empty(0)
    return dX, x2d.new_empty(lora_A.shape, dtype=acc), x2d.new_empty(lora_B.shape, dtype=acc)
