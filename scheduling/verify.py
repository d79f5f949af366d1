"""Check a schedule against its jobs and every packing rule.

Violation kinds:

- ``params``: the schedule's capacity / padding multiple / stages differ from the ones given, or are not positive
  integers. The other rules are checked against the parameters given (a schedule that claims a larger capacity is
  still held to the real one), or, with none given, against the schedule's own; with none given and the schedule's
  unusable, nothing else is checked.
- ``unknown``: a segment names an adapter with no job, or a global batch index out of range.
- ``capacity``: a microbatch's padded tokens exceed the capacity.
- ``padding``: a segment's padded token count is not its real tokens rounded up to the padding multiple, or a
  segment is malformed (no samples, samples and tokens of different lengths, non-positive tokens).
- ``same_adapter``: a microbatch holds two segments of one adapter (two global batches, or one split in two).
- ``coverage``: a global batch's samples are not exactly its expected samples, each once with all its tokens (a
  missing, extra, duplicated or foreign sample, or tokens not summing to the sample's length); a sample must appear
  once, whole, unless it is longer than a microbatch holds and its job has ``allow_split``; a split sample's pieces
  must each fit a microbatch, and a segment lists each sample at most once.
- ``dependency``: an adapter's global batch g+1 starts fewer than ``stages`` microbatches after g's last one, or
  before it.
- ``optimizer_step``: the optimizer step of (adapter, g) is missing, before g's last microbatch, or too late for
  g+1: under 1F1B, stage 0 runs the backward of microbatch i before the forward of microbatch j only when
  j >= i + stages, so a step after microbatch i must have i <= (g+1's first microbatch) - stages.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

from .jobs import Job, PlanParams, round_up
from .schedule import Schedule

KINDS = ("params", "unknown", "capacity", "padding", "same_adapter", "coverage", "dependency", "optimizer_step")


@dataclass(frozen=True)
class Violation:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def verify(schedule: Schedule, jobs: Sequence[Job], params: PlanParams | None = None, *,
           exact_padding: bool = True) -> list[Violation]:
    """Every rule ``schedule`` breaks (empty when it is valid).

    ``exact_padding``: a segment must be padded to exactly its tokens rounded up to the multiple; with ``False``,
    any multiple at or above its tokens is allowed (padding to the longest sample, as the mLoRA-like baseline does).
    """
    out: list[Violation] = []

    def bad(kind: str, msg: str) -> None:
        out.append(Violation(kind, msg))

    if params is not None:
        for name in ("capacity", "pad_multiple", "stages"):
            if getattr(schedule, name) != getattr(params, name):
                bad("params", f"schedule {name} {getattr(schedule, name)} != expected {getattr(params, name)}")
    own = (schedule.capacity, schedule.pad_multiple, schedule.stages)
    broken = [(name, v) for name, v in zip(("capacity", "pad_multiple", "stages"), own)
              if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    for name, v in broken:
        bad("params", f"schedule {name} must be a positive integer, got {v!r}")
    # the rules hold against the parameters the caller plans for (a schedule claiming a larger capacity still may
    # not exceed the real one), else against the schedule's own
    if params is not None:
        cap, pad, S = params.capacity, params.pad_multiple, params.stages
    elif broken:  # no rule can be checked against a capacity, padding or stage count that makes no sense
        return out
    else:
        cap, pad, S = own
    max_piece = cap // pad * pad
    by_id = {j.adapter: j for j in jobs}
    got: dict[tuple[str, int], Counter] = defaultdict(Counter)
    pieces: dict[tuple[str, int], Counter] = defaultdict(Counter)  # occurrences of each sample (whole or a piece)
    positions: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, mb in enumerate(schedule.microbatches):
        if mb.padded_tokens > cap:
            bad("capacity", f"microbatch {i} has {mb.padded_tokens} padded tokens > capacity {cap}")
        seen = Counter(s.adapter for s in mb.segments)
        for a, n in seen.items():
            if n > 1:
                bad("same_adapter", f"microbatch {i} holds {n} segments of adapter {a!r}")
        for seg in mb.segments:
            job = by_id.get(seg.adapter)
            if job is None:
                bad("unknown", f"microbatch {i} has a segment of adapter {seg.adapter!r}, which has no job")
                continue
            if not 0 <= seg.global_batch < job.num_global_batches:
                bad("unknown", f"microbatch {i}: adapter {seg.adapter!r} global batch {seg.global_batch} is out of "
                               f"range [0, {job.num_global_batches})")
                continue
            if not seg.samples or len(seg.samples) != len(seg.tokens) or any(t <= 0 for t in seg.tokens):
                bad("padding", f"microbatch {i}: malformed segment of adapter {seg.adapter!r} "
                               f"(samples {list(seg.samples)}, tokens {list(seg.tokens)})")
                continue
            want = round_up(seg.real_tokens, pad)
            if seg.padded_tokens != want and (exact_padding or seg.padded_tokens < want or seg.padded_tokens % pad):
                bad("padding", f"microbatch {i}: adapter {seg.adapter!r} segment has {seg.real_tokens} tokens padded "
                               f"to {seg.padded_tokens}, expected {want} (multiple {pad})")
            key = (seg.adapter, seg.global_batch)
            positions[key].append(i)
            repeated = sorted(sid for sid, n in Counter(seg.samples).items() if n > 1)
            if repeated:
                bad("coverage", f"microbatch {i}: adapter {seg.adapter!r} segment lists samples {repeated[:8]} more "
                                f"than once")
            for sid, t in zip(seg.samples, seg.tokens):
                got[key][sid] += t
                pieces[key][sid] += 1
                if job.allow_split and t > max_piece:
                    bad("coverage", f"microbatch {i}: adapter {seg.adapter!r} sample {sid} piece of {t} tokens is "
                                    f"longer than a microbatch holds ({max_piece})")
    for job in jobs:
        for g in range(job.num_global_batches):
            key = (job.adapter, g)
            expected = job.global_batch_samples(g)
            have = got.get(key, Counter())
            missing = [s for s in expected if s not in have]
            extra = sorted(set(have) - set(expected))
            wrong = [(s, have[s], job.lengths[s]) for s in expected if s in have and have[s] != job.lengths[s]]
            if missing or extra or wrong:
                bad("coverage", f"adapter {job.adapter!r} global batch {g}: missing samples {missing[:8]}, "
                                f"foreign samples {extra[:8]}, wrong token totals (sample, got, length) {wrong[:8]}")
            # only a sample longer than a microbatch holds may be cut, and only in a job that allows it
            cut = sorted(s for s, n in pieces.get(key, Counter()).items()
                         if n > 1 and (not job.allow_split or (s < len(job.lengths) and job.lengths[s] <= max_piece)))
            if cut:
                why = ("the job does not allow splitting" if not job.allow_split
                       else f"they fit a microbatch ({max_piece} tokens), so they must not be cut")
                bad("coverage", f"adapter {job.adapter!r} global batch {g}: samples {cut[:8]} appear more than "
                                f"once (cut into pieces or repeated), but {why}")
    steps = schedule.optimizer_steps
    for job in jobs:
        a = job.adapter
        for g in range(job.num_global_batches - 1):
            p, q = positions.get((a, g)), positions.get((a, g + 1))
            if p and q and min(q) - max(p) < S:
                bad("dependency", f"adapter {a!r} global batch {g + 1} starts at microbatch {min(q)}, "
                                  f"{min(q) - max(p)} after global batch {g} ends at {max(p)} (need >= {S})")
        a_steps = steps.get(a)
        if a_steps is None or len(a_steps) != job.num_global_batches:
            bad("optimizer_step", f"adapter {a!r} needs {job.num_global_batches} optimizer steps, got "
                                  f"{None if a_steps is None else len(a_steps)}")
            continue
        for g, step in enumerate(a_steps):
            p = positions.get((a, g))
            if not p:
                continue
            nxt = positions.get((a, g + 1))
            # too late for g+1 (when the gap itself is too small, that is the dependency violation above)
            late = bool(nxt) and step > min(nxt) - S and min(nxt) - max(p) >= S
            if step < max(p) or late or step >= len(schedule.microbatches):
                bad("optimizer_step", f"adapter {a!r} global batch {g}: optimizer step after microbatch {step}, "
                                      f"but the batch ends at {max(p)}"
                                      + (f" and the next starts at {min(nxt)} (the step must come after a "
                                         f"microbatch <= {min(nxt) - S}: {S} stages)" if nxt else ""))
    for a in steps:
        if a not in by_id:
            bad("unknown", f"optimizer steps given for adapter {a!r}, which has no job")
    return out


def check(schedule: Schedule, jobs: Sequence[Job], params: PlanParams | None = None, *,
          exact_padding: bool = True) -> None:
    """Raise ``ValueError`` listing the violations if ``schedule`` breaks any rule."""
    v = verify(schedule, jobs, params, exact_padding=exact_padding)
    if v:
        head = "\n  ".join(str(x) for x in v[:20])
        raise ValueError(f"schedule breaks {len(v)} rule(s):\n  {head}")
