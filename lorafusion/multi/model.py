"""``MultiLoRAModel``: wrap every target ``nn.Linear`` of a (``transformers``) model in ``MultiLoRALinear``.

    mm = MultiLoRAModel(model, target_modules=["q_proj", "v_proj"])     # or "all-linear"
    mm.add_adapter("job_a", r=8, alpha=16, dropout=0.05)
    mm.add_adapter("job_b", r=32, alpha=32, target_modules=["q_proj", "v_proj"])   # a subset of the wrapped ones
    seg = mm.make_segments(["job_a", "job_b", None, "job_a"], seq_len=L)  # per sequence of the (B x L) batch
    out = mm(input_ids=ids, labels=labels, segments=seg)                  # or: with mm.use_segments(seg): model(...)
    out = mm(input_ids=ids, adapter_names=["job_a", "job_b", None, "job_a"])  # the same, one adapter per sequence
    mm.eval().generate(prompt_ids, adapter_names=["job_b", "job_a"], max_new_tokens=20)  # each its own adapter

The layout is handed to the wrapped layers for the duration of one forward (the backward needs nothing more),
through a context variable: it is never stored on the shared layers or globally, so threads (or asyncio tasks)
running forwards on one model each use their own. Rows are the flattened tokens in the order the linears see them. A layout from
``make_segments(names, seq_len=L)`` is per sequence: a layer whose input is (B, L, features) or B·L rows sequence by
sequence reads it as built, and one whose input is time-first, (L, B, features) as FSMT's are, gets it in time-major
order. Where B == L the two cannot be told apart by shape, and the input is read as (B, L, features).
With ``transformers`` gradient checkpointing on, each checkpointed block is handed the layout of the forward that
checkpointed it, so its recomputation in backward sees that layout too (several microbatches may run forward before
one backward). Other recomputation schemes must run the backward inside ``use_segments`` of the same layout.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib

import torch
from torch import nn

from lorafusion.multi.layer import ACTIVE_LAYOUTS, MultiLoRALinear, check_adapter_name
from lorafusion.multi.segments import AdapterSegments, AdapterSpec, SequenceLayouts


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value):
    """``var`` holds ``value`` inside the block, in this context (thread or task) only; its value before comes back
    on exit."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _layouts(assignment):
    """Each layer of ``assignment`` ((layer, layout) pairs) uses its layout inside the block; the layouts before (an
    enclosing block's, or none) come back on exit."""
    return _set(ACTIVE_LAYOUTS, {**(ACTIVE_LAYOUTS.get() or {}), **dict(assignment)})


# the SequenceLayouts of the use_sequence_adapters block running in this context (thread or task)
_SEQUENCE_LAYOUTS: contextvars.ContextVar = contextvars.ContextVar("lorafusion_multi_sequence_layouts", default=None)


def _capture_batch(_module, args, kwargs) -> None:
    """Forward pre-hook of the token embeddings: each forward's batch size, for the SequenceLayouts of this context
    (it reads inputs that are not sequence-first)."""
    layouts = _SEQUENCE_LAYOUTS.get()
    if layouts is None:
        return
    ids = args[0] if args else kwargs.get("input")
    layouts.batch = int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None


class _LayoutCheckpoint:
    """A ``transformers`` block's checkpoint function, installed once in its place, that runs the function it
    checkpoints under the layouts active when the forward checkpointed it: the recomputation in backward, after the
    forward's ``use_segments`` has exited (or in autograd's own thread), sees that forward's layouts. Several
    microbatches may run forward before one backward."""

    def __init__(self, func):
        self.func = func

    def __call__(self, fn, *args, **kwargs):
        layouts = ACTIVE_LAYOUTS.get()
        if not layouts:
            return self.func(fn, *args, **kwargs)

        def run(*a, **k):
            with _set(ACTIVE_LAYOUTS, layouts):
                return fn(*a, **k)
        return self.func(run, *args, **kwargs)


