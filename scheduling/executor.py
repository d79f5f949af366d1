"""Co-train several jobs' LoRA adapters over one frozen base model, following a planner :class:`Schedule`.

    lorafusion cotrain --config cotrain.yaml [--resume]

Each job brings its own data (a JSONL file of ``{"prompt", "completion"}`` or ``{"text"}`` records, or
``builtin:lowercase``), its global batch size and length, its LoRA settings and its optimizer settings. The executor

1. tokenizes every job's data as ``lorafusion train`` does (prompt tokens masked out of the loss, EOS appended),
2. plans the jobs with :func:`scheduling.planner.plan` (sample ids are record indices; a job's records are cut into
   global batches in file order, epoch after epoch, the last of an epoch short where the batch size does not divide
   the record count) and checks the schedule with :func:`scheduling.verify.check`,
3. wraps the base model's linears in :class:`lorafusion.MultiLoRAModel` with one adapter per job,
4. runs the microbatches in schedule order. A microbatch is one packed row: each segment's samples one after another
   (position ids restart at every sample, so no sample attends to another; the model's attention must honour packed
   position ids, as ``transformers``' models do), each segment padded to its planned token count. Every token row is
   tagged with its segment's adapter, so the multi-adapter kernels apply each job's adapter to its own rows only.
5. The loss of a job's global batch is the mean next-token cross-entropy over all its label tokens, the same as
   training that global batch alone in one batch; each microbatch adds its share to the adapter's gradient, and the
   job's optimizer steps (AdamW, with its own warm-up and schedule, gradient clipping) after the microbatch the
   schedule names for that global batch. One job's rows never touch another job's adapter or optimizer.
6. checkpoints atomically every ``save_every`` microbatches (adapters, the gradients of global batches in flight,
   optimizers, schedules, RNG) so ``--resume`` continues a killed run to the adapters an uninterrupted run ends
   with, and writes each job's adapter as a standard PEFT folder (``adapters/<job>/``) when its last step is done.

This executor runs the whole model in one process, microbatch after microbatch: the schedule's order, capacity and
per-segment padding are honoured exactly, its no-op slots (which only matter between pipeline stages) are skipped.
Under ``torchrun --nproc_per_node S`` (``stages: S``), :class:`scheduling.pipeline.PipelineCoTrainer` runs the same
plan pipeline-parallel, one stage per process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from lorafusion.train.checkpoint import atomic_write_json, atomic_write_text

from .jobs import Job, PlanParams
from .schedule import Microbatch

logger = logging.getLogger("lorafusion.cotrain")
IGNORE_INDEX = -100
PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
SCHEDULES = ("cosine", "linear", "constant")


class CoTrainError(RuntimeError):
    """A co-training run cannot start or continue; the message says why."""


# ----------------------------------------------------------------------------------------------- config
@dataclass
class CoJobConfig:
    adapter: str = ""
    data: str = ""                       # JSONL path (relative to the config file) or builtin:lowercase
    global_batch_size: int = 16
    num_global_batches: Optional[int] = None   # or epochs; neither: one epoch
    epochs: Optional[int] = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Optional[list] = None      # names or dotted suffixes; None: every wrapped linear
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"           # cosine / linear / constant, each after a linear warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 0.0           # 0: no clipping
    eval_data: Optional[str] = None      # JSONL path (relative to the config file), or builtin:lowercase (eval split)
    max_eval_samples: int = 200
    generate_eval: bool = True           # greedy exact match on the eval prompts (prompt / completion records)
    max_new_tokens: int = 32


@dataclass
class CoTrainConfig:
    model: str = "builtin:tiny-llama"    # a local Hugging Face causal-LM folder, or builtin:tiny-llama
    output_dir: str = "runs/cotrain"
    capacity: int = 512                  # tokens per microbatch
    pad_multiple: int = 1                # each adapter segment padded to a multiple of this (128 for GPU kernels)
    stages: int = 1                      # pipeline stages the plan is made for
    target_modules: Optional[list] = None  # the linears wrapped for adapters; None: every linear but the LM head
    seed: int = 0
    precision: str = "fp32"              # fp32 / fp64 / bf16 (bf16: base in bf16, adapters and optimizers fp32)
    device: str = "cpu"                  # cpu / cuda
    backend: Optional[str] = None        # lorafusion backend of the multi-adapter layers; None: auto
    save_every: int = 50                 # microbatches between checkpoints; 0: only at the end and on a signal
    keep_checkpoints: int = 2
    num_threads: Optional[int] = None
    jobs: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# keys that may change between a run and its --resume (everything else fixes the run)
RESUMABLE_KEYS = ("output_dir", "save_every", "keep_checkpoints", "num_threads")


def _fail(key: str, value, why: str):
    from lorafusion.train.config import ConfigError

    raise ConfigError(f"{key}: {why} (got {value!r})")


def load_cotrain_config(path: str | None = None, overrides: dict | None = None) -> CoTrainConfig:
    """Defaults <- YAML file <- overrides (``{"capacity": 1024, ...}``), then type and value checks; a
    ``ConfigError`` names the key and the value. Relative data paths are read from the config file's folder."""
    from lorafusion.train.config import ConfigError, _build, read_yaml_mapping

    data: dict = {}
    base_dir = "."
    if path is not None:
        base_dir = os.path.dirname(os.path.abspath(path))
        data = read_yaml_mapping(path)
    data = {**data, **(overrides or {})}
    jobs = data.get("jobs")
    cfg = _build(CoTrainConfig, {k: v for k, v in data.items() if k != "jobs"}, "")
    if not isinstance(jobs, list) or not jobs:
        raise ConfigError(f"jobs: a non-empty list of jobs is needed (got {jobs!r})")
    cfg.jobs = [_build(CoJobConfig, j, f"jobs[{i}]") for i, j in enumerate(jobs)]
    for j in cfg.jobs:
        for key in ("data", "eval_data"):
            v = getattr(j, key)
            if v and not v.startswith("builtin:") and not os.path.isabs(v):
                setattr(j, key, os.path.normpath(os.path.join(base_dir, v)))
    return validate(cfg)


