"""Backends of the multi-adapter layer. Each composes the shared frozen GEMM (torch / cuBLAS / MKL, or a Triton
GEMM with the segmented rank-r term in its epilogue) with the three segmented primitives of
``lorafusion.multi.torch_ops`` (plain torch), ``lorafusion.multi.ops`` (C++ / CUDA) or
``lorafusion.multi.triton_kernels`` (Triton).

    forward(x2d, weight, bias, A_cat, Bt_cat, t, seed, dropout) -> (Y, S_flat)
    backward(dy2d, x2d, weight, A_cat, Bt_cat, S_flat, t, seed, dropout, need_dx) -> (dX | None, dA_cat, dBt_cat)

A_cat (sum r x in) and Bt_cat (sum r x out) hold the present adapters' A and B^T in slot order (float32); dA_cat and
dBt_cat are float32. Names and the selection rule follow ``lorafusion.backends`` (argument or $LORAFUSION_BACKEND:
triton / cuda / cpu / reference; auto = fastest available), logged once per choice.
"""
from __future__ import annotations

import logging
import os

import torch

from lorafusion.backends import _label, _log_once, _module_key, resolve_backend_name
from lorafusion.backends import use_gemm_placement  # noqa: F401  (re-exported for the multi-adapter API)


class SegmentedBackend:
    """``gemm``: the big GEMM with the rank-r term in its epilogue (Triton). ``term``: instead, a kernel that writes
    [bias +] the rank-r term alone, which torch's GEMM (cuBLAS / MKL) then adds its product onto (beta = 1): one
    more write and read of Y / dX than ``gemm``, in exchange for the vendor GEMM. Neither: torch's GEMM first, then
    ``prims.expand_add_`` reads and writes its output again."""

    def __init__(self, name: str, prims, gemm=None, term=None):
        self.name, self.prims, self.gemm, self.term = name, prims, gemm, term

    def forward(self, x2d, weight, bias, A_cat, Bt_cat, t, seed, dropout):
        S = self.prims.shrink(x2d, A_cat, t, seed, dropout, False)
        if self.gemm is not None:  # Y = X W^T + b + s S B^T in one GEMM
            return self.gemm(x2d, weight, bias, S, Bt_cat, t, seed, False, True, True), S
        if self.term is not None:  # Y = (b + s S B^T) + X W^T, the GEMM adding onto the stored term
            return self.term(x2d, bias, S, Bt_cat, t, seed, False, True).addmm_(x2d, weight.t()), S
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        self.prims.expand_add_(y, S, Bt_cat, t, seed, False, True)
        return y, S

    def backward(self, dy2d, x2d, weight, A_cat, Bt_cat, S, t, seed, dropout, need_dx):
        dS = self.prims.shrink(dy2d, Bt_cat, t, seed, False, True)
        dBt = self.prims.grad(S, dy2d, t, seed, False, True)
        fused = getattr(self.prims, "grad_a_expand_dx_", None)
        if need_dx and fused is not None and self.gemm is None and x2d.device.type == "cpu":
            # dA and the masked rank-r term of dX share one pass over the mask; the term is stored first and the
            # dY W GEMM adds on top of it (beta = 1), so dX is not read and written again after the GEMM.
            dX = dy2d.new_empty((dy2d.shape[0], weight.shape[1]))
            dA = fused(dX, dS, x2d, A_cat, t, seed, dropout, False)
            return dX.addmm_(dy2d, weight), dA, dBt
        dA = self.prims.grad(dS, x2d, t, seed, dropout, False)
        dX = None
        if need_dx:
            if self.gemm is not None:  # dX = dY W + D'(dS A) in one GEMM
                dX = self.gemm(dy2d, weight, None, dS, A_cat, t, seed, dropout, False, False)
            elif self.term is not None:  # dX = D'(dS A) + dY W, the GEMM adding onto the stored term
                dX = self.term(dy2d, None, dS, A_cat, t, seed, dropout, False).addmm_(dy2d, weight)
            else:
                dX = dy2d @ weight
                self.prims.expand_add_(dX, dS, A_cat, t, seed, dropout, False)
        return dX, dA, dBt


