"""lorafusion: fused LoRA kernels and the layers, PEFT integration and training entry point built on them.

    from lorafusion import FusedLoRALinear, patch_peft
    layer = FusedLoRALinear(nn.Linear(4096, 4096), r=16, alpha=32, dropout=0.1)
    patch_peft(peft_model)          # PEFT's LoRA Linear layers run fused; adapter files stay standard
"""
from __future__ import annotations

from lorafusion.backends import available_backends, get_backend
from lorafusion.function import FusedLoRAFunction, fused_lora_linear
from lorafusion.layer import FusedLoRALinear

__version__ = "0.1.0"
__all__ = [
    "FusedLoRALinear", "FusedLoRAFunction", "fused_lora_linear", "available_backends", "get_backend",
    "patch_peft", "unpatch_peft", "fused_lora_config", "FusedPeftLoraLinear",
]

# No NullHandler on the "lorafusion" logger: with no logging set up, Python's last-resort handler prints its
# warnings (a fallback to a slower backend, a missing extension, truncated training samples) to stderr, once each;
# info lines (which backend runs and why) show with logging.basicConfig(level=logging.INFO).


def __getattr__(name):  # PEFT is imported only when its integration is used
    if name in ("patch_peft", "unpatch_peft", "fused_lora_config", "FusedPeftLoraLinear"):
        from lorafusion import peft_integration

        return getattr(peft_integration, name)
    if name == "MultiLoRALinear":
        from lorafusion.multi import MultiLoRALinear

        return MultiLoRALinear
    raise AttributeError(f"module 'lorafusion' has no attribute {name!r}")
