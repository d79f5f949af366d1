"""Structured pruning of a Llama-family causal LM for LoRAM ("train small, infer large").

The prunable structures of a decoder layer are
- an attention **KV group**: one key/value head and the ``n_rep`` query heads that read it (rows of ``q_proj``,
  ``k_proj``, ``v_proj``, and their bias entries where there is one; the matching columns of ``o_proj``);
- an MLP **channel** ``j``: row ``j`` of ``gate_proj`` and ``up_proj``, column ``j`` of ``down_proj``.

Every layer keeps the same number of KV groups and of channels (which ones differs per layer), so the pruned model
is an ordinary Hugging Face model of the same architecture with smaller ``num_attention_heads``,
``num_key_value_heads`` and ``intermediate_size``: any trainer (``lorafusion train`` included) loads and trains it.
Removing a KV group or a channel is exact: the pruned model computes what the full model computes with those
heads' ``o_proj`` columns and those channels' ``down_proj`` columns set to zero (``tests/loram`` checks it).

Importance (which structures stay):
- ``"taylor"`` (default; LLM-Pruner's first-order estimate): ``|sum over the structure's weights of w * dL/dw|`` on
  calibration batches, the first-order change of the loss when the structure is removed;
- ``"magnitude"``: the L2 norm of the structure's weights (no data needed).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

PLAN_FILE = "loram_plan.json"
PLAN_FORMAT = "loram.plan/1"
IMPORTANCE = ("taylor", "magnitude")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class PruneError(ValueError):
    """A model, plan or argument LoRAM cannot prune or recover; the message names the argument and the value."""


@dataclass(frozen=True)
class PrunePlan:
    """Which structures of each decoder layer the pruned model keeps, and the full model's sizes.

    ``kv_groups[i]`` / ``channels[i]``: the kept KV-group and MLP-channel indices of layer ``i`` (ascending).
    """

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    kv_groups: tuple[tuple[int, ...], ...]
    channels: tuple[tuple[int, ...], ...]
    importance: str = "magnitude"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PruneError(f"plan {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PruneError(f"plan num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        for name in ("kv_groups", "channels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(k, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in k)
                    for k in value):
                raise PruneError(f"plan {name} must be a list (one per layer) of lists of integer indices, "
                                 f"got {value!r:.200}")
            object.__setattr__(self, name, tuple(tuple(k) for k in value))
        for name, kept, full in (("kv_groups", self.kv_groups, self.num_key_value_heads),
                                 ("channels", self.channels, self.intermediate_size)):
            if len(kept) != self.num_layers:
                raise PruneError(f"plan {name} lists {len(kept)} layers, the model has {self.num_layers}")
            sizes = {len(k) for k in kept}
            if len(sizes) != 1 or 0 in sizes:
                raise PruneError(f"plan {name}: every layer must keep the same, non-zero number, got {sorted(sizes)}")
            for i, k in enumerate(kept):
                if list(k) != sorted(set(k)) or k[0] < 0 or k[-1] >= full:
                    raise PruneError(f"plan {name}[{i}] must be distinct ascending indices in [0, {full}), got {k}")

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def kept_kv_heads(self) -> int:
        return len(self.kv_groups[0])

    @property
    def kept_channels(self) -> int:
        return len(self.channels[0])

    def rows(self, layer: int, module: str) -> torch.Tensor | None:
        """The full model's output rows of ``module`` the pruned model keeps (None: all of them)."""
        d, g = self.head_dim, self.kv_groups[layer]
        if module == "q_proj":
            heads = [k * self.n_rep + j for k in g for j in range(self.n_rep)]
            return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)
        if module in ("k_proj", "v_proj"):
            return torch.tensor([k * d + i for k in g for i in range(d)], dtype=torch.long)
        if module in ("gate_proj", "up_proj"):
            return torch.tensor(self.channels[layer], dtype=torch.long)
        return None

    def cols(self, layer: int, module: str) -> torch.Tensor | None:
        """The full model's input columns of ``module`` the pruned model keeps (None: all of them)."""
        if module == "o_proj":
            return self.rows(layer, "q_proj")
        if module == "down_proj":
            return torch.tensor(self.channels[layer], dtype=torch.long)
        return None

    def full_size(self, module: str) -> int:
        """The full model's size of ``module``'s pruned dimension: its rows for q/k/v/gate/up_proj, its columns for
        o/down_proj."""
        if module in ("q_proj", "o_proj"):
            return self.num_attention_heads * self.head_dim
        if module in ("k_proj", "v_proj"):
            return self.num_key_value_heads * self.head_dim
        return self.intermediate_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_groups"] = [list(g) for g in self.kv_groups]
        d["channels"] = [list(c) for c in self.channels]
        return {"format": PLAN_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PruneError(f"not a LoRAM prune plan (format {d.get('format') if isinstance(d, dict) else d!r}, "
                             f"expected {PLAN_FORMAT!r})")
        fields = ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                  "kv_groups", "channels", "importance")
        missing = [f for f in fields if f not in d]
        if missing:
            raise PruneError(f"prune plan is missing {', '.join(missing)}")
        return cls(**{f: d[f] for f in fields})

    def save(self, folder: str) -> str:
        path = os.path.join(folder, PLAN_FILE)
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh)
        return path

    @classmethod
    def load(cls, folder_or_file: str) -> "PrunePlan":
        path = folder_or_file
        if os.path.isdir(path):
            path = os.path.join(path, PLAN_FILE)
        if not os.path.isfile(path):
            raise PruneError(f"no LoRAM prune plan at {folder_or_file} (expected {PLAN_FILE}, which 'loram prune' "
                             "writes into the pruned model's folder)")
        with open(path) as fh:
            try:
                return cls.from_dict(json.load(fh))
            except json.JSONDecodeError as exc:
                raise PruneError(f"{path}: not valid JSON ({exc})") from None


