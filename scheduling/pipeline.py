"""Pipeline-parallel co-training: the executor with the base model's decoder layers split over ``stages`` processes.

    torchrun --nproc_per_node S -m lorafusion cotrain --config cotrain.yaml [--resume]     (the config's stages: S)

Every process reads the config, tokenizes the data and makes the same plan (planning is deterministic), so each
knows every microbatch's token count and no shapes cross the wire. Process ``s`` keeps decoder layers
``split_layers(n, S)[s]`` (contiguous, as even as the count allows) and their adapters; the layers other stages hold are
replaced by pass-through modules, so module paths, and the keys of the PEFT folders written, stay the whole model's.
The first stage embeds the tokens, the last applies the final norm and the output head and computes the loss.

The microbatches run in the schedule's order under one-forward-one-backward (1F1B, non-interleaved, as Megatron-LM's
``forward_backward_pipelining_without_interleaving``): stage ``s`` runs ``S - s - 1`` warm-up forwards, then
alternates a forward and a backward, then drains. Activations go forward and their gradients backward over
point-to-point sends (gloo on CPU, NCCL on CUDA), each pair batched (``batch_isend_irecv``) as Megatron does so two
neighbours never wait on each other's sends. The plan's no-op slots are kept as empty positions: they hold a job's
next global batch back until the optimizer step of the one before has been applied.

Each adapter's optimizer steps on every stage, over that stage's share of its parameters, right after the stage's
backward of the microbatch the plan names: global batch ``g + 1`` of an adapter starts at least ``S`` positions
after ``g``'s last microbatch, and in 1F1B the forward of position ``k + S`` on stage ``s`` comes after its backward of
position ``k`` (the verifier checks the first; the second is 1F1B's order), so the next forward already sees the
stepped weights. Gradient clipping needs the adapter's norm over all stages: each stage starts a non-blocking
all-reduce of its squared norm after that backward, and waits for it only before its next forward of that adapter.
AdamW is elementwise, so per-stage optimizers step exactly as one optimizer over all the parameters would.

``torch.distributed.pipelining`` is not used: its schedules run a fixed number of equally shaped microbatches per
``step()`` and step the optimizer after all of them (uneven microbatch shapes are not supported:
pytorch/pytorch#126600), while a plan has a different token count in every microbatch and a different adapter's
optimizer step after many of them.

Checkpoints are taken with the pipeline drained, every ``save_every`` microbatches (each stage writes its own files
into the one checkpoint folder; the last stage commits it). A SIGINT / SIGTERM on any stage cuts the segment at
the next stop check (every ``STOP_CHECK_EVERY`` microbatches, agreed without draining), which then drains and
checkpoints: torchrun SIGKILLs its stages 30 s after passing a signal on. Finished jobs' adapters are gathered to the last stage, which writes
their PEFT folders, at the end of each segment; their evals run through the pipeline (greedy decoding re-runs the whole
prefix at each new token: no KV cache across stages). Dropout draws from a per-stage stream: with dropout a pipeline
run's masks differ from a one-process run's (the same distribution), and its resume is exact.

Each process reads only its share of the checkpoint (``load_stage``): its decoder layers, the token embedding on the
first stage (and on the last where the output head is tied to it), the final norm and the output head on the last.
The model is made on the meta device and loaded by ``from_pretrained`` with the other stages' modules swapped out, so
their tensors are never read (safetensors files are memory-mapped). An adapter's initial weights are drawn per layer
(``MultiLoRAModel.add_adapter(init_seed=...)``), so a stage's are those of the one-process run without the other
layers being made. All processes must see the same output_dir (one machine, or a shared file system).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time

import torch
import torch.distributed as dist
from torch import nn

from lorafusion.multi.layer import MultiLoRALinear
from lorafusion.train.checkpoint import atomic_write_json

from .executor import CoTrainConfig, CoTrainer, CoTrainError, _fail, pack_microbatch

logger = logging.getLogger("lorafusion.cotrain")
SIGNALS = ("SIGINT", "SIGTERM")
# microbatches between the checks for a stop signal inside a segment ($LORAFUSION_STOP_CHECK_EVERY): a stop must be
# taken well within the 30 s torchrun waits before it SIGKILLs the stages it passed a signal on to
STOP_CHECK_EVERY = max(1, int(os.environ.get("LORAFUSION_STOP_CHECK_EVERY", "32")))


def launched() -> bool:
    """Started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_lead() -> bool:
    """This process runs the last stage: it writes the run's files and prints its results."""
    return int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1


