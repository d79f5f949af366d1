"""Loads the compiled extension ``lorafusion._C`` (the ``torch.ops.lorafusion`` ops) and registers their fake (meta)
implementations so ``torch.compile`` can trace them.

``EXTENSION_AVAILABLE`` says whether the ops are loaded; ``EXTENSION_ERROR`` holds the reason when not.
``HAS_CUDA_KERNELS`` says whether the build carries the CUDA kernels. Importing this module never raises.
"""
from __future__ import annotations

import logging

import torch

from lorafusion.reference import acc_dtype as _acc_dtype

logger = logging.getLogger("lorafusion")

EXTENSION_AVAILABLE = False
EXTENSION_ERROR: str | None = None
HAS_CUDA_KERNELS = False

try:
    import lorafusion._C  # noqa: F401  (loading the library registers the ops)

    EXTENSION_AVAILABLE = True
except Exception as exc:  # not built (pure-Python install) or built against another torch
    EXTENSION_ERROR = f"lorafusion._C could not be loaded ({type(exc).__name__}: {exc}); build it with `pip install -e .`"
    logger.warning("lorafusion: C++/CUDA extension unavailable, the cpu and cuda backends are off: %s",
                   EXTENSION_ERROR)


if EXTENSION_AVAILABLE:
    HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("lorafusion::lora_shrink", "CUDA")

    @torch.library.register_fake("lorafusion::dropout_keep_mask")
    def _dropout_keep_mask_fake(x, seed, p):
        return x.new_empty(x.shape, dtype=torch.bool)

    @torch.library.register_fake("lorafusion::lora_shrink")
    def _lora_shrink_fake(x, A, seed, p):
        torch._check(A.shape[1] == x.shape[1])
        return x.new_empty((x.shape[0], A.shape[0]), dtype=_acc_dtype(x.dtype))

    @torch.library.register_fake("lorafusion::lora_dy_shrink")
    def _lora_dy_shrink_fake(dy, B, S, scale):
        acc = _acc_dtype(dy.dtype)
        return dy.new_empty((dy.shape[0], B.shape[1]), dtype=acc), dy.new_empty((dy.shape[1], B.shape[1]), dtype=acc)

    @torch.library.register_fake("lorafusion::lora_dropout_grad_A")
    def _lora_dropout_grad_A_fake(x, dS, seed, p):
        return x.new_empty((dS.shape[1], x.shape[1]), dtype=_acc_dtype(x.dtype))

    @torch.library.register_fake("lorafusion::lora_dropout_expand_add_")
    def _lora_dropout_expand_add_fake(dx, dS, A, seed, p):
        return None

    @torch.library.register_fake("lorafusion::lora_linear_forward")
    def _lora_linear_forward_fake(x, W, b, A, B, scale, seed, p):
        y = x.new_empty((x.shape[0], W.shape[0]))
        return y, x.new_empty((x.shape[0], A.shape[0]), dtype=_acc_dtype(x.dtype))

    @torch.library.register_fake("lorafusion::lora_linear_backward")
    def _lora_linear_backward_fake(dy, x, W, A, B, S, scale, seed, p, need_dx):
        acc = _acc_dtype(x.dtype)
        dx = dy.new_empty((x.shape[0], x.shape[1])) if need_dx else None
        return dx, x.new_empty((A.shape[0], A.shape[1]), dtype=acc), x.new_empty((B.shape[0], B.shape[1]), dtype=acc)
