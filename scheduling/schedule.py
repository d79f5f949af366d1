"""The planner's output, which the pipeline executor consumes.

A :class:`Schedule` is an ordered list of microbatches. A microbatch holds one :class:`Segment` per adapter in it
(that adapter's global batch index, the sample ids, the tokens each sample contributes, and the segment's padded
token count); a microbatch with no segments is an explicit no-op slot. ``optimizer_steps[adapter][g]`` is the index of
the microbatch after which the adapter's optimizer step for global batch ``g`` may run.

JSON form (``Schedule.to_dict``)::

    {"format": "lorafusion.schedule/1", "capacity": 4096, "pad_multiple": 128, "stages": 4,
     "microbatches": [{"segments": [{"adapter": "a", "global_batch": 0, "samples": [3, 1], "tokens": [700, 300],
                                     "padded_tokens": 1024}, ...]},
                      {"segments": []},                      # a no-op slot
                      ...],
     "optimizer_steps": {"a": [5, 12, ...], ...},
     "meta": {...}}

A sample split because it is longer than a microbatch appears in several segments (same id), its tokens summing to
its length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "lorafusion.schedule/1"


@dataclass(frozen=True)
class Segment:
    adapter: str
    global_batch: int
    samples: tuple[int, ...]
    tokens: tuple[int, ...]
    padded_tokens: int

    @property
    def real_tokens(self) -> int:
        return sum(self.tokens)

    def to_dict(self) -> dict:
        return {"adapter": self.adapter, "global_batch": self.global_batch, "samples": list(self.samples),
                "tokens": list(self.tokens), "padded_tokens": self.padded_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "Segment":
        _exact_keys(d, SEGMENT_KEYS, "segment")
        if not isinstance(d.get("adapter"), str):
            raise TypeError(f"segment adapter must be a string, got {d.get('adapter')!r}")
        return cls(d["adapter"], _json_int(d["global_batch"], "global_batch"), _json_ints(d["samples"], "samples"),
                   _json_ints(d["tokens"], "tokens"), _json_int(d["padded_tokens"], "padded_tokens"))


SEGMENT_KEYS = ("adapter", "global_batch", "samples", "tokens", "padded_tokens")
SCHEDULE_KEYS = ("format", "capacity", "pad_multiple", "stages", "microbatches", "optimizer_steps", "meta")


def _exact_keys(d: Any, keys: tuple[str, ...], what: str, optional: tuple[str, ...] = ()) -> None:
    """``d`` is a dict with every one of ``keys`` (and maybe ``optional`` ones) and nothing else: a misspelt key
    (``"segment"`` for ``"segments"``) would otherwise read as a missing one and change the schedule's meaning."""
    if not isinstance(d, dict):
        raise TypeError(f"a {what} must be a JSON object, got {d!r}")
    unknown = sorted(set(d) - set(keys) - set(optional))
    missing = [k for k in keys if k not in d]
    if unknown or missing:
        shown = repr(d) if len(repr(d)) <= 160 else repr(d)[:157] + "..."
        raise ValueError(f"{what} {shown}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else []))
            + f" (a {what} has {list(keys) + list(optional)})")


def _json_int(value: Any, name: str) -> int:
    """An integer read back from JSON as it was written: not a float, a bool or a string (no silent rounding)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return value


def _json_ints(values: Any, name: str) -> tuple[int, ...]:
    if not isinstance(values, list):
        raise TypeError(f"{name} must be a list of integers, got {values!r}")
    return tuple(_json_int(v, name) for v in values)


@dataclass(frozen=True)
class Microbatch:
    segments: tuple[Segment, ...] = ()

    @property
    def is_noop(self) -> bool:
        return not self.segments

    @property
    def padded_tokens(self) -> int:
        return sum(s.padded_tokens for s in self.segments)

    @property
    def real_tokens(self) -> int:
        return sum(s.real_tokens for s in self.segments)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(s.adapter for s in self.segments)

    def to_dict(self) -> dict:
        return {"segments": [s.to_dict() for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> "Microbatch":
        _exact_keys(d, ("segments",), "microbatch")  # a no-op slot is {"segments": []}
        segments = d["segments"]
        if not isinstance(segments, list):
            raise TypeError(f"microbatch segments must be a list, got {segments!r}")
        return cls(tuple(Segment.from_dict(s) for s in segments))


NOOP = Microbatch(())


@dataclass
class Schedule:
    microbatches: list[Microbatch]
    optimizer_steps: dict[str, list[int]]
    capacity: int
    pad_multiple: int
    stages: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_noops(self) -> int:
        return sum(1 for m in self.microbatches if m.is_noop)

    def positions(self) -> dict[tuple[str, int], list[int]]:
        """Microbatch indices holding each (adapter, global batch), in order."""
        out: dict[tuple[str, int], list[int]] = {}
        for i, mb in enumerate(self.microbatches):
            for s in mb.segments:
                out.setdefault((s.adapter, s.global_batch), []).append(i)
        return out

    def to_dict(self) -> dict:
        return {"format": FORMAT, "capacity": self.capacity, "pad_multiple": self.pad_multiple,
                "stages": self.stages, "microbatches": [m.to_dict() for m in self.microbatches],
                "optimizer_steps": {a: list(v) for a, v in self.optimizer_steps.items()}, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """The schedule of ``to_dict``'s form; a missing or unknown field, a wrong type or a non-positive capacity /
        padding multiple / stage count is a ``ValueError`` (rule violations are :func:`scheduling.verify`'s job)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else d
            raise ValueError(f"schedule format must be {FORMAT!r}, got {got!r}")
        try:
            _exact_keys(d, SCHEDULE_KEYS[:-1], "schedule", optional=("meta",))
            if not isinstance(d["microbatches"], list):
                raise TypeError(f"microbatches must be a list, got {d['microbatches']!r}")
            out = cls([Microbatch.from_dict(m) for m in d["microbatches"]],
                      {str(a): list(_json_ints(v, f"optimizer_steps[{a!r}]"))
                       for a, v in d["optimizer_steps"].items()},
                      _json_int(d["capacity"], "capacity"), _json_int(d["pad_multiple"], "pad_multiple"),
                      _json_int(d["stages"], "stages"), dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"schedule JSON is malformed: {type(e).__name__}: {e}") from e
        for name in ("capacity", "pad_multiple", "stages"):
            if getattr(out, name) < 1:
                raise ValueError(f"schedule {name} must be a positive integer, got {getattr(out, name)}")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        return cls.from_json(Path(path).read_text())


def optimizer_steps_for(microbatches: list[Microbatch]) -> dict[str, list[int]]:
    """The earliest legal optimizer step of every (adapter, global batch): after its last microbatch."""
    last: dict[str, dict[int, int]] = {}
    for i, mb in enumerate(microbatches):
        for s in mb.segments:
            last.setdefault(s.adapter, {})[s.global_batch] = i
    return {a: [d[g] for g in sorted(d)] for a, d in sorted(last.items())}