def _matches(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_seed(seed: int, path: str) -> int:
    """The seed of the layer at module path ``path`` for an adapter's ``init_seed`` ``seed``."""
    digest = hashlib.sha256(f"{int(seed)}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


class MultiLoRAModel(nn.Module):
    def __init__(self, model: nn.Module, target_modules="all-linear", backend: str | None = None,
                 exclude_modules=("lm_head",)):
        super().__init__()
        if isinstance(target_modules, str) and target_modules != "all-linear":
            target_modules = [target_modules]
        # one name, as for target_modules (a bare string was matched character by character), or none at all
        exclude_modules = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules or ())
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapter_specs: dict[str, AdapterSpec] = {}
        self.adapter_layers: dict[str, list[str]] = {}  # adapter -> the wrapped layers it targets
        self.layer_names: list[str] = []
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, nn.Linear) or isinstance(mod, MultiLoRALinear):
                continue
            if not _matches(name, target_modules):
                continue
            # an excluded module (the output head) is wrapped only when a target names it outright
            if _matches(name, exclude_modules) and not (
                    target_modules != "all-linear" and any(t in exclude_modules for t in target_modules)):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MultiLoRALinear(mod, backend=backend))
            self.layer_names.append(name)
        if not self.layer_names:
            other = sorted({type(m).__name__ for n, m in model.named_modules()
                            if n and not isinstance(m, nn.Linear) and type(m).__name__ in ("Conv1D", "Conv1d", "Embedding")
                            and _matches(n, target_modules)})
            raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of the model"
                             + (f" (it matches {', '.join(other)} modules: only nn.Linear is supported, e.g. GPT-2's "
                                "transformers Conv1D is not)" if other else ""))

    def layers(self) -> dict[str, MultiLoRALinear]:
        return {n: self.model.get_submodule(n) for n in self.layer_names}

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    dtype: torch.dtype | None = None, target_modules=None, layers=None,
                    init_seed: int | None = None) -> None:
        """Add adapter ``name`` to every wrapped linear, or with ``target_modules`` (names or dotted path suffixes,
        as for the model and PEFT) to those of them it matches, or with ``layers`` to exactly the wrapped linears
        at those module paths: each job keeps its own LoRA targets; in the layers an adapter does not target, its
        rows get the base output alone.

        ``init_seed``: each layer's A is drawn from its own CPU generator seeded from (``init_seed``, the layer's
        path), so a layer's initial adapter depends on neither the other layers present (a pipeline stage holds
        only some) nor the device. Without it, A is drawn layer after layer from torch's default generator."""
        check_adapter_name(name)
        if name in self.adapter_specs:
            raise ValueError(f"duplicate adapter name {name!r}: the model already holds it")
        if layers is not None:
            if target_modules is not None:
                raise ValueError(f"adapter {name!r}: pass target_modules or layers, not both")
            unknown = [p for p in layers if p not in self.layer_names]
            if not layers or unknown:
                raise ValueError(f"adapter {name!r}: layers must be paths of wrapped linears, got "
                                 f"{unknown[:5] or list(layers)!r}")
            wanted = set(layers)
            paths = [p for p in self.layer_names if p in wanted]
        elif target_modules is None or target_modules == "all-linear":
            paths = list(self.layer_names)
        else:
            targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"adapter {name!r}: target_modules must be module names, got {target_modules!r}")
            paths = [p for p in self.layer_names if _matches(p, targets)]
            if not paths:
                raise ValueError(f"adapter {name!r}: target_modules={target_modules!r} match none of the wrapped "
                                 f"linears (e.g. {self.layer_names[:3]})")
        layers = self.layers()
        done = []
        try:
            for path in paths:
                layer = layers[path]
                try:
                    gen = None if init_seed is None else torch.Generator().manual_seed(layer_seed(init_seed, path))
                    layer.add_adapter(name, r, alpha, dropout, use_rslora, dtype, generator=gen)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"layer {path}: {e}") from e
                done.append(layer)
        except BaseException:
            for layer in done:  # all or nothing: no layer keeps a half-added adapter
                layer.remove_adapter(name)
            raise
        self.adapter_specs[name] = AdapterSpec(r, float(alpha), float(dropout), bool(use_rslora))
        self.adapter_layers[name] = paths

    def remove_adapter(self, name: str) -> list[nn.Parameter]:
        """Remove ``name`` from every layer; returns its parameters (drop them from the optimizer if wanted)."""
        if name not in self.adapter_specs:
            raise ValueError(f"unknown adapter {name!r} (held: {list(self.adapter_specs)})")
        removed = []
        layers = self.layers()
        for path in self.adapter_layers[name]:
            removed += list(layers[path].remove_adapter(name))
        del self.adapter_specs[name]
        del self.adapter_layers[name]
        return removed

    def release_layers(self, paths) -> None:
        """Forget the wrapped linears at ``paths``: their modules were taken out of the model (a pipeline stage
        keeps only its own layers). Adapters keep their names and settings; their parameters here are those of the
        linears kept, which may be none."""
        gone = set(paths)
        unknown = sorted(gone - set(self.layer_names))
        if unknown:
            raise ValueError(f"release_layers: not wrapped linears of the model: {unknown[:5]}")
        self.layer_names = [p for p in self.layer_names if p not in gone]
        for name, held in self.adapter_layers.items():
            self.adapter_layers[name] = [p for p in held if p not in gone]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        if name not in self.adapter_specs:
            raise ValueError(f"unknown adapter {name!r}")
        layers = self.layers()
        return [p for path in self.adapter_layers[name] for p in (layers[path].lora_A[name], layers[path].lora_B[name])]

    def make_segments(self, row_adapters, seq_len: int | None = None) -> AdapterSegments:
        """The layout for one microbatch. ``row_adapters``: one entry per token row, or with ``seq_len`` one entry
        per sequence of a (batch x seq_len) input (names, indices into the adapter order, or None / -1)."""
        if seq_len is None:
            return AdapterSegments(row_adapters, self.adapter_specs)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if isinstance(row_adapters, torch.Tensor):
            row_adapters = row_adapters.tolist()
        row_adapters = list(row_adapters)
        seg = AdapterSegments([v for v in row_adapters for _ in range(seq_len)], self.adapter_specs)
        seg.sequences = (len(row_adapters), seq_len)
        return seg

    @contextlib.contextmanager
    def use_segments(self, segments: AdapterSegments):
        """Every wrapped layer uses ``segments`` inside the block."""
        if not isinstance(segments, AdapterSegments):
            raise TypeError(f"segments must be an AdapterSegments, got {type(segments).__name__}")
        if segments.names != list(self.adapter_specs) or segments.specs != list(self.adapter_specs.values()):
            raise ValueError("segments was built for another adapter set; build it with make_segments()")
        # each layer gets the layout narrowed to the adapters it holds (shared between layers holding the same set)
        with self._bound([(layer, segments.restricted(layer.adapter_specs)) for layer in self.layers().values()]):
            yield

    @contextlib.contextmanager
    def use_sequence_adapters(self, adapter_names):
        """Inside the block, sequence i of every forward uses adapter ``adapter_names[i]`` (a name, an index, or
        None for the base model alone), whatever the forward's length: each layer builds the layout of its input's
        shape (``SequenceLayouts``). For ``generate`` and other loops whose forwards change length."""
        layouts = SequenceLayouts(adapter_names, self.adapter_specs)
        for emb in self._token_embeddings():  # installed once: hooks added per call would race between threads
            if not getattr(emb, "_lorafusion_batch_hook", False):
                emb.register_forward_pre_hook(_capture_batch, with_kwargs=True)
                emb._lorafusion_batch_hook = True
        with _set(_SEQUENCE_LAYOUTS, layouts), self._bound([(layer, layouts) for layer in self.layers().values()]):
            yield

    def _token_embeddings(self) -> list[nn.Module]:
        """The token-embedding modules of the model (encoder and decoder ones for an encoder-decoder model): each
        is called on (batch, tokens) ids at the start of its stack, so it tells that stack's batch size."""
        def call(obj, name):  # transformers' defaults raise for stacks without token embeddings (speech encoders)
            fn = getattr(obj, name, None)
            try:
                return fn() if callable(fn) else None
            except (NotImplementedError, AttributeError, TypeError):
                return None

        found: list[nn.Module] = []
        for owner in (self.model, call(self.model, "get_encoder"), call(self.model, "get_decoder")):
            if owner is None:
                continue
            for emb in (call(owner, "get_input_embeddings"), getattr(owner, "embed_tokens", None)):
                if isinstance(emb, nn.Module) and not any(emb is f for f in found):
                    found.append(emb)
        return found

    @contextlib.contextmanager
    def _bound(self, assignment):
        """The layers use their layouts of ``assignment`` inside the block (in this thread or task only);
        ``transformers`` blocks with gradient checkpointing on get, once, a checkpoint function that hands their
        recomputation in backward, after the block has exited, the layouts of the forward that checkpointed them."""
        for m in self.model.modules():
            f = m.__dict__.get("_gradient_checkpointing_func")
            if getattr(m, "gradient_checkpointing", False) is True and callable(f) \
                    and not isinstance(f, _LayoutCheckpoint):
                m._gradient_checkpointing_func = _LayoutCheckpoint(f)
        with _layouts(assignment):
            yield

    def forward(self, *args, segments: AdapterSegments | None = None, adapter_names=None, **kwargs):
        """The wrapped model's forward with a row layout (``segments``) or one adapter per sequence
        (``adapter_names``): exactly one of the two."""
        return self._run(self.model, args, kwargs, segments, adapter_names)

    def generate(self, *args, adapter_names, **kwargs):
        """``transformers`` ``generate`` with sequence i continued by adapter ``adapter_names[i]`` (None: the base
        model), all in one batch. Beam search and several returned sequences work: ``generate`` repeats each
        sequence in place, and each copy keeps its adapter. Call ``eval()`` first, as for any generation: in
        training mode the adapters' dropout is on."""
        return self._run(self.model.generate, args, kwargs, None, adapter_names)

    def _run(self, fn, args, kwargs, segments, adapter_names):
        if (segments is None) == (adapter_names is None):
            raise ValueError("pass exactly one of segments= (a row layout from make_segments) and adapter_names= "
                             f"(one adapter per sequence); got segments={segments!r}, adapter_names={adapter_names!r}")
        if adapter_names is not None:
            inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
            n = len(adapter_names) if hasattr(adapter_names, "__len__") else None
            if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and n is not None and inputs.shape[0] != n:
                raise ValueError(f"adapter_names has {n} entries but the input holds {inputs.shape[0]} sequences: "
                                 "give one adapter (or None) per sequence")
        ctx = self.use_segments(segments) if segments is not None else self.use_sequence_adapters(adapter_names)
        with ctx:
            return fn(*args, **kwargs)