def _layers(model):
    """The decoder layers of a Llama-family model, after checking each has the projections LoRAM prunes."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise PruneError(f"model: {type(model).__name__} has no model.layers; LoRAM prunes Llama-family causal LMs "
                         "(Llama, Mistral, Qwen2)")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for i, layer in enumerate(layers):
        for part, names in (("self_attn", ATTN), ("mlp", MLP)):
            block = getattr(layer, part, None)
            for n in names:
                if not isinstance(getattr(block, n, None), torch.nn.Linear):
                    raise PruneError(f"model: layer {i} has no {part}.{n} nn.Linear; LoRAM prunes Llama-family "
                                     f"causal LMs (got {type(model).__name__})")
            # any other weight of the block must not span the heads or channels pruning removes: a per-head norm
            # of head_dim (Qwen3's q_norm) is shared by every head and stays; OLMo2's q_norm over all heads, or
            # Cohere's (heads x head_dim) one, would need pruning too
            for name, param in block.named_parameters():
                if name.split(".")[0] in names:
                    continue
                if part == "mlp" or tuple(param.shape) != (head_dim,):
                    raise PruneError(f"model: layer {i} {part}.{name} has shape {tuple(param.shape)}, which spans "
                                     f"the {'channels' if part == 'mlp' else 'attention heads'} pruning removes; "
                                     f"LoRAM prunes Llama-family blocks whose only such weights are "
                                     f"{', '.join(names)} (got {type(model).__name__})")
    return layers


def _sizes(model) -> tuple[int, int, int, int, int]:
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return len(_layers(model)), heads, kv, head_dim, cfg.intermediate_size


def _group_terms(model, tensor_of) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, a value per KV group and per MLP channel: the sum of ``tensor_of(param)`` over the structure's
    weights (and biases), where ``tensor_of`` maps a parameter to a same-shaped float64 tensor."""
    _, heads, kv, d, _ = _sizes(model)
    n_rep = heads // kv
    groups, channels = [], []
    for layer in model.model.layers:  # checked by _sizes
        a, m = layer.self_attn, layer.mlp
        g = torch.zeros(kv, dtype=torch.float64)
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(a, name)
            per = n_rep * d if name == "q_proj" else d
            g += tensor_of(lin.weight).reshape(kv, per, -1).sum(dim=(1, 2))
            if lin.bias is not None:
                g += tensor_of(lin.bias).reshape(kv, per).sum(dim=1)
        g += tensor_of(a.o_proj.weight).reshape(-1, kv, n_rep * d).sum(dim=(0, 2))
        c = (tensor_of(m.gate_proj.weight).sum(dim=1) + tensor_of(m.up_proj.weight).sum(dim=1)
             + tensor_of(m.down_proj.weight).sum(dim=0))
        for lin in (m.gate_proj, m.up_proj):
            if lin.bias is not None:
                c += tensor_of(lin.bias)
        groups.append(g)
        channels.append(c)
    return groups, channels