def _reference():
    from lorafusion.multi import torch_ops

    return SegmentedBackend("reference", torch_ops)


def _cpu():
    from lorafusion.multi import ops

    reason = ops.cpp_ops_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return SegmentedBackend("cpu", ops)


def _cuda():
    from lorafusion.multi import ops

    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    if not ops.cuda_ops_available():
        raise RuntimeError(ops.cpp_ops_reason() or "multi_lora ops have no CUDA kernels (built without nvcc?)")
    return SegmentedBackend("cuda", ops)


def _triton(placement="fused"):
    from lorafusion.multi import triton_kernels

    reason = triton_kernels.unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if placement == "blas":
        return SegmentedBackend("triton", triton_kernels, term=triton_kernels.segmented_term)
    return SegmentedBackend("triton", triton_kernels, triton_kernels.segmented_gemm)


_FACTORIES = {"reference": _reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton,
              "triton+blas": lambda: _triton("blas")}
_DEVICES = {"reference": ("cpu", "cuda"), "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
_cache: dict[str, object] = {}


def _load(name):
    key = _module_key(name)  # the Triton backend's depends on the GEMM placement
    if key not in _cache:
        try:
            _cache[key] = _FACTORIES[key]()
        except Exception as exc:
            _cache[key] = exc
    return _cache[key]


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def get_multi_backend(device_type: str, requested: str | None = None, dtype: torch.dtype | None = None):
    """The multi-adapter backend for ``device_type``; an explicit request that cannot run raises. The Triton
    backend's GEMM placement follows ``lorafusion.backends.gemm_placement()`` ($LORAFUSION_TRITON_GEMM)."""
    name = resolve_backend_name(requested)
    if name == "triton" and dtype is not None and dtype not in _KERNEL_DTYPES:
        # the kernels take 16/32-bit operands (float64 took their tensor-core path and came back uninitialised), as
        # the single-adapter Triton backend does; float64 is the reference backend's (what 'auto' picks for it)
        raise TypeError(f"multi-adapter backend 'triton' takes float32, float16 or bfloat16 input, got {dtype} "
                        "(float64 runs on the reference backend: backend='reference' or 'auto')")
    if name == "triton" and device_type == "cpu":
        # Triton on CPU tensors only runs under the interpreter (tests): allowed when TRITON_INTERPRET=1.
        if os.environ.get("TRITON_INTERPRET") == "1":
            mod = _load("triton")
            if isinstance(mod, Exception):
                raise RuntimeError(f"backend 'triton' was requested but is unavailable: {mod}")
            return mod
    if name != "auto":
        mod = _load(name)
        if isinstance(mod, Exception):
            raise RuntimeError(f"multi-adapter backend {name!r} was requested but is unavailable: {mod}")
        if device_type not in _DEVICES[name]:
            raise RuntimeError(f"multi-adapter backend {name!r} does not run on device type {device_type!r}")
        label = _label(_module_key(name))
        _log_once(("multi", device_type, label), "lorafusion.multi: %s backend on %s (requested)", label, device_type)
        return mod
    if dtype == torch.float64:  # the kernels accumulate in float32; float64 is the reference's job
        order = ("reference",)
    else:
        order = ("triton", "cuda", "reference") if device_type == "cuda" else ("cpu", "reference")
    skipped = []
    for cand in order:
        mod = _load(cand)
        if not isinstance(mod, Exception) and device_type in _DEVICES[cand]:
            why = "fastest available" if not skipped else "; ".join(skipped)
            label = _label(_module_key(cand))
            _log_once(("multi", device_type, label, why), "lorafusion.multi: %s backend on %s (%s)", label,
                      device_type, why, level=logging.WARNING if skipped else logging.INFO)  # a fallback: loud
            return mod
        skipped.append(f"{cand} skipped: {mod}")
    raise RuntimeError(f"no multi-adapter backend runs on {device_type!r}: {'; '.join(skipped)}")
