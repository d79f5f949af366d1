"""``MultiLoRALinear``: many LoRA adapters over one frozen ``nn.Linear``; each row of a microbatch uses its own adapter.

    layer = MultiLoRALinear(nn.Linear(1024, 1024))
    layer.add_adapter("job_a", r=8, alpha=16, dropout=0.1)
    layer.add_adapter("job_b", r=64, alpha=64)
    seg = layer.make_segments(["job_a"] * 100 + ["job_b"] * 28)       # one entry per row; None = base only
    y = layer(x, segments=seg)                                         # x: (128, 1024) or (B, L, 1024)

Row i of adapter a:  y_i = x_i W^T + b + s_a * D_a(x)_i A_a^T B_a^T   (math: ``lorafusion.multi.reference``).
Each adapter's A and B are their own ``nn.Parameter`` (``lora_A[name]``, ``lora_B[name]``), so optimizer state is
keyed per adapter and adding / removing one never touches another's parameters or state. An adapter without rows
in a microbatch is not part of its graph: no compute, no gradient.
"""
from __future__ import annotations

import contextvars
import math
import re

import torch
from torch import nn

from lorafusion.layer import check_float_base, check_input, check_lora_args
from lorafusion.multi.function import multi_lora_linear
from lorafusion.multi.segments import AdapterSegments, AdapterSpec, SequenceLayouts

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

# The layouts of the forwards running in this context (thread, or asyncio task): layer -> layout, set by
# MultiLoRAModel for the duration of one forward. A context variable rather than an attribute of the layers, which
# are shared: two threads running forwards on one model (a serving loop) each see their own layouts.
ACTIVE_LAYOUTS: contextvars.ContextVar = contextvars.ContextVar("lorafusion_multi_layouts", default=None)


def active_layout(layer: nn.Module):
    """The layout ``layer`` uses in the forwards of this context, or None outside ``MultiLoRAModel`` ones."""
    layouts = ACTIVE_LAYOUTS.get()
    return None if layouts is None else layouts.get(layer)