def validate(cfg: CoTrainConfig) -> CoTrainConfig:
    from lorafusion.multi.segments import MAX_RANK

    for key in ("capacity", "pad_multiple", "stages", "keep_checkpoints"):
        if getattr(cfg, key) < 1:
            _fail(key, getattr(cfg, key), "must be a positive integer")
    if cfg.pad_multiple > cfg.capacity:
        _fail("pad_multiple", cfg.pad_multiple, f"must not exceed capacity {cfg.capacity}")
    if cfg.save_every < 0:
        _fail("save_every", cfg.save_every, "must be 0 (only at the end) or a positive number of microbatches")
    if not 0 <= cfg.seed < 2**63:
        _fail("seed", cfg.seed, "must be in [0, 2**63)")
    if cfg.precision not in PRECISIONS:
        _fail("precision", cfg.precision, f"must be one of {', '.join(PRECISIONS)}")
    if cfg.device not in ("cpu", "cuda"):
        _fail("device", cfg.device, "must be cpu or cuda")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        _fail("num_threads", cfg.num_threads, "must be a positive integer or null")
    if cfg.backend is not None:
        from lorafusion.backends import resolve_backend_name

        try:
            resolve_backend_name(cfg.backend)
        except ValueError as exc:
            _fail("backend", cfg.backend, str(exc))
    _check_targets("target_modules", cfg.target_modules)
    seen = set()
    for i, j in enumerate(cfg.jobs):
        key = f"jobs[{i}]"
        if not j.adapter:
            _fail(f"{key}.adapter", j.adapter, "every job needs an adapter name")
        from lorafusion.multi.layer import check_adapter_name

        try:
            check_adapter_name(j.adapter)
        except ValueError as exc:
            _fail(f"{key}.adapter", j.adapter, str(exc))
        if j.adapter in seen:
            _fail(f"{key}.adapter", j.adapter, "is the name of an earlier job too")
        seen.add(j.adapter)
        key = f"jobs[{i}] ({j.adapter})"
        if not j.data:
            _fail(f"{key}.data", j.data, "every job needs its data: a JSONL file or builtin:lowercase")
        if j.global_batch_size < 1:
            _fail(f"{key}.global_batch_size", j.global_batch_size, "must be a positive integer")
        if j.num_global_batches is not None and j.epochs is not None:
            _fail(f"{key}.epochs", j.epochs, "give num_global_batches or epochs, not both")
        for name in ("num_global_batches", "epochs"):
            v = getattr(j, name)
            if v is not None and v < 1:
                _fail(f"{key}.{name}", v, "must be a positive integer or null")
        if not 1 <= j.r <= MAX_RANK:
            _fail(f"{key}.r", j.r, f"must be in [1, {MAX_RANK}]")
        if not j.alpha > 0:
            _fail(f"{key}.alpha", j.alpha, "must be positive")
        if not 0.0 <= j.dropout < 1.0:
            _fail(f"{key}.dropout", j.dropout, "must be in [0, 1)")
        if not j.lr > 0:
            _fail(f"{key}.lr", j.lr, "must be positive")
        if j.weight_decay < 0:
            _fail(f"{key}.weight_decay", j.weight_decay, "must be >= 0")
        if len(j.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                        for b in j.betas):
            _fail(f"{key}.betas", j.betas, "must be two numbers in [0, 1)")
        if not j.eps > 0:
            _fail(f"{key}.eps", j.eps, "must be positive")
        if j.schedule not in SCHEDULES:
            _fail(f"{key}.schedule", j.schedule, f"must be one of {', '.join(SCHEDULES)}")
        if j.warmup_steps < 0:
            _fail(f"{key}.warmup_steps", j.warmup_steps, "must be >= 0")
        if not 0.0 <= j.min_lr_ratio <= 1.0:
            _fail(f"{key}.min_lr_ratio", j.min_lr_ratio, "must be in [0, 1]")
        if j.max_grad_norm < 0:
            _fail(f"{key}.max_grad_norm", j.max_grad_norm, "must be >= 0 (0: no clipping)")
        if j.max_eval_samples < 1:
            _fail(f"{key}.max_eval_samples", j.max_eval_samples, "must be a positive integer")
        if j.max_new_tokens < 1:
            _fail(f"{key}.max_new_tokens", j.max_new_tokens, "must be a positive integer")
        _check_targets(f"{key}.target_modules", j.target_modules)
    return cfg


def _check_targets(key: str, targets) -> None:
    if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
        _fail(key, targets, "must be a non-empty list of module names, or null")


