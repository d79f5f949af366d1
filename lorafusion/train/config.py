"""The training config: nested dataclasses loaded from YAML, validated at the door, overridable from the CLI.

Every section is a dataclass; unknown keys, wrong types and impossible values raise ``ConfigError`` naming the dotted
key (``lora.r``, ``batch.global_batch_size``). ``--section.key value`` overrides are parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the dotted key."""


@dataclass
class ModelConfig:
    # a local Hugging Face model folder, or "builtin:tiny-llama" (materialised deterministically into a cache folder)
    name_or_path: str = "builtin:tiny-llama"
    attn_implementation: str = "sdpa"  # sdpa / eager: both honour packed position ids
    # "nf4" / "fp4": the frozen base's linear layers in 4 bits (bitsandbytes; QLoRA), the LM head kept as loaded
    quantization: str = "none"


@dataclass
class DataConfig:
    # JSONL with {"prompt", "completion"} or {"text"}; "builtin:<task>" generates the built-in task deterministically
    train: str = "builtin:lowercase"
    eval: Optional[str] = None          # a JSONL file; None: split eval_fraction off the training file
    eval_fraction: float = 0.1
    max_eval_samples: int = 200         # eval loss / metric run on at most this many eval samples
    max_length: int = 32                # tokens per sample (and per packed row); longer samples are truncated
    packing: bool = True                # several samples per row, attention kept inside each sample
    skip_bad_lines: bool = False        # malformed JSONL lines: error (default) or skip and count


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    # a list of module names, one regex string (full match on the module path), or "all-linear"
    target_modules: Union[str, list] = "all-linear"
    fused: bool = True                  # run the LoRA Linear layers through lorafusion's fused kernels
    backend: Optional[str] = None       # fused backend (None: automatic choice)


@dataclass
class GaloreSection:
    # projection rank for the galore_* optimizers; it must be below lora.r, since the adapters' matrices are
    # r x in and out x r (None: lora.r // 4, at least 1)
    rank: Optional[int] = None
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    layerwise: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adamw"   # adamw, adamw8bit, galore_adamw, galore_adamw8bit, galore_adafactor
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine / linear / constant, each after a linear warm-up
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    galore: GaloreSection = field(default_factory=GaloreSection)


