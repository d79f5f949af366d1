"""CUDA backend: the ``torch.ops.lorafusion`` composite ops on CUDA tensors, cuBLAS for the two large GEMMs and the
CUDA kernels of csrc/lora_cuda.cu for the memory-bound rank-r work. The contract is in ``lorafusion.backends``.
The ops dispatch on the tensors' device, so forward / backward are the CPU backend's calls."""
from __future__ import annotations

import torch

from lorafusion import _ext
from lorafusion.backends.cpu_backend import backward, forward  # noqa: F401  (same ops, CUDA kernels)

DEVICE_TYPES = ("cuda",)
NAME = "cuda"


def unavailable_reason() -> str | None:
    if not _ext.EXTENSION_AVAILABLE:
        return _ext.EXTENSION_ERROR
    if not _ext.HAS_CUDA_KERNELS:
        return "lorafusion._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None