def adapter_seed(seed: int, adapter: str) -> int:
    """The seed of adapter ``adapter``'s initial weights in a run seeded ``seed``."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(adapter.encode())) % 2**63


# ----------------------------------------------------------------------------------------------- data
@dataclass
class TokenizedJob:
    """One job's samples as the executor feeds them: ids, next-token targets (-100: no loss) and the plan's Job."""
    ids: list[list[int]]
    targets: list[list[int]]
    job: Job
    lines: list[int]                     # the data file's line of every sample (for messages)

    def loss_tokens(self, samples) -> int:
        return sum(sum(1 for t in self.targets[s] if t != IGNORE_INDEX) for s in samples)


def builtin_data_path(path: str, default_split: str, where: str) -> str:
    """The JSONL file of ``builtin:NAME`` (its ``default_split``) or ``builtin:NAME:train`` / ``builtin:NAME:eval``."""
    from lorafusion.train.presets import data_preset_paths

    name, _, split = path[len("builtin:"):].partition(":")
    split = split or default_split
    if split not in ("train", "eval"):
        raise CoTrainError(f"{where}: {path!r} names no split of builtin:{name} (train or eval)")
    try:
        train, evals = data_preset_paths(name)
    except ValueError as exc:
        raise CoTrainError(f"{where}: {str(exc).replace('data.train: ', '')}") from None
    return evals if split == "eval" else train


def read_samples(path: str, tokenizer, max_tokens: int, where: str, limit: int | None = None,
                 default_split: str = "train", too_long: str = ""):
    """``(ids, targets, lines, records)`` of a JSONL file, tokenized as ``lorafusion train`` does (prompt tokens
    out of the loss, EOS appended); ``builtin:NAME[:train|:eval]`` is a built-in dataset's split (``default_split``
    without one). A sample longer than ``max_tokens`` (``too_long`` says why that is the limit) or with no label
    token is an error naming ``where``, the file and the line."""
    from lorafusion.train.data import DataError, jsonl_values, record_problem, record_tokens

    if path.startswith("builtin:"):
        path = builtin_data_path(path, default_split, where)
    if not os.path.isfile(path):
        raise CoTrainError(f"{where}: {path} is not a file")
    ids, targets, lines, records = [], [], [], []
    try:
        for lineno, rec, problem in jsonl_values(path):
            if problem is None:
                problem = record_problem(rec) if isinstance(rec, dict) else f"not a JSON object ({rec!r})"
            if problem is not None:
                raise CoTrainError(f"{where}: {path} line {lineno}: {problem}")
            x, labels = record_tokens(rec, tokenizer)
            if len(x) > max_tokens:
                raise CoTrainError(f"{where}: {path} line {lineno} has {len(x)} tokens, more than the {max_tokens} "
                                   f"{too_long or 'a microbatch holds'}; raise capacity or shorten the sample")
            tgt = labels[1:] + [IGNORE_INDEX]  # position t predicts token t+1 of the same sample
            if all(t == IGNORE_INDEX for t in tgt):
                raise CoTrainError(f"{where}: {path} line {lineno} has no completion token to learn from")
            ids.append(x)
            targets.append(tgt)
            lines.append(lineno)
            records.append(rec)
            if limit is not None and len(ids) >= limit:
                break
    except (OSError, DataError) as exc:
        raise CoTrainError(f"{where}: {path} cannot be read: {exc}") from None
    if not ids:
        raise CoTrainError(f"{where}: {path} has no records")
    return ids, targets, lines, records


def tokenize_job(j: CoJobConfig, tokenizer, params: PlanParams, where: str) -> TokenizedJob:
    """Read and tokenize one job's data into a planner :class:`Job` (sample id = record index)."""
    why = (f"a microbatch holds (capacity {params.capacity})" if params.max_piece == params.capacity else
           f"tokens a microbatch holds once padded (capacity {params.capacity}, pad_multiple {params.pad_multiple})")
    ids, targets, lines, _ = read_samples(j.data, tokenizer, params.max_piece, f"{where}.data", too_long=why)
    if j.global_batch_size > len(ids):
        raise CoTrainError(f"{where}.global_batch_size: {j.global_batch_size} is more than the {len(ids)} samples "
                           f"of {j.data}")
    if j.num_global_batches is not None:
        num_gb = j.num_global_batches
    else:
        num_gb = (j.epochs or 1) * math.ceil(len(ids) / j.global_batch_size)
    try:
        job = Job(j.adapter, tuple(len(x) for x in ids), j.global_batch_size, num_gb)
    except ValueError as exc:
        raise CoTrainError(f"{where}: {exc}") from None
    return TokenizedJob(ids, targets, job, lines)


def pack_microbatch(mb: Microbatch, data: dict[str, TokenizedJob], pad_id: int):
    """One packed row for microbatch ``mb``: ``(ids, position_ids, targets, row_adapters, spans)`` where spans are
    ``(adapter, global batch, start, end)`` of each segment in the row (its padding included)."""
    ids, pos, tgt, rows, spans = [], [], [], [], []
    for seg in mb.segments:
        tj = data[seg.adapter]
        start = len(ids)
        for s, n in zip(seg.samples, seg.tokens):
            if n != len(tj.ids[s]):
                raise CoTrainError(f"schedule: job {seg.adapter!r} sample {s} is planned as {n} tokens but has "
                                   f"{len(tj.ids[s])}: the schedule is not of this data (split samples are not run)")
            ids += tj.ids[s]
            tgt += tj.targets[s]
            pos += range(n)
        pad = seg.padded_tokens - seg.real_tokens
        if pad:  # the padding is one more "sample" no real token attends to, with no loss
            ids += [pad_id] * pad
            tgt += [IGNORE_INDEX] * pad
            pos += range(pad)
        rows += [seg.adapter] * (len(ids) - start)
        spans.append((seg.adapter, seg.global_batch, start, len(ids)))
    return ids, pos, tgt, rows, spans


