"""Planner input: fine-tuning jobs sharing one pipeline, and the packing parameters.

A :class:`Job` is one adapter's training run: the token lengths of its samples in dataset order (sample id = index
into ``lengths``), a global batch size in samples, and how many global batches to run (given directly or as epochs).
Global batch ``g`` holds the samples at positions ``g*B .. (g+1)*B - 1`` of the dataset repeated epoch after epoch,
so over an epoch every sample appears exactly once. Lengths come from a JSONL file (through a tokenizer or a length
field), from a seeded length distribution, or explicitly, either as one flat list or listed per global batch.

:class:`PlanParams` holds the pipeline parameters: token capacity per microbatch, the padding multiple applied to
each adapter segment, and the number of pipeline stages.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _real(value: Any, name: str) -> float:
    """A finite real number (an int or a float, not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _sequence(value: Any, name: str) -> list:
    """A YAML / JSON list (not a string or a mapping)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return list(value)


def _check_keys(d: dict, allowed: Iterable[str], where: str) -> None:
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class PlanParams:
    """Pipeline parameters: token capacity per microbatch, padding multiple per adapter segment, pipeline stages."""

    capacity: int
    pad_multiple: int = 1
    stages: int = 4

    def __post_init__(self) -> None:
        for name in ("capacity", "pad_multiple", "stages"):  # stored as plain ints (numpy ints do not serialise)
            object.__setattr__(self, name, _positive_int(getattr(self, name), name))
        if self.capacity < self.pad_multiple:
            raise ValueError(
                f"capacity ({self.capacity}) must be at least the padding multiple ({self.pad_multiple})"
            )

    @property
    def max_piece(self) -> int:
        """The largest sample (or piece of a split sample) that fits one microbatch once padded."""
        return self.capacity // self.pad_multiple * self.pad_multiple


# A job runs at most this many samples (global_batch_size x num_global_batches): a bound far above a real run's
# plan (a few thousand global batches take an hour to plan on 2 cores), so that a typo such as 1000000000 global
# batches is an error naming it rather than an out-of-memory crash or a plan that never ends.
MAX_PLANNED_SAMPLES = 1_000_000


def _check_planned(where: str, global_batch_size: int, num_global_batches: int) -> None:
    total = global_batch_size * num_global_batches
    if total > MAX_PLANNED_SAMPLES:
        raise ValueError(f"{where}: global_batch_size {global_batch_size} x num_global_batches {num_global_batches} "
                         f"= {total:,} samples to plan, more than the planner's limit of {MAX_PLANNED_SAMPLES:,} "
                         "per job; ask for fewer global batches (or epochs)")


@dataclass(frozen=True)
class Job:
    """One adapter's fine-tuning job.

    ``lengths``: token length of every sample in dataset order (sample id = index). ``global_batch_size``: samples per
    global batch. ``num_global_batches``: how many global batches to run; defaults to one epoch (the last global batch
    of an epoch may be short). ``allow_split``: a sample longer than a microbatch's capacity is cut into pieces instead
    of being rejected.
    """

    adapter: str
    lengths: tuple[int, ...]
    global_batch_size: int
    num_global_batches: int | None = None
    allow_split: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.adapter, str) or not self.adapter:
            raise ValueError(f"job adapter id must be a non-empty string, got {self.adapter!r}")
        object.__setattr__(self, "lengths", tuple(self.lengths))
        if len(self.lengths) == 0:
            raise ValueError(f"job {self.adapter!r} has no samples")
        for i, n in enumerate(self.lengths):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
                raise ValueError(f"job {self.adapter!r} sample {i} has length {n!r}; lengths must be positive integers")
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        object.__setattr__(self, "global_batch_size",
                           _positive_int(self.global_batch_size, f"job {self.adapter!r} global_batch_size"))
        if self.num_global_batches is None:
            object.__setattr__(self, "num_global_batches", math.ceil(len(self.lengths) / self.global_batch_size))
        object.__setattr__(self, "num_global_batches",
                           _positive_int(self.num_global_batches, f"job {self.adapter!r} num_global_batches"))
        _check_planned(f"job {self.adapter!r}", self.global_batch_size, self.num_global_batches)
        object.__setattr__(self, "allow_split", _flag(self.allow_split, f"job {self.adapter!r} allow_split"))

    @classmethod
    def from_batches(cls, adapter: str, batches: Sequence[Sequence[int]], allow_split: bool = False) -> "Job":
        """A job whose lengths are listed per global batch (all batches the same size but the last)."""
        if len(batches) == 0:
            raise ValueError(f"job {adapter!r} has no global batches")
        sizes = [len(b) for b in batches]
        if any(s == 0 for s in sizes):
            raise ValueError(f"job {adapter!r} global batch {sizes.index(0)} is empty")
        size = sizes[0]
        for g, s in enumerate(sizes[:-1]):
            if s != size:
                raise ValueError(f"job {adapter!r} global batch {g} has {s} samples, expected {size} like batch 0")
        if sizes[-1] > size:
            raise ValueError(f"job {adapter!r} last global batch has {sizes[-1]} samples, more than {size}")
        lengths = [n for b in batches for n in b]
        return cls(adapter, tuple(lengths), size, len(batches), allow_split)

    def global_batch_samples(self, g: int) -> list[int]:
        """Sample ids of global batch ``g``: the dataset, repeated epoch after epoch, cut into global batches."""
        n = len(self.lengths)
        per_epoch = math.ceil(n / self.global_batch_size)
        epoch, k = divmod(g, per_epoch)
        start = k * self.global_batch_size
        return list(range(start, min(start + self.global_batch_size, n)))

    def global_batches(self) -> list[list[int]]:
        return [self.global_batch_samples(g) for g in range(self.num_global_batches)]

    def pieces(self, sample: int, params: PlanParams) -> list[int]:
        """Token counts of the pieces one sample is packed as (one piece unless it is split)."""
        n = self.lengths[sample]
        cap = params.max_piece
        if n <= cap:
            return [n]
        if not self.allow_split:
            raise ValueError(
                f"job {self.adapter!r} sample {sample} has {n} tokens, more than the microbatch capacity {cap} "
                f"(capacity {params.capacity}, padding multiple {params.pad_multiple}); set allow_split to cut it"
            )
        full, rest = divmod(n, cap)
        return [cap] * full + ([rest] if rest else [])


def validate_jobs(jobs: Sequence[Job], params: PlanParams) -> None:
    """Raise ``ValueError`` for an empty job list, repeated adapter ids or samples that cannot fit."""
    if len(jobs) == 0:
        raise ValueError("jobs is empty: nothing to plan")
    seen: set[str] = set()
    for job in jobs:
        if not isinstance(job, Job):
            raise ValueError(f"jobs must hold Job objects, got {type(job).__name__}")
        if job.adapter in seen:
            raise ValueError(f"adapter id {job.adapter!r} appears in more than one job")
        seen.add(job.adapter)
        for g in range(job.num_global_batches):
            for s in job.global_batch_samples(g):
                job.pieces(s, params)


# --------------------------------------------------------------------------------------------------- length sources


def sample_lengths(
    count: int,
    *,
    median: float,
    sigma: float = 0.5,
    minimum: int = 1,
    maximum: int | None = None,
    seed: int | Sequence[int] = 0,
) -> list[int]:
    """``count`` log-normal token lengths with the given median and sigma, clipped to ``[minimum, maximum]``."""
    _positive_int(count, "count")
    if not median > 0:
        raise ValueError(f"median must be positive, got {median!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be non-negative, got {sigma!r}")
    _positive_int(minimum, "minimum")
    if maximum is not None and maximum < minimum:
        raise ValueError(f"maximum ({maximum}) is below minimum ({minimum})")
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=math.log(median), sigma=sigma, size=count)
    # clipped as floats, before the cast: a draw beyond int64 (a huge median) must clip to maximum, not wrap
    raw = np.clip(np.rint(raw), minimum, maximum if maximum is not None else 2.0 ** 62)
    return [int(x) for x in raw]


def _job_seed(seed: int, adapter: str) -> list[int]:
    return [int(seed), zlib.crc32(adapter.encode())]


def jsonl_lengths(path: str | Path, *, text_field: str = "text", length_field: str | None = None,
                  tokenizer: str | None = None, job: str | None = None) -> list[int]:
    """Token lengths of a JSONL dataset: a length field if named, else each record through a Hugging Face tokenizer,
    counted as training feeds it (``lorafusion.train.data.record_tokens``: a ``{"prompt", "completion"}`` record, or
    the text of ``text_field``, with the tokenizer's special tokens and the EOS token training appends).

    ``job`` (optional) is named in every error, beside the file and the line. A UTF-8 byte-order mark is skipped."""
    path = Path(path)
    where = (f"job {job!r} " if job else "") + f"dataset {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where} is not a file")
    tok = None
    if length_field is None:
        if tokenizer is None:
            raise ValueError(f"{where}: give either length_field or tokenizer")
        from transformers import AutoTokenizer  # lazy: only JSONL-through-tokenizer needs it

        from lorafusion.train.data import check_eos

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
            check_eos(tok)
            tok.model_max_length = 2**62  # whole samples are counted (the trainer cuts them itself): no warning
        except Exception as e:  # a missing folder, no hub access, a broken tokenizer file, no EOS token
            raise ValueError(f"{where}: cannot load tokenizer {tokenizer!r}: {type(e).__name__}: {e}") from e
    try:
        return _jsonl_lengths(path, where, tok, text_field, length_field)
    except OSError as e:  # no read permission, an I/O error
        raise ValueError(f"{where} cannot be read: {e.strerror or e}") from e


def _jsonl_lengths(path: Path, where: str, tok, text_field: str, length_field: str | None) -> list[int]:
    from lorafusion.train.data import jsonl_values, record_problem, record_tokens

    out = []
    for lineno, rec, problem in jsonl_values(path):
        if problem is not None:
            raise ValueError(f"{where} line {lineno} is {problem}")
        if not isinstance(rec, dict):
            raise ValueError(f"{where} line {lineno} must be a JSON object, got {rec!r}")
        if length_field is not None:
            if length_field not in rec:
                raise ValueError(f"{where} line {lineno} has no field {length_field!r}")
            value = rec[length_field]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where} line {lineno}: {length_field!r} must be a positive integer, "
                                 f"got {value!r}")
            out.append(value)
            continue
        if not ("prompt" in rec or "completion" in rec) and text_field not in rec:
            raise ValueError(f"{where} line {lineno} has no field {text_field!r} (nor 'prompt' and "
                             f"'completion')")
        problem = record_problem(rec, text_field)
        if problem is not None:
            raise ValueError(f"{where} line {lineno}: {problem}")
        if not ("prompt" in rec or "completion" in rec):  # a text record, its text under text_field
            rec = {"text": rec[text_field]}
        out.append(len(record_tokens(rec, tok)[0]))
    if not out:
        raise ValueError(f"{where} has no records")
    return out


_SOURCES = ("batches", "lengths", "distribution", "dataset")
_DATASET_KEYS = ("text_field", "length_field", "tokenizer")
JOB_KEYS = ("adapter", "global_batch_size", "num_global_batches", "epochs", "allow_split") + _SOURCES + _DATASET_KEYS
DISTRIBUTION_KEYS = ("kind", "median", "sigma", "min", "max", "seed")
FILE_KEYS = ("jobs", "capacity", "pad_multiple", "stages", "seed")


def job_from_spec(spec: dict, *, seed: int = 0, base_dir: str | Path = ".") -> Job:
    """Build a job from its YAML/dict description (see ``benchmarks/jobs_example.yaml``).

    Keys: ``adapter``; exactly one length source (``batches``: lengths per global batch; ``lengths``: one flat list;
    ``distribution``: ``{kind: lognormal, median, sigma, min, max, seed}``; ``dataset``: a JSONL file with
    ``length_field`` or ``tokenizer`` + ``text_field``); ``global_batch_size`` (implied by ``batches``); the run
    length as ``num_global_batches`` or ``epochs`` (default one epoch; a distribution needs
    ``num_global_batches``); ``allow_split``. Unknown keys and wrongly typed values are errors naming the job."""
    if not isinstance(spec, dict):
        raise ValueError(f"job spec must be a mapping, got {spec!r}")
    adapter = spec.get("adapter")
    if not isinstance(adapter, str) or not adapter:
        raise ValueError(f"job spec needs an 'adapter' id (a non-empty string), got {adapter!r}")
    job = f"job {adapter!r}"
    _check_keys(spec, JOB_KEYS, job)
    allow_split = _flag(spec.get("allow_split", False), f"{job} allow_split")
    sources = [k for k in _SOURCES if k in spec]
    if len(sources) != 1:
        raise ValueError(f"{job} needs exactly one of batches / lengths / distribution / dataset, got {sources}")
    src = sources[0]
    if src != "dataset":
        stray = [k for k in _DATASET_KEYS if k in spec]
        if stray:
            raise ValueError(f"{job}: {stray} apply to a 'dataset' source only, and this job uses {src!r}")
    num_gb = spec.get("num_global_batches")
    epochs = spec.get("epochs")
    if num_gb is not None and epochs is not None:
        raise ValueError(f"{job}: give num_global_batches or epochs, not both")
    if num_gb is not None:
        num_gb = _positive_int(num_gb, f"{job} num_global_batches")
    if epochs is not None:
        epochs = _positive_int(epochs, f"{job} epochs")
    gbs = spec.get("global_batch_size")
    if gbs is not None:
        gbs = _positive_int(gbs, f"{job} global_batch_size")
    if src == "batches":
        batches = _sequence(spec["batches"], f"{job} batches")
        batches = [_sequence(b, f"{job} batches[{g}]") for g, b in enumerate(batches)]
        one_epoch = Job.from_batches(adapter, batches, allow_split)
        if gbs is not None and gbs != one_epoch.global_batch_size:
            raise ValueError(f"{job}: global_batch_size {gbs} differs from the {one_epoch.global_batch_size} "
                             f"samples of its first listed batch")
        gbs, lengths = one_epoch.global_batch_size, list(one_epoch.lengths)
    else:
        if gbs is None:
            raise ValueError(f"{job} needs global_batch_size")
        if src == "lengths":
            lengths = _sequence(spec["lengths"], f"{job} lengths")
        elif src == "distribution":
            lengths = _distribution_lengths(spec["distribution"], job, adapter, gbs, num_gb, seed)
        else:
            dataset = spec["dataset"]
            if not isinstance(dataset, str) or not dataset:
                raise ValueError(f"{job} dataset must be a path, got {dataset!r}")
            p = Path(dataset)
            if not p.is_absolute():
                p = Path(base_dir) / p
            text_field, length_field, tokenizer = (spec.get(k) for k in _DATASET_KEYS)
            for name, v in (("text_field", text_field), ("length_field", length_field), ("tokenizer", tokenizer)):
                if v is not None and (not isinstance(v, str) or not v):
                    raise ValueError(f"{job} {name} must be a non-empty string, got {v!r}")
            lengths = jsonl_lengths(p, text_field=text_field or "text", length_field=length_field,
                                    tokenizer=tokenizer, job=adapter)
    if epochs is not None:
        num_gb = epochs * math.ceil(len(lengths) / gbs)
    return Job(adapter, tuple(lengths), gbs, num_gb, allow_split)


def _distribution_lengths(d: Any, job: str, adapter: str, gbs: int, num_gb: int | None, seed: int) -> list[int]:
    if not isinstance(d, dict):
        raise ValueError(f"{job} distribution must be a mapping, got {d!r}")
    _check_keys(d, DISTRIBUTION_KEYS, f"{job} distribution")
    kind = d.get("kind", "lognormal")
    if kind != "lognormal":
        raise ValueError(f"{job} distribution kind {kind!r} is not supported (only 'lognormal')")
    if num_gb is None:
        raise ValueError(f"{job} with a length distribution needs num_global_batches")
    _check_planned(job, gbs, num_gb)  # before drawing that many lengths
    if "median" not in d:
        raise ValueError(f"{job} distribution needs a median (tokens)")
    median = _real(d["median"], f"{job} distribution median")
    sigma = _real(d.get("sigma", 0.5), f"{job} distribution sigma")
    minimum = d.get("min", 1)
    maximum = d.get("max")
    _positive_int(minimum, f"{job} distribution min")
    if maximum is not None:
        _positive_int(maximum, f"{job} distribution max")
    dseed = _non_negative_int(d.get("seed", seed), f"{job} distribution seed")
    try:
        return sample_lengths(gbs * num_gb, median=median, sigma=sigma, minimum=minimum, maximum=maximum,
                              seed=_job_seed(dseed, adapter))
    except ValueError as e:
        raise ValueError(f"{job} distribution: {e}") from e


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """``json.loads`` object hook: a key written twice in one object is an error (JSON keeps the last silently)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {k!r} is given twice in one object")
        out[k] = v
    return out


def load_jobs(path: str | Path, *, seed: int | None = None) -> tuple[list[Job], dict]:
    """Read a jobs file (YAML or JSON): ``{jobs: [...], capacity:, pad_multiple:, stages:, seed:}``.

    Returns the jobs and the file's top-level planner settings (everything but ``jobs``). A file that does not parse,
    an unknown key or a wrongly typed value is a ``ValueError`` naming the file (and the job)."""
    import yaml

    from lorafusion.train.config import UniqueKeyLoader  # refuses a key given twice, as run configs do

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"jobs file {str(path)!r} is a folder, not a file")
    if not path.is_file():
        raise ValueError(f"jobs file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"jobs file {str(path)!r} is not valid UTF-8: {e}") from e
    except OSError as e:  # no read permission, an I/O error
        raise ValueError(f"jobs file {str(path)!r} cannot be read: {e.strerror or e}") from e
    try:  # JSON first: YAML reads some valid JSON differently (1e3 as a string) or not at all (tab indents)
        doc = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError:
        try:
            doc = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as e:
            raise ValueError(f"jobs file {str(path)!r} is not valid YAML / JSON: {e}") from e
    except _DuplicateKey as e:
        raise ValueError(f"jobs file {str(path)!r}: {e}") from None
    if isinstance(doc, list):
        doc = {"jobs": doc}
    if not isinstance(doc, dict) or "jobs" not in doc:
        raise ValueError(f"jobs file {str(path)!r} must hold a 'jobs' list")
    _check_keys(doc, FILE_KEYS, f"jobs file {str(path)!r}")
    settings = {k: v for k, v in doc.items() if k != "jobs"}
    for key in ("capacity", "pad_multiple", "stages"):
        if key in settings:
            _positive_int(settings[key], f"jobs file {str(path)!r} {key}")
    if "seed" in settings:
        _non_negative_int(settings["seed"], f"jobs file {str(path)!r} seed")
    use_seed = seed if seed is not None else settings.get("seed", 0)
    specs = doc["jobs"]
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"jobs file {str(path)!r}: 'jobs' is empty or not a list, got {specs!r}")
    jobs = [job_from_spec(s, seed=use_seed, base_dir=path.parent) for s in specs]
    return jobs, settings


def lognormal_jobs(medians: Iterable[float], batch_sizes: Iterable[int], num_global_batches: Iterable[int], *,
                   sigma: float = 0.5, maximum: int | None = None, seed: int = 0) -> list[Job]:
    """A synthetic mix: job ``j`` has log-normal lengths with ``medians[j]``, its batch size and batch count."""
    jobs = []
    for j, (m, b, n) in enumerate(zip(medians, batch_sizes, num_global_batches, strict=True)):
        name = f"job{j}"
        lengths = sample_lengths(b * n, median=m, sigma=sigma, minimum=1, maximum=maximum,
                                 seed=_job_seed(seed, name))
        jobs.append(Job(name, tuple(lengths), b, n))
    return jobs