@dataclass
class BatchConfig:
    tokens_per_microbatch: int = 1024   # per process; samples per microbatch = tokens_per_microbatch // max_length
    micro_batch_size: Optional[int] = None  # samples per microbatch per process; None: derived from the tokens
    #   (the most samples within tokens_per_microbatch that divide each process's share of global_batch_size)
    global_batch_size: int = 32         # samples per optimizer step over all processes


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    precision: str = "fp32"             # fp32 / bf16 / fp16 (mixed: adapters and optimizer stay fp32)
    device: str = "auto"                # auto / cpu / cuda
    max_steps: Optional[int] = None     # optimizer steps (None: `epochs` epochs if set, else 300 steps)
    epochs: Optional[float] = None      # set one of max_steps / epochs, not both
    eval_every: int = 100               # steps; 0: only before and after training
    save_every: int = 100               # steps between checkpoints; 0: only at the end and on a signal
    keep_checkpoints: int = 2
    log_every: int = 1
    generate_eval: bool = True          # greedy exact-match accuracy on prompt/completion eval data
    max_new_tokens: int = 32
    distributed: str = "auto"           # auto / none / ddp / deepspeed
    deepspeed_config: Optional[str] = None
    num_threads: Optional[int] = None   # torch CPU threads (None: torch's default)
    plot: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def micro_batch_samples(self, world_size: int = 1) -> int:
        """Samples per microbatch per process: ``batch.micro_batch_size`` as given, or else the most samples that
        fit ``batch.tokens_per_microbatch`` (tokens // max_length) and divide each process's share of the global
        batch, so the default config runs on 1, 2, 4, .. processes unchanged."""
        if self.batch.micro_batch_size is not None:
            return self.batch.micro_batch_size
        cap = max(1, self.batch.tokens_per_microbatch // self.data.max_length)
        g = self.batch.global_batch_size
        if world_size < 1 or g < world_size or g % world_size:
            return cap  # validate() names the impossible global batch
        share = g // world_size
        return max(d for d in range(1, min(cap, share) + 1) if share % d == 0)

    def galore_rank(self) -> int:
        """optimizer.galore.rank, or its default: lora.r // 4, at least 1."""
        g = self.optimizer.galore.rank
        return g if g is not None else max(1, self.lora.r // 4)

    def grad_accum_steps(self, world_size: int) -> int:
        return self.batch.global_batch_size // (self.micro_batch_samples(world_size) * world_size)


# optimizer steps when neither train.max_steps nor train.epochs is set
DEFAULT_MAX_STEPS = 300

OPTIMIZER_NAMES = ("adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit", "galore_adafactor")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is list or origin is list:
        return isinstance(value, list)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _accepts(tp: Any, kind: type) -> bool:
    return tp is kind or (typing.get_origin(tp) is Union and kind in typing.get_args(tp))


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known in {prefix or 'top level'}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key)
            continue
        if isinstance(value, str) and _accepts(tp, float):
            # YAML 1.1 reads 3e-4 (no dot) as a string; take any string Python reads as a finite float
            parsed = _float_or_none(value)
            if parsed is not None:
                value = parsed
        if not _type_ok(value, tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        if isinstance(value, list) and any(isinstance(x, float) and not math.isfinite(x) for x in value):
            raise ConfigError(f"{key}: must hold finite numbers, got {value!r}")
        if _accepts(tp, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def _float_or_none(text: str) -> Optional[float]:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}: {why} (got {value!r})")


QUANTIZATIONS = ("none", "nf4", "fp4")


def validate(cfg: RunConfig, world_size: int = 1) -> RunConfig:
    """Check values that types cannot: ranges, choices, and the batch arithmetic for ``world_size`` processes."""
    m, d, l, o, b, t = cfg.model, cfg.data, cfg.lora, cfg.optimizer, cfg.batch, cfg.train
    if not m.name_or_path:
        _fail("model.name_or_path", m.name_or_path, "must name a local model folder or builtin:<preset>")
    if m.attn_implementation not in ("sdpa", "eager"):
        _fail("model.attn_implementation", m.attn_implementation, "must be sdpa or eager")
    if m.quantization not in QUANTIZATIONS:
        _fail("model.quantization", m.quantization, f"must be one of {', '.join(QUANTIZATIONS)}")
    from lorafusion.train.presets import DATA_PRESETS, MODEL_PRESETS

    if m.name_or_path.startswith("builtin:") and m.name_or_path[len("builtin:"):] not in MODEL_PRESETS:
        _fail("model.name_or_path", m.name_or_path,
              f"unknown built-in model (known: {', '.join('builtin:' + n for n in MODEL_PRESETS)})")
    if not d.train:
        _fail("data.train", d.train, "must be a JSONL path or builtin:<task>")
    if d.train.startswith("builtin:") and d.train[len("builtin:"):] not in DATA_PRESETS:
        _fail("data.train", d.train, f"unknown built-in dataset (known: "
                                     f"{', '.join('builtin:' + n for n in DATA_PRESETS)})")
    if d.eval is not None and d.eval.startswith("builtin:"):
        _fail("data.eval", d.eval, "must be a JSONL file (a built-in data.train brings its own eval split)")
    if not 0.0 <= d.eval_fraction < 1.0:
        _fail("data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
    if d.max_length < 2:
        _fail("data.max_length", d.max_length, "must be at least 2")
    if d.max_eval_samples < 1:
        _fail("data.max_eval_samples", d.max_eval_samples, "must be at least 1")
    if l.r < 1:
        _fail("lora.r", l.r, "must be a positive integer")
    if l.alpha <= 0:
        _fail("lora.alpha", l.alpha, "must be positive")
    if not 0.0 <= l.dropout < 1.0:
        _fail("lora.dropout", l.dropout, "must be in [0, 1)")
    tm = l.target_modules
    if isinstance(tm, list):
        if not tm or not all(isinstance(x, str) and x for x in tm):
            _fail("lora.target_modules", tm, "must be a non-empty list of module names, a regex, or all-linear")
    elif not tm:
        _fail("lora.target_modules", tm, "must not be empty")
    if o.name not in OPTIMIZER_NAMES:
        _fail("optimizer.name", o.name, f"must be one of {', '.join(OPTIMIZER_NAMES)}")
    if not o.lr > 0:
        _fail("optimizer.lr", o.lr, "must be positive")
    if o.weight_decay < 0:
        _fail("optimizer.weight_decay", o.weight_decay, "must be >= 0")
    if len(o.betas) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in o.betas):
        _fail("optimizer.betas", o.betas, "must be two numbers in [0, 1)")
    if o.eps <= 0:
        _fail("optimizer.eps", o.eps, "must be positive")
    if o.schedule not in ("cosine", "linear", "constant"):
        _fail("optimizer.schedule", o.schedule, "must be cosine, linear or constant")
    if o.warmup_steps < 0:
        _fail("optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    if o.max_grad_norm < 0:
        _fail("optimizer.max_grad_norm", o.max_grad_norm, "must be >= 0 (0 disables clipping)")
    g = o.galore
    if g.rank is not None and g.rank < 1:
        _fail("optimizer.galore.rank", g.rank, "must be a positive integer")
    if o.name.startswith("galore_") and g.rank is not None and g.rank >= l.r:
        _fail("optimizer.galore.rank", g.rank,
              f"must be below lora.r={l.r}: the adapters' matrices are r x in and out x r, so a projection of rank "
              f">= r cuts nothing and {o.name} would run as its plain optimizer")
    from galore.projector import PROJ_TYPES

    if g.proj_type not in PROJ_TYPES:
        _fail("optimizer.galore.proj_type", g.proj_type, f"must be one of {', '.join(PROJ_TYPES)}")
    if g.update_proj_gap < 1:
        _fail("optimizer.galore.update_proj_gap", g.update_proj_gap, "must be a positive integer")
    if g.scale <= 0:
        _fail("optimizer.galore.scale", g.scale, "must be positive")
    if b.tokens_per_microbatch < d.max_length and b.micro_batch_size is None:
        _fail("batch.tokens_per_microbatch", b.tokens_per_microbatch,
              f"must hold at least one sample of data.max_length={d.max_length} tokens")
    if b.micro_batch_size is not None and b.micro_batch_size < 1:
        _fail("batch.micro_batch_size", b.micro_batch_size, "must be a positive integer")
    if b.global_batch_size < 1:
        _fail("batch.global_batch_size", b.global_batch_size, "must be a positive integer")
    if b.micro_batch_size is None and b.global_batch_size % world_size:
        _fail("batch.global_batch_size", b.global_batch_size, f"must divide evenly over {world_size} processes")
    micro = cfg.micro_batch_samples(world_size)
    if micro * world_size > b.global_batch_size:
        key = "batch.micro_batch_size" if b.micro_batch_size is not None else "batch.tokens_per_microbatch"
        _fail(key, micro, f"the microbatch ({micro} samples x {world_size} processes) is larger than "
                          f"batch.global_batch_size={b.global_batch_size}")
    if b.global_batch_size % (micro * world_size):
        _fail("batch.global_batch_size", b.global_batch_size,
              f"must be a multiple of microbatch ({micro} samples) x processes ({world_size})")
    if t.precision not in ("fp32", "bf16", "fp16"):
        _fail("train.precision", t.precision, "must be fp32, bf16 or fp16")
    if g.layerwise and t.precision == "fp16":
        _fail("optimizer.galore.layerwise", g.layerwise, "cannot run with train.precision=fp16: its gradient hooks "
              "would step on loss-scaled gradients before the scaler unscales them; use bf16 or fp32")
    if t.device not in ("auto", "cpu", "cuda"):
        _fail("train.device", t.device, "must be auto, cpu or cuda")
    if t.max_steps is not None and t.epochs is not None:
        _fail("train.epochs", t.epochs, f"set train.max_steps ({t.max_steps}) or train.epochs, not both")
    if t.max_steps is not None and t.max_steps < 1:
        _fail("train.max_steps", t.max_steps, "must be a positive integer")
    if t.epochs is not None and t.epochs <= 0:
        _fail("train.epochs", t.epochs, "must be positive")
    for key in ("eval_every", "save_every"):
        if getattr(t, key) < 0:
            _fail(f"train.{key}", getattr(t, key), "must be >= 0")
    if t.keep_checkpoints < 1:
        _fail("train.keep_checkpoints", t.keep_checkpoints, "must be at least 1")
    if t.log_every < 1:
        _fail("train.log_every", t.log_every, "must be at least 1")
    if t.max_new_tokens < 1:
        _fail("train.max_new_tokens", t.max_new_tokens, "must be at least 1")
    if t.distributed not in ("auto", "none", "ddp", "deepspeed"):
        _fail("train.distributed", t.distributed, "must be auto, none, ddp or deepspeed")
    if t.deepspeed_config is not None:
        if not os.path.isfile(t.deepspeed_config):
            _fail("train.deepspeed_config", t.deepspeed_config, "file not found")
        try:
            with open(t.deepspeed_config, encoding="utf-8-sig") as fh:
                ds_doc = json.load(fh)
        except (ValueError, OSError) as exc:
            _fail("train.deepspeed_config", t.deepspeed_config, f"is not a readable JSON file ({exc})")
        if not isinstance(ds_doc, dict):
            _fail("train.deepspeed_config", t.deepspeed_config, "must hold a JSON object")
    if not 0 <= t.seed < 2**32:
        _fail("train.seed", t.seed, "must be in [0, 2**32)")
    from lorafusion.backends import BACKENDS

    if l.backend is not None and l.backend not in ("auto",) + BACKENDS:
        _fail("lora.backend", l.backend, f"must be one of auto, {', '.join(BACKENDS)} (or null: automatic)")
    if t.num_threads is not None and t.num_threads < 1:
        _fail("train.num_threads", t.num_threads, "must be at least 1")
    most = max(64, 4 * (os.cpu_count() or 1))
    if t.num_threads is not None and t.num_threads > most:  # thousands of threads hung or crashed the process
        _fail("train.num_threads", t.num_threads, f"must be at most {most} (4x this machine's {os.cpu_count()} CPUs, "
              "at least 64)")
    if not t.output_dir:
        _fail("train.output_dir", t.output_dir, "must not be empty")
    if os.path.exists(t.output_dir) and not os.path.isdir(t.output_dir):
        _fail("train.output_dir", t.output_dir, "is a file, not a folder")
    return cfg


def parse_overrides(pairs: list[str]) -> dict:
    """``["--lora.r", "8", "--train.max_steps=5"]`` -> nested dict; values are parsed as YAML scalars, except for a
    key of type str (or str / null), which takes the text as typed."""
    out: dict = {}
    i = 0
    while i < len(pairs):
        arg = pairs[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(pairs):
                raise ConfigError(f"override --{key}: missing a value")
            raw = pairs[i + 1]
            i += 2
        key = key.replace("-", "_")
        tp = _field_type(key)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            if not _accepts(tp, str):
                raise ConfigError(f"override --{key}: value {raw!r} is not a YAML scalar ({exc})") from None
            value = raw
        if _accepts(tp, str) and not ((value is None and _accepts(tp, type(None)))
                                      or (isinstance(value, list) and _accepts(tp, list))):
            # a text key takes the text as typed (--train.output_dir 2024, @runs, a regex starting with "[")
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {p} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def _field_type(dotted: str) -> Any:
    """The declared type of config key ``dotted`` (``train.output_dir``), or None for a key the config lacks."""
    cls: Any = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last silently); also
    read by the planner's jobs files (``scheduling.jobs.load_jobs``)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found a key that is not a scalar ({key!r})",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice (first {seen[key]})",
                    key_node.start_mark)
            seen[key] = str(key_node.start_mark).strip()
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str, what: str = "config file") -> dict:
    """The mapping at the top of YAML file ``path`` (empty for an empty file); a ConfigError naming ``what`` and
    the path for a missing file, bad YAML or UTF-8, a key given twice, or a top level that is not a mapping."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    with open(path, encoding="utf-8-sig") as fh:
        try:
            loaded = yaml.load(fh, Loader=UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what} {path} is not valid UTF-8: {exc}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None, world_size: int = 1) -> RunConfig:
    """Defaults <- YAML file <- overrides, then type and value checks."""
    data: dict = {}
    if path is not None:
        data = read_yaml_mapping(path)
    if overrides:
        data = _merge(data, overrides)
    return validate(_build(RunConfig, data, ""), world_size)


def save_config(cfg: RunConfig, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
