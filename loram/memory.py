"""What pruning (and 4-bit quantization) does to the base model's weight memory, from a config alone.

Models are instantiated on the meta device, so a 70B config costs nothing. NF4 as ``lorafusion train
--model.quantization nf4`` loads it (QLoRA's recipe, bitsandbytes): the decoder layers' linear weights take 4 bits
each plus the double-quantized block constants (an 8-bit absmax per 64 weights and a float32 per 256 of those:
4 + 8/64 + 32/(64*256) bits); embeddings, norms, biases and the LM head stay in the run's precision
(``train.precision``: ``precision`` here, bf16 by default).
"""
from __future__ import annotations

import torch

from loram.prune import PruneError

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _counts(config) -> tuple[int, int]:
    """(parameters in the decoder layers' linear weights, all other parameters) of a model LoRAM can prune."""
    from loram.prune import _layers, meta_model

    try:
        model = meta_model(config)
    except ValueError as exc:  # transformers: no causal LM class for this config
        raise PruneError(f"model: a {type(config).__name__} is not a causal LM config LoRAM prunes "
                         f"({str(exc).splitlines()[0]})") from None
    _layers(model)  # the estimate is for models loram prune takes
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}.")
    return linear, sum(p.numel() for p in model.parameters()) - linear


def estimate(config, keep_ratio: float, attn_keep_ratio: float | None = None, channel_multiple: int = 1,
             precision: str = "bf16") -> dict:
    """Parameters and weight memory (GiB) of the full and the pruned model, in 16 bits and in NF4 (the parameters
    NF4 leaves alone in ``precision``); the pruned model keeps what :func:`loram.prune.make_plan` keeps for these
    ratios."""
    from loram.prune import _check_ratios, kept_counts, pruned_config

    if precision not in PRECISION_BYTES:
        raise PruneError(f"precision must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    if not hasattr(config, "intermediate_size") or not hasattr(config, "num_attention_heads"):
        raise PruneError(f"config: {type(config).__name__} is not a Llama-family config")
    _check_ratios(keep_ratio, attn_keep_ratio, channel_multiple)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_kept, ch_kept = kept_counts(kv, config.intermediate_size, keep_ratio, attn_keep_ratio, channel_multiple)
    out = {"precision": precision, "kept_kv_heads": kv_kept, "kv_heads": kv, "kept_channels": ch_kept,
           "channels": config.intermediate_size}
    for name, cfg in (("full", config), ("pruned", pruned_config(config, kv_kept, ch_kept))):
        linear, other = _counts(cfg)
        out[name] = {"parameters": linear + other,
                     "gib_16bit": (linear + other) * 2 / 2**30,
                     "gib_nf4": (linear * NF4_BITS / 8 + other * PRECISION_BYTES[precision]) / 2**30}
    out["reduction_16bit_to_pruned_nf4"] = out["full"]["gib_16bit"] / out["pruned"]["gib_nf4"]
    return out
