"""The Triton backend with the two big GEMMs left to torch (cuBLAS on a GPU): ``LORAFUSION_TRITON_GEMM=blas``.

Forward: S = D(X) A^T by the Triton shrink kernel; the Triton GEMM kernel over an empty reduction (K = 0) stores
Y = b + s S B^T; then ``Y.addmm_(X, W^T)`` adds the product on top (beta = 1). Backward: dS, dB and dA (with the
mask) by the Triton kernels, as ``triton_backend``; the dX kernel over an empty reduction stores D'(dS A) from the
mask grad_A wrote; then ``dX.addmm_(dY, W)``. Against the fused placement this is one more write and read of Y and
of dX, in exchange for the vendor GEMM. In fp16 / bf16 the stored term is rounded to the output dtype once before
the GEMM adds onto it. Same contract as ``lorafusion.backends``.
"""
from __future__ import annotations

from lorafusion.backends import triton_backend as tb

NAME = "triton"
DEVICE_TYPES = tb.DEVICE_TYPES


def unavailable_reason() -> str | None:
    return tb.unavailable_reason()


def forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p):
    """(Y, S) as ``triton_backend.forward``."""
    tb._check("weight", weight)
    if weight.shape[1] != x2d.shape[1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({weight.shape[0]}, {x2d.shape[1]})")
    S = tb.lora_shrink(x2d, lora_A, seed, p)
    # K = 0: the kernel's main loop runs no step and never loads x or W; the views only give it rows and columns
    Y = tb.lora_expand_forward(x2d[:, :0], weight[:, :0], bias, S, lora_B, scale)
    return Y.addmm_(x2d, weight.t()), S


def _dx_gemm(dy2d, weight, dS, lora_A, bits, p):
    """dX = D'(dS A) + dY W: the dX kernel over an empty reduction (N = 0) stores the term, cuBLAS adds dY W."""
    if tuple(weight.shape) != (dy2d.shape[1], lora_A.shape[1]):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({dy2d.shape[1]}, {lora_A.shape[1]})")
    return tb._expand_backward(dy2d[:, :0], weight[:0], dS, lora_A, bits, p).addmm_(dy2d, weight)


def backward(dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx):
    """(dX or None, dA, dB) as ``triton_backend.backward``, with the dX GEMM above."""
    return tb.backward_with(_dx_gemm, dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx)
