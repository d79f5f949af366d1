"""Suite-wide setup: without a CUDA device, Triton kernels run under the interpreter on CPU tensors.

Set before any test module imports triton (the interpreter is chosen when a kernel is decorated)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