def split_layers(n_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, the first ``n_layers % stages`` one layer longer."""
    if stages > n_layers:
        raise ValueError(f"{stages} stages for {n_layers} decoder layers: at most one stage per layer")
    size, extra = divmod(n_layers, stages)
    out, lo = [], 0
    for s in range(stages):
        hi = lo + size + (1 if s < extra else 0)
        out.append(range(lo, hi))
        lo = hi
    return out


class _Elsewhere(nn.Module):
    """A decoder layer another pipeline stage holds: passes the hidden states through."""

    def __init__(self, index: int, stage: int):
        super().__init__()
        self.index, self.stage = index, stage

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def extra_repr(self) -> str:
        return f"layer {self.index} on stage {self.stage}"


def _decoder(model: nn.Module, where: str):
    """The decoder of a causal LM and its layer list (it must have a final norm too)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(getattr(dec, "norm", None), nn.Module):
        raise CoTrainError(f"model: {where} ({type(model).__name__}) has no decoder with a `layers` list and a final "
                           "`norm`, which pipeline stages split (Llama, Mistral, Qwen2, ... have them); run it with "
                           "stages: 1")
    return dec, layers


class _NotHere(nn.Module):
    """A module another pipeline stage holds (the token embedding after the first stage, the final norm and the
    output head before the last): it has no weights here and is never run."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.path} is held by another pipeline stage; this stage never runs it")

    def extra_repr(self) -> str:
        return self.path


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    (model.get_submodule(parent) if parent else model)._modules[child] = module


def _path_of(model: nn.Module, module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if isinstance(module, nn.Module) else None


def _stage_class(cls: type, away: list[str], untie: bool) -> type:
    """``cls`` building only a stage's share: the modules at ``away`` are swapped for weightless stand-ins as the
    model is made (on the meta device, inside ``from_pretrained``), so the loader reads none of their tensors and
    does not report their checkpoint keys."""
    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        for path in away:
            _set_module(self, path, _NotHere(path))
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | {
            rf"(^|\.){re.escape(p)}\." for p in away}
        if untie:  # neither the embedding nor the tied head is here: nothing to tie
            self.all_tied_weights_keys = {}

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def load_stage(path: str, dtype: torch.dtype, rank: int, world: int, where: str | None = None, stages=None):
    """Stage ``rank`` of ``world``'s share of the causal LM in folder ``path``, read alone from its checkpoint onto
    the CPU, and the split of the decoder layers: its decoder layers ``split_layers(n, world)[rank]``; the token
    embedding on the first stage (and on the last where the output head is tied to it); the final norm and the
    output head on the last. The modules other stages hold are the meta device's (no memory), so the model's module
    paths stay the whole model's until ``PipelineCoTrainer._place`` drops them. Loading goes through
    ``from_pretrained`` (its weight renames and conversions apply), which reads only the tensors this stage keeps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = where or path
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            whole = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise CoTrainError(f"model: cannot load {path}: {type(exc).__name__}: {exc}") from None
    dec, layers = _decoder(whole, where)
    try:
        ranges = split_layers(len(layers), world)
    except ValueError as exc:
        _fail("stages", world if stages is None else stages, f"{exc} ({where})")
    prefix = _path_of(whole, dec)
    prefix = f"{prefix}." if prefix else ""
    embed, head = _path_of(whole, whole.get_input_embeddings()), _path_of(whole, whole.get_output_embeddings())
    tied = head is not None and bool(getattr(whole.config.get_text_config(), "tie_word_embeddings", False))
    first, last = rank == 0, rank == world - 1
    away = [f"{prefix}layers.{k}" for k in range(len(layers)) if k not in ranges[rank]]
    if not first and embed and not (tied and last):
        away.append(embed)
    # a tied head stays while loading on every stage that keeps the embedding (the checkpoint may store the shared
    # matrix under either name; the loader fills both from it), and goes once loaded where it is not this stage's
    dropped = [head] if tied and first and not last else []
    if not last:
        away += [f"{prefix}norm"] + ([head] if head and not dropped else [])
    try:
        model = _stage_class(type(whole), away, tied and not (first or last)).from_pretrained(path, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise CoTrainError(f"model: cannot load {path}: {type(exc).__name__}: {exc}") from None
    for p in away + dropped:
        _set_module(model, p, whole.get_submodule(p))
    return model, ranges


def _module(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:  # under a pass-through layer
        return None


class _PipelineGreedy:
    """``generate`` for the exact match: greedy decoding through the pipeline, one whole-prefix forward per token."""

    def __init__(self, trainer: "PipelineCoTrainer", adapter: str):
        self.t, self.adapter = trainer, adapter

    @property
    def training(self) -> bool:
        return self.t.mm.training

    def train(self, mode: bool = True):
        self.t.mm.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        t = self.t
        ids, mask = input_ids, attention_mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            layout = t.mm.make_segments([self.adapter] * ids.shape[0], seq_len=ids.shape[1])
            logits = t._forward_only(ids, pos, mask, layout)
            nxt = logits[:, -1].argmax(-1).cpu() if t.last else torch.zeros(ids.shape[0], dtype=torch.long)
            dist.broadcast(nxt, src=t.world - 1, group=t.side)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None].to(ids.device)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
        return ids


class PipelineCoTrainer(CoTrainer):
    """The executor over ``cfg.stages`` processes, one pipeline stage each (a process group must be up)."""

    def __init__(self, cfg: CoTrainConfig):
        super().__init__(cfg)
        if not dist.is_initialized():
            raise CoTrainError("a pipeline run needs a process group: start it with `torchrun --nproc_per_node "
                               f"{cfg.stages} -m lorafusion cotrain --config ...`")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        try:
            self._check_launch(cfg)
        except Exception as exc:  # every process finds it: the last one prints it
            exc.quiet = self.rank != self.world - 1
            raise
        self.processes = self.world
        self.first, self.last = self.rank == 0, self.rank == self.world - 1
        self.writes_state = self.last
        # CPU control messages (squared gradient norms, stop flags, errors, objects) on a gloo group of their own, so
        # they never queue behind the activations on the default group
        self.side = dist.new_group(backend="gloo")
        self.pending: dict[str, tuple] = {}  # adapter -> (global batch, microbatch, squared-norm tensor, work)
        self.finished: list[str] = []        # jobs whose last step is done, written at the next boundary
        self._stop = None                    # the loop's signal catcher

    def _check_launch(self, cfg: CoTrainConfig) -> None:
        if self.world != cfg.stages:
            _fail("stages", cfg.stages, f"must equal the number of processes the launcher started ({self.world}): "
                                        "one pipeline stage per process")
        if cfg.device == "cuda":
            if not torch.cuda.is_available():
                _fail("device", cfg.device, "no CUDA device is available")
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
            if torch.cuda.device_count() < local:
                _fail("device", cfg.device, f"{local} pipeline stages on this machine need one GPU each, and it has "
                                            f"{torch.cuda.device_count()}")
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)

    # -- agreement between the stages
    def _agree(self, fn, *args):
        """Run ``fn`` here; if it raised on any stage, raise on every stage (the failing one with its own error, the
        others with the same message, marked ``quiet`` so the launcher prints it once)."""
        from lorafusion.train.config import ConfigError

        out, err, exc = None, None, None
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 -- handed to every stage below, then raised
            exc, err = e, (type(e).__name__, str(e))
        errs = [None] * self.world
        dist.all_gather_object(errs, err, group=self.side)
        bad = [(r, e) for r, e in enumerate(errs) if e is not None]
        if not bad:
            return out
        r, (kind, msg) = bad[0]
        if exc is not None and r == self.rank:
            raise exc
        mine = (ConfigError if kind == "ConfigError" else CoTrainError)(msg)
        mine.quiet = True
        raise mine

    def _from_lead(self, obj):
        """``obj`` as the last stage has it, on every stage."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.world - 1, group=self.side)
        return box[0]

    # -- the stage's share of the model
    def _load_model(self, device=None):
        tok = self.load_tokenizer()
        model, self.layer_ranges = load_stage(self.model_path(), self.dtype, self.rank, self.world, self.cfg.model,
                                              self.cfg.stages)
        model.config.use_cache = False
        return model, tok

    def _place(self) -> None:
        from lorafusion.multi.io import peft_target_modules

        model = self.mm.model
        dec, layers = _decoder(model, self.cfg.model)
        # the PEFT target_modules of each adapter over the whole model, for the folders the last stage writes
        self.peft_targets = {a: peft_target_modules(self.mm, a) for a in self.mm.adapter_specs}
        mine = self.layer_ranges[self.rank]
        for k in range(len(layers)):
            if k not in mine:
                layers[k] = _Elsewhere(k, next(s for s, r in enumerate(self.layer_ranges) if k in r))
        if not self.last:
            dec.norm = nn.Identity()
            head = _path_of(model, model.get_output_embeddings())
            if head:
                _set_module(model, head, nn.Identity())
        embed = model.get_input_embeddings()
        if not self.first and any(t.is_meta for t in embed.parameters()):
            _set_module(model, _path_of(model, embed), _NotHere(_path_of(model, embed)))
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:  # a module the split does not know (kept meta, not loaded): refuse rather than train on nothing
            raise CoTrainError(f"model: {self.cfg.model} ({type(model).__name__}): pipeline stage {self.rank} found "
                               f"no weights for {meta[:3]} outside the decoder layers, final norm, token embedding and"
                               " output head it splits; run it with stages: 1")
        # the wrapped linears no longer in this stage's model (other stages' layers; an adapted output head on
        # stages before the last)
        self.mm.release_layers([n for n in self.mm.layer_names if not isinstance(_module(model, n), MultiLoRALinear)])
        self.hidden = model.config.hidden_size
        self.mm.to(self.device)
        self._empty = {}

    def _optimized(self, adapter: str) -> list:
        params = self.mm.adapter_parameters(adapter)
        if params:
            return params
        # the adapter targets no linear of this stage's layers: a zero-size stand-in carries its optimizer and
        # schedule (it never has a gradient, so AdamW leaves it alone)
        self._empty[adapter] = nn.Parameter(torch.zeros(0, device=self.device))
        return [self._empty[adapter]]

    def _dropout_seed(self) -> int:
        return (self.cfg.seed * 1_000_003 + 7919 * (self.rank + 1)) % 2**63

    def setup(self):
        self._agree(self._build)
        self._agree(self._check_backend_and_packing)
        self._agree(self._read_evals)

    # -- moving tensors between neighbours
    def _p2p(self, send_next=None, send_prev=None, recv_next=None, recv_prev=None):
        """Post the given sends and receives together and wait for all of them; returns the received tensors
        (``recv_*``: the shape to receive, or None)."""
        ops, got = [], {}
        for tensor, peer in ((send_next, self.rank + 1), (send_prev, self.rank - 1)):
            if tensor is not None:
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer))
        for key, shape, peer in (("next", recv_next, self.rank + 1), ("prev", recv_prev, self.rank - 1)):
            if shape is not None:
                got[key] = torch.empty(shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, got[key], peer))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return got.get("next"), got.get("prev")

    def _stage_forward(self, x, pos, mask):
        """This stage's layers on ``x`` (token ids on the first stage, hidden states after): hidden states, or on
        the last stage the logits."""
        kw = {"input_ids": x} if self.first else {"inputs_embeds": x}
        if self.last:
            return self.mm.model(**kw, position_ids=pos, attention_mask=mask, use_cache=False).logits
        return self.mm.model.get_decoder()(**kw, position_ids=pos, attention_mask=mask,
                                           use_cache=False).last_hidden_state

    def _forward_only(self, ids, pos, mask, layout):
        """One forward through the pipeline (no gradients): the logits on the last stage, None elsewhere."""
        dev = self.device
        shape = (*ids.shape, self.hidden)
        with self.mm.use_segments(layout):
            x = ids.to(dev) if self.first else self._p2p(recv_prev=shape)[1]
            y = self._stage_forward(x, pos.to(dev), None if mask is None else mask.to(dev))
        if not self.last:
            self._p2p(send_next=y)
            return None
        return y

    def _rows_logits(self, rows):
        for ids, pos, adapters in rows:
            out = self._forward_only(torch.tensor([ids]), torch.tensor([pos]), None, self.mm.make_segments(adapters))
            yield None if out is None else out[0]

    def _generator(self, adapter: str):
        return _PipelineGreedy(self, adapter)

    # -- training: one 1F1B pass over microbatches [lo, hi)
    def _segment(self, lo: int, hi: int, inflight: dict, stats: dict, metrics) -> int:
        """Runs microbatches [lo, hi), or [lo, c) when a signal cuts the segment at c; returns where it ended."""
        mbs = self.schedule.microbatches
        dev = self.device
        live: dict[int, tuple] = {}  # microbatch -> (its input (grad wanted), its output or loss)

        def shape(k):
            return None if mbs[k].is_noop else (1, mbs[k].padded_tokens, self.hidden)

        def forward(k, x):
            mb = mbs[k]
            if mb.is_noop:
                return None
            for seg in mb.segments:  # a step this forward must see (the previous global batch of its adapter)
                if seg.adapter in self.pending:
                    self._finish_step(seg.adapter, inflight, stats, metrics)
            ids, pos, tgt, rows, spans = pack_microbatch(mb, self.data, self.pad_id)
            if not self.first:
                x.requires_grad_(True)
            with self.mm.use_segments(self.mm.make_segments(rows)):
                y = self._stage_forward(torch.tensor([ids], device=dev) if self.first else x,
                                        torch.tensor([pos], device=dev), None)
            if not self.last:
                live[k] = (x, y)
                return y.detach()
            stats["tokens"] += mb.real_tokens
            live[k] = (x, self._loss(y[0], tgt, spans, inflight))
            return None

        def backward(k, grad):
            dx = None
            if not mbs[k].is_noop:
                x, y = live.pop(k)
                if y.requires_grad:  # not when no row of it has an adapter here and nothing before this stage
                    torch.autograd.backward(y, None if self.last else grad)
                dx = None if self.first else (x.grad if x.grad is not None else torch.zeros_like(x))
            self._launch_steps(k)
            return dx

        def fwd_send(k, y):  # what goes to the next stage after forward k
            return y if not self.last and not mbs[k].is_noop else None

        def bwd_send(k, dx):
            return dx if not self.first and not mbs[k].is_noop else None

        def recv_fwd(k):
            return None if self.first else shape(k)

        def recv_bwd(k):
            return None if self.last else shape(k)

        ks = list(range(lo, hi))
        n = len(ks)
        S, st = self.world, self.rank
        warm = min(S - st - 1, n)
        # stop checks: a signal on any stage may cut the segment at c (every STOP_CHECK_EVERY microbatches), so a
        # stop does not wait for the next checkpoint boundary (torchrun SIGKILLs its workers 30 s after it passes
        # a signal on). Each stage starts the all-reduce of its stop flag after its backward of b = c - S, and
        # waits for it after its backward of b + s, right before it would post the receive of forward c: by then
        # every stage has started it (stage 0 last, after its backward of b), and none waits on a send held behind
        # a wait. On a cut, that backward is this stage's last of the steady phase of the segment [lo, c).
        checks = {c - S: c for c in range(lo + STOP_CHECK_EVERY, hi, STOP_CHECK_EVERY) if c - S >= lo}
        votes = {}

        def check(kb, steady=True):  # after this stage's backward of kb: the cut position, or None
            if kb in checks:
                flag = torch.tensor([1 if self._stop is not None and self._stop.signal else 0])
                votes[kb] = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.side, async_op=True))
            if steady and kb - st in checks:
                flag, work = votes.pop(kb - st)
                work.wait()
                return checks[kb - st] if int(flag[0]) else None
            return None

        for k in ks[:warm]:
            x = self._p2p(recv_prev=recv_fwd(k))[1]
            self._p2p(send_next=fwd_send(k, forward(k, x)))
        rest = n - warm
        x = self._p2p(recv_prev=recv_fwd(ks[warm]))[1] if rest else None
        i = 0
        while i < rest:
            kf, kb = ks[warm + i], ks[i]
            y = forward(kf, x)
            grad = self._p2p(send_next=fwd_send(kf, y), recv_next=recv_bwd(kb))[0]
            dx = backward(kb, grad)
            cut = check(kb)
            if cut is not None:  # the segment ends at `cut`: this was the last steady iteration
                rest, hi = i + 1, cut
            if i == rest - 1:
                self._p2p(send_prev=bwd_send(kb, dx))
            else:
                x = self._p2p(send_prev=bwd_send(kb, dx), recv_prev=recv_fwd(ks[warm + i + 1]))[1]
            i += 1
        for k in ks[rest:warm + rest]:
            grad = self._p2p(recv_next=recv_bwd(k))[0]
            self._p2p(send_prev=bwd_send(k, backward(k, grad)))
            check(k, steady=False)  # a cut is decided in the steady phase; here flags are only started
        for _, work in votes.values():  # flags of cuts past a cut already made
            work.wait()
        for a in list(self.pending):  # drained: every step of the segment is taken
            self._finish_step(a, inflight, stats, metrics)
        return hi

    def _launch_steps(self, k: int) -> None:
        """After this stage's backward of microbatch ``k``: start the all-reduce of the squared gradient norm of each
        adapter the plan steps after ``k``."""
        for a, g in self.steps_after.get(k, ()):
            norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
                     for p in self.mm.adapter_parameters(a) if p.grad is not None]
            sq = (torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=torch.float64))
            sq = sq.reshape(1).cpu()  # one copy from the device per step
            self.pending[a] = (g, k, sq, dist.all_reduce(sq, group=self.side, async_op=True))

    def _finish_step(self, a: str, inflight: dict, stats: dict, metrics) -> None:
        g, k, sq, work = self.pending.pop(a)
        work.wait()
        norm = math.sqrt(float(sq[0]))
        j = self.jobs_by_name[a]
        if j.max_grad_norm > 0:  # as clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))
            coef = min(1.0, j.max_grad_norm / (norm + 1e-6))
            for p in self.mm.adapter_parameters(a):
                if p.grad is not None:
                    p.grad.mul_(coef)
        lr = self._optimizer_step(a)
        if self.last:
            self._record(a, g, k, lr, norm, inflight, stats, metrics)
        if g == self.data[a].job.num_global_batches - 1:
            self.finished.append(a)

    # -- outputs
    def _write_adapter(self, adapter: str) -> str:
        import shutil

        from lorafusion.multi.io import adapter_tensors, write_adapter

        parts = [None] * self.world if self.last else None
        dist.gather_object(adapter_tensors(self.mm, adapter), parts, dst=self.world - 1, group=self.side)
        folder = os.path.join(self.cfg.output_dir, "adapters", adapter)
        if self.last:
            tensors = {k: v for part in parts for k, v in part.items()}
            tmp = folder + f".tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write_adapter(tmp, tensors, self.mm.adapter_specs[adapter], self.peft_targets[adapter], self.cfg.model)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        return folder

    # -- checkpoints: each stage its own files in one folder, committed by the last stage
    def _save(self, next_mb: int, inflight: dict, stats: dict) -> str:
        from lorafusion.train import checkpoint as ckpt

        out = self.cfg.output_dir

        def guarded(fn):  # a write that fails: the checkpoint error, on every stage
            def call():
                try:
                    return fn()
                except OSError as exc:
                    raise CoTrainError(str(ckpt.write_failed(out, next_mb, exc))) from None
            return call

        tmp = self._from_lead(self._agree(guarded(lambda: ckpt.begin(out, next_mb) if self.last else None)))
        self._agree(guarded(lambda: self._write_files(tmp, next_mb, inflight, stats)))
        return self._from_lead(self._agree(guarded(
            lambda: ckpt.commit(out, next_mb, self.cfg.keep_checkpoints) if self.last else None)))

    def _file(self, name: str) -> str:
        root, ext = name.split(".", 1)
        return f"{root}-stage{self.rank}.{ext}"

    # -- the run
    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """As :meth:`CoTrainer.run`, on every stage; returns the last stage's result on all of them."""
        from lorafusion.train.trainer import TrainError, _Stop, _lock_output

        cfg = self.cfg
        lock = None

        def prepare():
            nonlocal lock
            if not self.last:
                return None
            os.makedirs(cfg.output_dir, exist_ok=True)
            try:
                lock = _lock_output(cfg.output_dir, key="output_dir")
            except TrainError as exc:
                raise CoTrainError(str(exc)) from None
            return self._check_output(resume)

        try:
            latest = self._from_lead(self._agree(prepare))
            self.setup()

            def write_run_files():
                if self.last:
                    atomic_write_json(os.path.join(cfg.output_dir, "cotrain_config.json"), cfg.to_dict())
                    self.schedule.save(os.path.join(cfg.output_dir, "schedule.json"))

            self._agree(write_run_files)
            start, inflight, stats = 0, {}, {"steps": {}, "tokens": 0, "seconds": 0.0}
            if latest is not None:
                start, inflight, stats = self._agree(self._load, latest)
                if self.last:
                    logger.info("resuming from %s (microbatch %d of %d)", latest, start,
                                len(self.schedule.microbatches))
            self._agree(lambda: self._trim_metrics(start) if self.last else None)
            if latest is None and self.evals:
                before = {a: self.evaluate(a) for a in self.evals}
                if self.last:
                    stats["eval_before"] = before
            with _Stop() as stop:
                return self._from_lead(self._loop(start, inflight, stats, stop, stop_after))
        finally:
            if lock is not None:
                os.close(lock)

    def _stop_signal(self, stop) -> str | None:
        """The signal any stage received (all stages agree on whether to stop)."""
        code = torch.tensor([SIGNALS.index(stop.signal) + 1 if stop.signal in SIGNALS else 0])
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.side)
        return SIGNALS[int(code) - 1] if int(code) else None

    def _loop(self, start: int, inflight: dict, stats: dict, stop, stop_after: int | None) -> dict:
        cfg = self.cfg
        n = len(self.schedule.microbatches)
        end = n if stop_after is None else max(start, min(n, stop_after))
        every = cfg.save_every
        bounds = sorted({start, end} | {b for b in range(start + 1, end) if every and b % every == 0})
        metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if self.last else None
        last_saved = start
        self.mm.train()
        try:
            self._stop = stop
            for lo, hi in zip(bounds, bounds[1:]):
                t0 = time.perf_counter()
                hi = self._segment(lo, hi, inflight, stats, metrics)
                stats["seconds"] += time.perf_counter() - t0
                # in the plan's order on every stage (their adapter folders and evals are collective)
                for a in sorted(self.finished, key=lambda a: self.schedule.optimizer_steps[a][-1]):
                    self._job_done(a, stats)
                self.finished = []
                signal = self._stop_signal(stop)
                if (every and hi % every == 0 or signal) and hi < n:
                    self._save(hi, inflight, stats)
                    last_saved = hi
                if signal and hi < n:
                    if self.last:
                        logger.warning("stopped by %s after microbatch %d; --resume continues from there", signal, hi)
                    return {"stopped": signal, "next_microbatch": hi}
            if end > last_saved:
                self._save(end, inflight, stats)
        finally:
            if metrics is not None:
                metrics.close()
        if end < n:
            return {"stopped": "stop_after", "next_microbatch": end}
        from lorafusion.train.trainer import peak_memory_mb

        self.stage_peaks = [None] * self.world  # each stage's peak memory (GPU allocated, or host RSS), in MiB
        dist.all_gather_object(self.stage_peaks, peak_memory_mb(self.device), group=self.side)
        return self._summary(stats) if self.last else None

    def _run_info(self) -> dict:
        return {"pipeline": {"processes": self.world, "layers": [[r.start, r.stop] for r in self.layer_ranges],
                             "peak_memory_mb": self.stage_peaks}}


def die_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere): a stage
    whose launcher was killed stops, checkpointed, instead of running on unwatched."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_pipeline(cfg: CoTrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Join the launcher's process group, run this process's stage, leave the group."""
    die_with_parent()
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend)
    except Exception as exc:  # noqa: BLE001 -- no NCCL in this torch build, a rendezvous that fails, ...
        err = CoTrainError(f"device: cannot start the pipeline's process group ({backend}): "
                           f"{type(exc).__name__}: {exc}")
        err.quiet = not is_lead()
        raise err from None
    try:
        return PipelineCoTrainer(cfg).run(resume=resume, stop_after=stop_after)
    finally:
        dist.destroy_process_group()