def importance_scores(model, method: str = "taylor",
                      batches: Iterable[dict] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the importance of each KV group and each MLP channel (float64; larger = keep).

    ``"magnitude"``: the L2 norm of the structure's weights. ``"taylor"``: ``|sum w * dL/dw|`` over the structure,
    with ``L`` the summed next-token loss over ``batches`` (dicts of model inputs with ``labels``; gradients are
    taken in the model's dtype and the parameters' ``requires_grad`` and ``.grad`` are restored afterwards).
    """
    if method not in IMPORTANCE:
        raise PruneError(f"importance must be one of {IMPORTANCE}, got {method!r}")
    _layers(model)
    if method == "magnitude":
        groups, channels = _group_terms(model, lambda p: p.detach().double() ** 2)
        return [g.sqrt() for g in groups], [c.sqrt() for c in channels]
    if batches is None:
        raise PruneError("importance='taylor' needs calibration batches (or use importance='magnitude')")
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was = model.training
    model.eval()
    grads = {}
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        from lorafusion.train.trainer import loss_sum  # the loss training minimises, summed over label tokens

        n = 0
        device = params[0].device
        for batch in batches:
            loss_sum(model, batch, device, contextlib.nullcontext)[0].backward()
            n += 1
        if n == 0:
            raise PruneError("importance='taylor': the calibration data gave no batch")
        grads = {id(p): p.grad.detach().double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                 for p in params}
    finally:
        for p, (req, grad) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(req)
        model.train(was)
    groups, channels = _group_terms(model, lambda p: p.detach().double() * grads[id(p)])
    return [g.abs() for g in groups], [c.abs() for c in channels]


def _kept(scores: torch.Tensor, count: int) -> tuple[int, ...]:
    """The ``count`` highest-scoring indices, ascending; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(order[:count]))


def _check_ratios(keep_ratio, attn_keep_ratio, channel_multiple) -> None:
    for name, v in (("keep_ratio", keep_ratio), ("attn_keep_ratio", attn_keep_ratio)):
        if v is None and name == "attn_keep_ratio":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 or math.isnan(v):
            raise PruneError(f"{name} must be in (0, 1], got {v!r}")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise PruneError(f"channel_multiple must be a positive integer, got {channel_multiple!r}")


def kept_counts(kv_heads: int, channels: int, keep_ratio: float, attn_keep_ratio: float | None = None,
                channel_multiple: int = 1) -> tuple[int, int]:
    """(KV groups, MLP channels) each layer keeps: the ratios of the counts, half rounding up, channels to a
    multiple of ``channel_multiple``, at least one of each (and at most all)."""
    attn_keep_ratio = keep_ratio if attn_keep_ratio is None else attn_keep_ratio
    n_kv = min(kv_heads, max(1, int(kv_heads * attn_keep_ratio + 0.5)))
    n_ch = min(channels, max(channel_multiple, int(channels * keep_ratio / channel_multiple + 0.5) * channel_multiple))
    return n_kv, n_ch