# Adapter names become keys of nn.ParameterDict, which stores each entry as an attribute: a name that is already
# one of its attributes (half, train, cuda, state_dict, ...) cannot be stored.
_RESERVED = frozenset(dir(nn.ParameterDict()))


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be a non-empty identifier-like string (letters, digits, _ or -)")
    if name in _RESERVED:
        raise ValueError(f"adapter name {name!r} is taken by an attribute of torch's nn.ParameterDict (which holds "
                         "the adapters); pick another name")


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, backend: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        check_float_base("MultiLoRALinear", base)
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapter_specs: dict[str, AdapterSpec] = {}
        self.backend = backend

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> None:
        """Add adapter ``name`` (PEFT init: A Kaiming-uniform, B zero). Other adapters are untouched. ``dtype``:
        the base weight's, or float32 over a float16 / bfloat16 base. ``generator``: a CPU generator A is drawn
        from (on the CPU, then moved to the weight's device, so the draw is the same on every device); without
        one, A is drawn on the weight's device from torch's default generator there. Over a base on the meta
        device (a model skeleton) nothing is drawn."""
        check_adapter_name(name)
        if name in self.adapter_specs:
            raise ValueError(f"duplicate adapter name {name!r}: this layer already holds it")
        check_lora_args(f"MultiLoRALinear adapter {name!r}", self.in_features, self.out_features, r, alpha, dropout,
                        rank_within_shape=False)
        spec = AdapterSpec(r, float(alpha), float(dropout), bool(use_rslora))  # also bounds r by MAX_RANK
        w = self.base.weight
        # fp32 adapters over a half-precision base, as PEFT keeps them: bf16 / fp16 adapters lose small updates
        dtype = dtype or (torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)
        if generator is not None and w.device.type != "meta":
            if generator.device.type != "cpu":
                raise ValueError(f"MultiLoRALinear adapter {name!r}: generator must be a CPU generator, got one on "
                                 f"{generator.device}")
            A = torch.empty(r, self.in_features, dtype=dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            A = A.to(w.device)
        else:
            A = torch.empty(r, self.in_features, device=w.device, dtype=dtype)
            if w.device.type != "meta":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, r, device=w.device, dtype=dtype)  # both allocated before either is added
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.adapter_specs[name] = spec

    def remove_adapter(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """Remove adapter ``name``; returns its (A, B) so a caller can drop them from an optimizer."""
        if name not in self.adapter_specs:
            raise ValueError(f"unknown adapter {name!r} (held: {list(self.adapter_specs)})")
        del self.adapter_specs[name]
        return self.lora_A.pop(name), self.lora_B.pop(name)

    def adapter_params(self, name: str | None = None) -> dict[str, nn.Parameter]:
        names = self.adapter_specs if name is None else [name]
        out = {}
        for n in names:
            out[f"lora_A.{n}"] = self.lora_A[n]
            out[f"lora_B.{n}"] = self.lora_B[n]
        return out

    def make_segments(self, row_adapters) -> AdapterSegments:
        """The layout for a microbatch whose rows use ``row_adapters`` (names / indices into this layer's adapters)."""
        return AdapterSegments(row_adapters, self.adapter_specs)

    def forward(self, x: torch.Tensor, segments: AdapterSegments | SequenceLayouts | None = None) -> torch.Tensor:
        seg = segments if segments is not None else active_layout(self)
        if seg is None:
            raise ValueError("MultiLoRALinear: no segment layout; pass segments= or run inside "
                             "MultiLoRAModel.use_segments(...) / use_sequence_adapters(...)")
        if isinstance(seg, SequenceLayouts):  # one adapter per sequence: the layout of this input's shape
            try:
                seg = seg.layout(x.shape).restricted(self.adapter_specs)
            except ValueError as err:
                raise ValueError(f"MultiLoRALinear(in={self.in_features}, out={self.out_features}): {err}") from None
        if not isinstance(seg, AdapterSegments):
            raise TypeError(f"segments must be an AdapterSegments or SequenceLayouts, got {type(seg).__name__}")
        if seg.sequences is not None and x.dim() == 3:
            n, per = seg.sequences
            if tuple(x.shape[:2]) not in ((n, per), (per, n)):  # as many rows, cut into other sequences
                raise ValueError(f"MultiLoRALinear(in={self.in_features}, out={self.out_features}): the layout is "
                                 f"per sequence, {n} sequences x {per} tokens, but the input is "
                                 f"{tuple(x.shape[:2])} (sequences x tokens, or tokens x sequences time-first)")
            if n != per and x.shape[0] == per and x.shape[1] == n:  # a per-sequence layout on a time-first input
                seg = seg.time_major()
        check_input("MultiLoRALinear", x, self.base.weight)
        rows = x.numel() // x.shape[-1]
        if rows != seg.num_rows:
            raise ValueError(f"MultiLoRALinear: input has {rows} rows but the segment layout has {seg.num_rows}")
        adapters = {}
        for name in seg.present_names:
            spec = self.adapter_specs.get(name)
            if spec is None:
                raise ValueError(f"MultiLoRALinear: layout names adapter {name!r} which this layer does not hold "
                                 f"(held: {list(self.adapter_specs)})")
            if spec != seg.specs[seg.names.index(name)]:
                raise ValueError(f"MultiLoRALinear: adapter {name!r} is {spec} here but "
                                 f"{seg.specs[seg.names.index(name)]} in the layout")
            adapters[name] = (self.lora_A[name], self.lora_B[name])
        return multi_lora_linear(x, self.base.weight, self.base.bias, adapters, seg, training=self.training,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        specs = ", ".join(f"{n}(r={s.r}, alpha={s.alpha:g}, p={s.dropout:g})" for n, s in self.adapter_specs.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{specs}]"