# ----------------------------------------------------------------------------------------------- the run
class _OneAdapter:
    """A ``MultiLoRAModel`` seen as a model with one adapter, for ``generate`` (every sequence uses ``adapter``)."""

    def __init__(self, mm, adapter: str):
        self.mm, self.adapter = mm, adapter

    @property
    def training(self) -> bool:
        return self.mm.training

    def train(self, mode: bool = True):
        self.mm.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def generate(self, input_ids, **kwargs):
        return self.mm.generate(input_ids=input_ids, adapter_names=[self.adapter] * input_ids.shape[0], **kwargs)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CoTrainer:
    """The executor. ``CoTrainer(cfg).run(resume=False)`` -> the summary dict (also ``summary.json``)."""

    def __init__(self, cfg: CoTrainConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = PRECISIONS[cfg.precision]

    # -- set-up
    def model_path(self) -> str:
        """The local folder of the base model (a built-in one made on first use)."""
        from lorafusion.train.presets import model_folder

        try:
            return model_folder(self.cfg.model)
        except ValueError as exc:
            raise CoTrainError(f"model: {exc}") from None

    def load_tokenizer(self):
        """The base model's tokenizer as the executor uses it (EOS checked, EOS as the pad token where none)."""
        from transformers import AutoTokenizer

        from lorafusion.train.data import check_eos

        path = self.model_path()
        try:
            tok = AutoTokenizer.from_pretrained(path)
            check_eos(tok)
        except Exception as exc:  # noqa: BLE001
            raise CoTrainError(f"model: cannot load a tokenizer from {path}: {exc}") from None
        tok.model_max_length = 2**62  # samples are checked against the capacity here, not cut
        if tok.pad_token_id is None:  # most Llama tokenizers: padding (generation, segments) uses EOS
            tok.pad_token = tok.eos_token
        return tok

    def _load_model(self, device: torch.device | None = None):
        from transformers import AutoModelForCausalLM

        path = self.model_path()
        tok = self.load_tokenizer()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        except Exception as exc:  # noqa: BLE001
            raise CoTrainError(f"model: cannot load {path}: {type(exc).__name__}: {exc}") from None
        model.config.use_cache = False
        return model.to(self.device if device is None else device), tok

    def setup(self):
        """Model, data, plan, adapters and optimizers; the backend and packing check; the eval data."""
        self._build()
        self._check_backend_and_packing()
        self._read_evals()

    def _build(self):
        from lorafusion.multi import MultiLoRAModel
        from lorafusion.train.trainer import lr_schedule

        from .planner import plan
        from .verify import check

        cfg = self.cfg
        if cfg.device == "cuda" and not torch.cuda.is_available():
            _fail("device", cfg.device, "no CUDA device is available")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        base, self.tokenizer = self._load_model()
        self.pad_id = self.tokenizer.pad_token_id
        self.params = PlanParams(cfg.capacity, cfg.pad_multiple, cfg.stages)
        self.data = {j.adapter: tokenize_job(j, self.tokenizer, self.params, f"jobs[{i}] ({j.adapter})")
                     for i, j in enumerate(cfg.jobs)}
        jobs = [self.data[j.adapter].job for j in cfg.jobs]
        t0 = time.perf_counter()
        self.schedule = plan(jobs, self.params, seed=cfg.seed)
        self.plan_seconds = time.perf_counter() - t0
        check(self.schedule, jobs, self.params)
        torch.manual_seed(cfg.seed)
        try:
            self.mm = MultiLoRAModel(base, target_modules=cfg.target_modules or "all-linear", backend=cfg.backend)
        except ValueError as exc:
            raise CoTrainError(f"target_modules: {exc}") from None
        adapter_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        for i, j in enumerate(cfg.jobs):
            # each adapter's initial weights from (seed, its name) alone, and each layer's from that and its path: a
            # job starts from the same adapter whatever jobs it is batched with, in whatever order, on whatever
            # device, and on a pipeline stage holding only some of the layers
            try:
                self.mm.add_adapter(j.adapter, r=j.r, alpha=j.alpha, dropout=j.dropout, use_rslora=j.use_rslora,
                                    dtype=adapter_dtype, target_modules=j.target_modules,
                                    init_seed=adapter_seed(cfg.seed, j.adapter))
            except ValueError as exc:
                raise CoTrainError(f"jobs[{i}] ({j.adapter}): {exc}") from None
        self._place()
        self.optimizers, self.schedulers = {}, {}
        for j in cfg.jobs:
            opt = torch.optim.AdamW(self._optimized(j.adapter), lr=j.lr, betas=tuple(j.betas), eps=j.eps,
                                    weight_decay=j.weight_decay)
            self.optimizers[j.adapter] = opt
            self.schedulers[j.adapter] = lr_schedule(opt, j.schedule, j.warmup_steps, j.min_lr_ratio,
                                                     self.data[j.adapter].job.num_global_batches)
        # the optimizer step of (adapter, global batch) after microbatch i: {i: [(adapter, g), ...]}
        self.steps_after: dict[int, list] = {}
        for a, idx in self.schedule.optimizer_steps.items():
            for g, i in enumerate(idx):
                self.steps_after.setdefault(i, []).append((a, g))
        self.loss_tokens = {(a, g): self.data[a].loss_tokens(self.data[a].job.global_batch_samples(g))
                            for a, idx in self.schedule.optimizer_steps.items() for g in range(len(idx))}
        self.jobs_by_name = {j.adapter: j for j in cfg.jobs}
        # what a checkpoint must have been written for: this schedule, and per job, these tokens (a resume on
        # changed data of the same lengths is refused); fixed for the run, so worked out once
        self.schedule_digest = _digest(self.schedule.to_json())
        self.data_digest = {a: _digest(json.dumps([tj.ids, tj.targets])) for a, tj in self.data.items()}

    def _place(self) -> None:
        """Where the adapted model is put before the optimizers are made (one process: it is on its device)."""

    def _optimized(self, adapter: str) -> list:
        """The parameters adapter ``adapter``'s optimizer steps here."""
        return self.mm.adapter_parameters(adapter)

    def _read_evals(self) -> None:
        cfg = self.cfg
        self.evals = {}
        for i, j in enumerate(cfg.jobs):
            if j.eval_data:
                ids, targets, _, records = read_samples(j.eval_data, self.tokenizer, cfg.capacity,
                                                        f"jobs[{i}] ({j.adapter}).eval_data", j.max_eval_samples,
                                                        default_split="eval")
                prompts = [r for r in records if "prompt" in r]
                if j.generate_eval and not prompts:
                    logger.warning("jobs[%d] (%s): eval_data %s has no prompt / completion records, so no exact "
                                   "match is measured (only the eval loss)", i, j.adapter, j.eval_data)
                self.evals[j.adapter] = (ids, targets, prompts)
        torch.manual_seed(self._dropout_seed())  # the dropout masks' stream

    def _dropout_seed(self) -> int:
        return self.cfg.seed

    def _row_logits(self, ids: list, pos: list, rows: list) -> torch.Tensor:
        """The logits of one packed row: token ids, their position ids (restarting at every sample) and each
        token's adapter (or None)."""
        dev = self.device
        with self.mm.use_segments(self.mm.make_segments(rows)):
            return self.mm.model(input_ids=torch.tensor([ids], device=dev),
                                 position_ids=torch.tensor([pos], device=dev), use_cache=False).logits[0]

    def _rows_logits(self, rows):
        """The logits of packed rows ``(ids, pos, row adapters)``, one after another (no gradients needed)."""
        for ids, pos, adapters in rows:
            yield self._row_logits(ids, pos, adapters)

    @torch.no_grad()
    def _check_backend_and_packing(self) -> None:
        """The multi-adapter backend runs here, and the model keeps packed samples apart: a sample's logits in a
        packed row must not change when the sample before it changes (a model whose attention ignores packed
        position ids, as ALiBi models such as Bloom do, would train on samples attending to each other)."""
        from lorafusion.multi.backends import get_multi_backend

        try:
            get_multi_backend(self.device.type, self.cfg.backend, self.dtype)
        except (RuntimeError, TypeError) as exc:
            raise CoTrainError(f"backend: {exc}") from None
        tj = self.data[self.cfg.jobs[0].adapter]
        vocab = self.mm.model.config.vocab_size
        second = tj.ids[0][: max(2, self.cfg.capacity // 2)]
        first = [7 % vocab, 11 % vocab, 13 % vocab][: max(1, min(3, self.cfg.capacity - len(second)))]
        other = [(t * 5 + 3) % vocab for t in first]
        name = self.cfg.jobs[0].adapter
        rows = [(lead + second, list(range(len(lead))) + list(range(len(second))), [name] * (len(lead) + len(second)))
                for lead in (first, other)]
        was = self.mm.training
        self.mm.eval()  # no dropout: the two forwards must differ only by the leading sample
        outs = [None if x is None else x[len(first):].double() for x in self._rows_logits(rows)]
        self.mm.train(was)
        if outs[0] is None:  # a pipeline stage without the output head: the last stage judges
            return
        leak = float((outs[0] - outs[1]).abs().max())
        if leak > 1e-6 * (1.0 + float(outs[0].abs().max())):
            raise CoTrainError(f"model: {self.cfg.model} ({type(self.mm.model).__name__}) lets packed samples attend "
                               f"to each other (a sample's logits moved by {leak:.3g} when the sample before it in the "
                               "row changed): its attention ignores the packed position ids, so the executor cannot "
                               "pack its samples; use a model whose attention honours them (Llama, Mistral, Qwen2, "
                               "...)")

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, adapter: str) -> dict:
        """Adapter ``adapter`` on its job's eval data: the mean next-token loss over the label tokens (the eval
        samples packed into rows of at most ``capacity`` tokens, as training runs them), and the greedy exact match
        of the prompt / completion records (``generate_eval``)."""
        from lorafusion.train.trainer import exact_match

        ids, targets, records = self.evals[adapter]
        job = self.jobs_by_name[adapter]
        rows, row, pos, tgt = [], [], [], []
        for k in range(len(ids) + 1):
            if k == len(ids) or len(row) + len(ids[k]) > self.cfg.capacity:
                rows.append((row, pos, tgt))
                row, pos, tgt = [], [], []
            if k < len(ids):
                row += ids[k]
                pos += range(len(ids[k]))
                tgt += targets[k]
        was = self.mm.training
        self.mm.eval()
        try:
            total, count = 0.0, 0
            for (_, _, tgt), logits in zip(rows, self._rows_logits((r, p, [adapter] * len(r)) for r, p, _ in rows)):
                if logits is None:  # a pipeline stage without the output head
                    continue
                t = torch.tensor(tgt, device=self.device)
                total += float(F.cross_entropy(logits.double(), t, ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((t != IGNORE_INDEX).sum())
            out = {"eval_loss": total / count if count else None}
            if job.generate_eval and records:
                out["eval_exact_match"] = exact_match(self._generator(adapter), self.tokenizer, records,
                                                      job.max_new_tokens, self.device, contextlib.nullcontext)
            return out
        finally:
            self.mm.train(was)

    def _generator(self, adapter: str):
        """What generates with adapter ``adapter`` for the exact match (``.generate`` as transformers')."""
        return _OneAdapter(self.mm, adapter)

    # -- checkpoints
    def _state(self, next_mb: int, inflight: dict, stats: dict) -> dict:
        return {"next_microbatch": next_mb, "schedule_digest": self.schedule_digest, "data_digest": self.data_digest,
                "inflight_loss": [[a, g, v] for (a, g), v in sorted(inflight.items())], "stats": stats,
                "processes": self.processes}

    processes = 1  # pipeline stages run by separate processes (one: the whole model here)

    def _check_state(self, path: str, state: dict) -> None:
        """The checkpoint's state file ``state`` was written by a run of this schedule, data and process count."""
        if state.get("schedule_digest") != self.schedule_digest:
            raise CoTrainError(f"checkpoint {path} was written for another schedule (a changed config or data); "
                               "resume with the run's own config and data, or start a new output_dir")
        changed = sorted(a for a, d in self.data_digest.items() if state.get("data_digest", {}).get(a) != d)
        if changed:
            raise CoTrainError(f"checkpoint {path}: the data of job(s) {', '.join(changed)} changed since it was "
                               "written; resume on the run's own data, or start a new output_dir")
        was = state.get("processes", 1)
        if was != self.processes:
            how = ("one process (lorafusion cotrain ...)" if was == 1 else
                   f"`torchrun --nproc_per_node {was} -m lorafusion cotrain ...`")
            raise CoTrainError(f"checkpoint {path} was written by a run of {was} process(es), one per pipeline "
                               f"stage, and this run has {self.processes}; resume it with {how}")

    def _file(self, name: str) -> str:
        """The name of a checkpoint file this process writes (a pipeline stage: its own)."""
        return name

    writes_state = True  # this process writes the run's state file into a checkpoint

    def _write_files(self, tmp: str, next_mb: int, inflight: dict, stats: dict) -> None:
        from safetensors.torch import save_file

        from lorafusion.train import checkpoint as ckpt

        weights, grads = {}, {}
        for a in self.optimizers:
            for k, p in enumerate(self.mm.adapter_parameters(a)):
                weights[f"{a}/{k}"] = p.detach().cpu().contiguous()
                if p.grad is not None:
                    grads[f"{a}/{k}"] = p.grad.detach().cpu().contiguous()
        save_file(weights, os.path.join(tmp, self._file("adapters.safetensors")))
        save_file(grads, os.path.join(tmp, self._file("grads.safetensors")))
        torch.save({a: o.state_dict() for a, o in self.optimizers.items()},
                   os.path.join(tmp, self._file("optimizers.pt")))
        torch.save({a: s.state_dict() for a, s in self.schedulers.items()},
                   os.path.join(tmp, self._file("schedulers.pt")))
        torch.save(ckpt.rng_state(), os.path.join(tmp, self._file("rng.pt")))
        if self.writes_state:
            atomic_write_json(os.path.join(tmp, "cotrain_state.json"), self._state(next_mb, inflight, stats))

    def _save(self, next_mb: int, inflight: dict, stats: dict) -> str:
        from lorafusion.train import checkpoint as ckpt

        out = self.cfg.output_dir
        try:
            tmp = ckpt.begin(out, next_mb)
            self._write_files(tmp, next_mb, inflight, stats)
            return ckpt.commit(out, next_mb, self.cfg.keep_checkpoints)
        except OSError as exc:
            raise CoTrainError(str(ckpt.write_failed(out, next_mb, exc))) from None

    def _load(self, path: str) -> tuple[int, dict, dict]:
        from safetensors.torch import load_file

        from lorafusion.train import checkpoint as ckpt

        try:
            with open(os.path.join(path, "cotrain_state.json")) as fh:
                state = json.load(fh)
            self._check_state(path, state)
            weights = load_file(os.path.join(path, self._file("adapters.safetensors")))
            grads = load_file(os.path.join(path, self._file("grads.safetensors")))
            opts = torch.load(os.path.join(path, self._file("optimizers.pt")), weights_only=True)
            scheds = torch.load(os.path.join(path, self._file("schedulers.pt")), weights_only=True)
            rng = torch.load(os.path.join(path, self._file("rng.pt")), weights_only=False)
        except CoTrainError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CoTrainError(f"checkpoint {path} is corrupt or unreadable: {type(exc).__name__}: {exc}; "
                               f"complete checkpoints: {', '.join(ckpt.complete_checkpoints(self.cfg.output_dir))}") \
                from None
        with torch.no_grad():
            for a in self.optimizers:
                for k, p in enumerate(self.mm.adapter_parameters(a)):
                    p.copy_(weights[f"{a}/{k}"])
                    g = grads.get(f"{a}/{k}")
                    p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        for a in self.optimizers:
            self.optimizers[a].load_state_dict(opts[a])
            self.schedulers[a].load_state_dict(scheds[a])
        ckpt.set_rng_state(rng)
        inflight = {(a, g): v for a, g, v in state["inflight_loss"]}
        return int(state["next_microbatch"]), inflight, state["stats"]

    # -- outputs
    def _write_adapter(self, adapter: str) -> str:
        from lorafusion.multi.io import save_adapter

        folder = os.path.join(self.cfg.output_dir, "adapters", adapter)
        tmp = folder + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.mm, adapter, tmp, base_model_name_or_path=self.cfg.model)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    def _check_output(self, resume: bool) -> str | None:
        from lorafusion.train import checkpoint as ckpt
        from lorafusion.train.config import ConfigError

        out = self.cfg.output_dir
        cfg_path = os.path.join(out, "cotrain_config.json")
        ours = os.path.exists(cfg_path)
        other_run = os.path.isdir(ckpt.checkpoints_dir(out)) or os.path.exists(os.path.join(out, "metrics.jsonl"))
        if not ours and other_run:
            raise CoTrainError(f"output_dir {out} holds checkpoints or metrics but no cotrain_config.json: it is not a "
                               "co-training run (a lorafusion train run?); choose another output_dir")
        if ours and not resume:
            raise CoTrainError(f"output_dir {out} holds an earlier co-training run; pass --resume to continue it, "
                               "or choose another output_dir")
        if not ours:
            return None  # nothing to resume: a fresh start
        with open(cfg_path) as fh:
            saved = json.load(fh)
        now = self.cfg.to_dict()
        for d in (saved, now):  # where the data lies may change (a moved folder, another mount): its tokens may
            for j in d.get("jobs") or []:  # not, and the checkpoint's per-job token digest checks them
                if isinstance(j, dict):
                    j.pop("data", None)
                    j.pop("eval_data", None)
        differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k))
        if differ:
            raise ConfigError(f"--resume: {', '.join(differ)} differ(s) from the run in {out} "
                              f"(was {[saved.get(k) for k in differ]}, now {[now.get(k) for k in differ]})")
        return ckpt.latest(out)

    # -- the loop
    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Run the schedule (from the latest checkpoint with ``resume``). ``stop_after``: stop, checkpointed, once
        that many microbatches of the schedule are done (for tests and time-boxed slots)."""
        from lorafusion.train.trainer import TrainError, _Stop, _lock_output

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        try:
            lock = _lock_output(cfg.output_dir, key="output_dir")
        except TrainError as exc:
            raise CoTrainError(str(exc)) from None
        try:
            latest = self._check_output(resume)
            self.setup()
            atomic_write_json(os.path.join(cfg.output_dir, "cotrain_config.json"), cfg.to_dict())
            self.schedule.save(os.path.join(cfg.output_dir, "schedule.json"))
            start, inflight, stats = 0, {}, {"steps": {}, "tokens": 0, "seconds": 0.0}
            if latest is not None:
                start, inflight, stats = self._load(latest)
                logger.info("resuming from %s (microbatch %d of %d)", latest, start, len(self.schedule.microbatches))
            self._trim_metrics(start)
            if latest is None and self.evals:  # the adapters before training (B = 0: the base model)
                stats["eval_before"] = {a: self.evaluate(a) for a in self.evals}
            with _Stop() as stop:
                return self._loop(start, inflight, stats, stop, stop_after)
        finally:
            if lock is not None:
                os.close(lock)

    def _trim_metrics(self, start: int) -> None:
        """Drops the metrics lines of optimizer steps after microbatch ``start`` (a killed run's steps past its last
        checkpoint, which the resumed run redoes), so every step is logged once."""
        path = os.path.join(self.cfg.output_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as fh:
            lines = fh.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["after_microbatch"] < start:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut by the kill
                continue
        if len(keep) != len(lines):
            atomic_write_text(path, "".join(keep))

    def _loop(self, start: int, inflight: dict, stats: dict, stop, stop_after: int | None) -> dict:
        cfg = self.cfg
        mbs = self.schedule.microbatches
        end = len(mbs) if stop_after is None else min(len(mbs), stop_after)
        metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a")
        self.mm.train()
        t_run = time.perf_counter()
        last_saved = start
        try:
            for i in range(start, end):
                mb = mbs[i]
                if not mb.is_noop:
                    stats["tokens"] += self._microbatch(mb, inflight)
                for a, g in self.steps_after.get(i, ()):
                    self._step(a, g, i, inflight, stats, metrics)
                done = i + 1
                if (cfg.save_every and done % cfg.save_every == 0 or stop.signal) and done < len(mbs):
                    stats["seconds"] += time.perf_counter() - t_run
                    t_run = time.perf_counter()
                    self._save(done, inflight, stats)
                    last_saved = done
                if stop.signal and done < len(mbs):
                    logger.warning("stopped by %s after microbatch %d; --resume continues from there", stop.signal,
                                   done)
                    return {"stopped": stop.signal, "next_microbatch": done}
            stats["seconds"] += time.perf_counter() - t_run
            if end > last_saved:
                self._save(end, inflight, stats)
        finally:
            metrics.close()
        if end < len(mbs):
            return {"stopped": "stop_after", "next_microbatch": end}
        return self._summary(stats)

    def _microbatch(self, mb: Microbatch, inflight: dict) -> int:
        ids, pos, tgt, rows, spans = pack_microbatch(mb, self.data, self.pad_id)
        self._loss(self._row_logits(ids, pos, rows), tgt, spans, inflight).backward()
        return mb.real_tokens

    def _loss(self, logits: torch.Tensor, tgt: list, spans: list, inflight: dict) -> torch.Tensor:
        """A packed row's loss to back-propagate: each segment's token losses over its global batch's label tokens
        (the token-mean of that global batch, once all its microbatches are in); their sums go into ``inflight``."""
        t = torch.tensor(tgt, device=self.device)
        per_token = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, t,
                                    ignore_index=IGNORE_INDEX, reduction="none")
        total = per_token.new_zeros(())
        for a, g, s, e in spans:
            part = per_token[s:e].sum()
            inflight[(a, g)] = inflight.get((a, g), 0.0) + float(part.detach())
            total = total + part / self.loss_tokens[(a, g)]
        return total

    def _step(self, a: str, g: int, i: int, inflight: dict, stats: dict, metrics) -> None:
        j = self.jobs_by_name[a]
        params = self.mm.adapter_parameters(a)
        # the norm before clipping (an infinite bound scales by exactly 1: nothing changes without clipping)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, j.max_grad_norm if j.max_grad_norm > 0 else math.inf))
        lr = self._optimizer_step(a)
        self._record(a, g, i, lr, grad_norm, inflight, stats, metrics)
        if g == self.data[a].job.num_global_batches - 1:
            self._job_done(a, stats)

    def _optimizer_step(self, a: str) -> float:
        """Adapter ``a``'s optimizer and schedule step (its gradients ready); the learning rate it stepped with."""
        opt = self.optimizers[a]
        lr = opt.param_groups[0]["lr"]
        opt.step()
        self.schedulers[a].step()
        opt.zero_grad(set_to_none=True)
        return lr

    def _record(self, a: str, g: int, i: int, lr: float, grad_norm: float, inflight: dict, stats: dict,
                metrics) -> None:
        """Global batch ``g`` of adapter ``a`` stepped after microbatch ``i``: its loss in the stats and a
        metrics line."""
        loss = inflight.pop((a, g), 0.0) / self.loss_tokens[(a, g)]
        stats["steps"].setdefault(a, []).append(loss)
        rec = {"adapter": a, "global_batch": g, "loss": loss, "lr": lr, "after_microbatch": i,
               "loss_tokens": self.loss_tokens[(a, g)], "grad_norm": grad_norm}
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()

    def _job_done(self, a: str, stats: dict) -> None:
        """Adapter ``a`` took its last step: its PEFT folder, and its eval."""
        folder = self._write_adapter(a)
        losses = stats["steps"].get(a)
        if losses:
            logger.info("job %s done: %d steps, last loss %.4f, adapter in %s", a, len(losses), losses[-1], folder)
        if a in self.evals:
            result = self.evaluate(a)
            if result.get("eval_loss") is not None:
                stats.setdefault("eval_after", {})[a] = result
                logger.info("job %s eval: %s", a, result)

    def _summary(self, stats: dict) -> dict:
        from lorafusion.train.trainer import peak_memory_mb

        from .simulate import simulate

        sim = simulate(self.schedule)
        jobs = {}
        for j in self.cfg.jobs:
            losses = stats["steps"].get(j.adapter, [])
            jobs[j.adapter] = {"steps": len(losses), "first_loss": losses[0] if losses else None,
                               "last_loss": losses[-1] if losses else None,
                               "samples": len(self.data[j.adapter].ids),
                               "eval_before": stats.get("eval_before", {}).get(j.adapter),
                               "eval_after": stats.get("eval_after", {}).get(j.adapter),
                               "adapter": os.path.join(self.cfg.output_dir, "adapters", j.adapter)}
        mbs = self.schedule.microbatches
        padded = sum(m.padded_tokens for m in mbs)
        real = sum(m.real_tokens for m in mbs)
        summary = {"jobs": jobs, "microbatches": len(mbs), "noop_slots": self.schedule.num_noops,
                   "tokens": real, "padding_fraction": (padded - real) / padded if padded else 0.0,
                   "plan_seconds": self.plan_seconds, "train_seconds": stats["seconds"],
                   "tokens_per_second": stats["tokens"] / stats["seconds"] if stats["seconds"] else None,
                   "simulated_pipeline": {"stages": self.schedule.stages, "time": sim.time,
                                          "bubble_fraction": sim.bubble_fraction},
                   "peak_memory_mb": peak_memory_mb(self.device), **self._run_info()}
        atomic_write_json(os.path.join(self.cfg.output_dir, "summary.json"), summary)
        return summary

    def _run_info(self) -> dict:
        """What the summary adds about how the run was executed (a pipeline: its processes and layers)."""
        return {}