def make_plan(model, keep_ratio: float, *, attn_keep_ratio: float | None = None, importance: str = "taylor",
              batches: Iterable[dict] | None = None, channel_multiple: int = 1) -> PrunePlan:
    """The plan keeping ``keep_ratio`` of each layer's MLP channels and ``attn_keep_ratio`` (default: the same) of
    its KV groups (:func:`kept_counts`), chosen by ``importance``."""
    _check_ratios(keep_ratio, attn_keep_ratio, channel_multiple)
    layers, heads, kv, d, inter = _sizes(model)
    n_kv, n_ch = kept_counts(kv, inter, keep_ratio, attn_keep_ratio, channel_multiple)
    groups, channels = importance_scores(model, importance, batches)
    return PrunePlan(layers, heads, kv, d, inter, tuple(_kept(g, n_kv) for g in groups),
                     tuple(_kept(c, n_ch) for c in channels), importance)


def check_plan_fits(model, plan: PrunePlan) -> None:
    sizes = _sizes(model)
    want = (plan.num_layers, plan.num_attention_heads, plan.num_key_value_heads, plan.head_dim,
            plan.intermediate_size)
    if sizes != want:
        names = ("layers", "attention heads", "KV heads", "head dim", "intermediate size")
        diff = ", ".join(f"{n} {a} vs {b}" for n, a, b in zip(names, sizes, want) if a != b)
        raise PruneError(f"the prune plan does not fit this model ({diff}: model vs plan)")


def pruned_config(config, kept_kv_heads: int, kept_channels: int):
    """The full model's config with ``kept_kv_heads`` KV groups and ``kept_channels`` MLP channels per layer (and
    ``head_dim`` written out, as it no longer follows from hidden_size / heads)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cfg.num_attention_heads = kept_kv_heads * (heads // kv)
    cfg.num_key_value_heads = kept_kv_heads
    cfg.intermediate_size = kept_channels
    cfg._attn_implementation = getattr(config, "_attn_implementation", None)  # not part of to_dict()
    return cfg


@torch.no_grad()
def prune_model(model, plan: PrunePlan):
    """A new model of the same class with the structures ``plan`` keeps (weights copied; same dtype and device)."""
    check_plan_fits(model, plan)
    cfg = pruned_config(model.config, plan.kept_kv_heads, plan.kept_channels)
    param = next(model.parameters())
    with torch.device(param.device):  # built where and in the dtype it will live: no float32 CPU copy first
        small = model.__class__._from_config(cfg, dtype=param.dtype)
    state = {}
    prefixes = {}
    for i in range(plan.num_layers):
        for part, names in (("self_attn", ATTN), ("mlp", MLP)):
            for n in names:
                prefixes[f"model.layers.{i}.{part}.{n}."] = (i, n)
    for key, value in model.state_dict().items():
        hit = next(((p, v) for p, v in prefixes.items() if key.startswith(p)), None)
        if hit is not None:
            (i, n), leaf = hit[1], key[len(hit[0]):]
            rows, cols = plan.rows(i, n), plan.cols(i, n)
            if rows is not None:
                value = value.index_select(0, rows.to(value.device))
            if cols is not None and leaf == "weight":
                value = value.index_select(1, cols.to(value.device))
        state[key] = value
    try:
        missing, unexpected = small.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a weight whose shape the pruned config changes and this plan does not prune
        raise PruneError(f"model: {type(model).__name__} cannot be pruned by rows and columns of "
                         f"{', '.join(ATTN + MLP)} alone ({str(exc).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise PruneError(f"pruned model state does not match its class: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    if getattr(model.config, "tie_word_embeddings", False):
        small.tie_weights()
    small.train(model.training)
    return small


def meta_model(config):
    """The causal LM ``config`` describes, on the meta device: its parameters' shapes without their memory (free
    even for a 70B config)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_count(config) -> int:
    """Parameters of the causal LM ``config`` describes (exact for any architecture)."""
    return sum(p.numel() for p in meta_model(config).parameters())
