"""Discrete-event estimate of a schedule's pipeline time under non-interleaved 1F1B.

Model: S uniform stages. A microbatch with P padded tokens takes ``overhead + per_token * P`` per stage for its
forward and ``backward_factor`` times that for its backward; a no-op slot takes ``noop`` for its forward and for its
backward. Stage s runs ``min(S - s - 1, M)`` warm-up forwards, then alternates one forward and one backward, then
drains the remaining backwards. F(s, i) needs F(s-1, i); B(s, i) needs B(s+1, i) (the last stage: its own F). A
microbatch holding global batch g+1 of an adapter cannot start its first forward (stage 0) before the last backward
(stage 0) of that adapter's global batch g has finished (the optimizer step sits in between). Stage 0's order runs
F(0, j) after B(0, j - S), so where the planner's rule holds (g+1 starts at least S positions after g's last
microbatch) that backward has run first anyway: the rule costs no time of its own, and a schedule that breaks it
deadlocks (a ``ValueError``) instead of getting a time.

The busy time counted as useful is the forward and backward time of real microbatches; everything else (idle time
and no-op slots) is bubble.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from .schedule import Schedule


@dataclass(frozen=True)
class CostModel:
    overhead: float = 200.0
    per_token: float = 1.0
    backward_factor: float = 2.0
    noop: float = 50.0

    def __post_init__(self):
        for name in ("overhead", "per_token", "backward_factor", "noop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")

    def forward(self, padded_tokens: int, is_noop: bool) -> float:
        return self.noop if is_noop else self.overhead + self.per_token * padded_tokens

    def backward(self, padded_tokens: int, is_noop: bool) -> float:
        return self.noop if is_noop else self.backward_factor * (self.overhead + self.per_token * padded_tokens)


@dataclass(frozen=True)
class SimResult:
    time: float
    bubble_fraction: float
    padding_fraction: float
    num_microbatches: int
    num_noops: int
    real_tokens: int
    padded_tokens: int
    token_cv: float  # coefficient of variation of padded tokens over real microbatches
    token_max_over_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


def stage_order(stages: int, num_microbatches: int, stage: int) -> list[tuple[str, int]]:
    """The 1F1B op order of one stage: ("F", i) / ("B", i)."""
    warm = min(stages - stage - 1, num_microbatches)
    ops = [("F", i) for i in range(warm)]
    for i in range(num_microbatches - warm):
        ops.append(("F", warm + i))
        ops.append(("B", i))
    ops.extend(("B", i) for i in range(num_microbatches - warm, num_microbatches))
    return ops


@functools.lru_cache(maxsize=256)
def _stage_ops(stages: int, num_microbatches: int, stage: int) -> tuple[int, ...]:
    """:func:`stage_order` coded for the simulator's loop: ``i`` for ("F", i), ``~i`` for ("B", i)."""
    return tuple(i if kind == "F" else ~i for kind, i in stage_order(stages, num_microbatches, stage))


def step_dependencies(schedule: Schedule) -> list[list[int]]:
    """For each microbatch, the microbatches whose stage-0 backward must finish before its first forward."""
    last: dict[tuple[str, int], int] = {}
    for i, mb in enumerate(schedule.microbatches):
        for s in mb.segments:
            last[(s.adapter, s.global_batch)] = i
    deps: list[list[int]] = []
    for i, mb in enumerate(schedule.microbatches):
        d = []
        for s in mb.segments:
            # the nearest earlier global batch of this adapter present in the schedule
            for g in range(s.global_batch - 1, -1, -1):
                p = last.get((s.adapter, g))
                if p is not None:
                    d.append(p)
                    break
        deps.append(d)
    return deps


def simulate(schedule: Schedule, cost: CostModel = CostModel()) -> SimResult:
    """Simulate ``schedule``; raises ``ValueError`` if its dependencies deadlock the 1F1B order."""
    S = schedule.stages
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ValueError(f"schedule stages must be a positive integer, got {S!r}")
    mbs = schedule.microbatches
    M = len(mbs)
    if M == 0:
        return SimResult(0.0, 0.0, 0.0, 0, 0, 0, 0, 0.0, 0.0)
    sizes_all = [m.padded_tokens for m in mbs]
    noop = [m.is_noop for m in mbs]
    fwd = [cost.forward(p, z) for p, z in zip(sizes_all, noop)]
    bwd = [cost.backward(p, z) for p, z in zip(sizes_all, noop)]
    deps = step_dependencies(schedule)
    f_end: list[list[float | None]] = [[None] * M for _ in range(S)]  # None: not done yet
    b_end: list[list[float | None]] = [[None] * M for _ in range(S)]
    orders = [_stage_ops(S, M, s) for s in range(S)]
    ptr = [0] * S
    free = [0.0] * S
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(S):
            order, k = orders[s], ptr[s]
            n = len(order)
            if k == n:
                continue
            f_here, b_here = f_end[s], b_end[s]
            f_prev = f_end[s - 1] if s > 0 else None
            b_next = b_end[s + 1] if s < S - 1 else None
            busy = free[s]
            while k < n:
                op = order[k]
                if op >= 0:  # forward of microbatch op
                    ready = busy
                    if f_prev is not None:
                        t = f_prev[op]
                        if t is None:
                            break
                        ready = max(ready, t)
                    else:
                        blocked = False
                        for p in deps[op]:
                            t = b_end[0][p]
                            if t is None:
                                blocked = True
                                break
                            ready = max(ready, t)
                        if blocked:
                            break
                    busy = f_here[op] = ready + fwd[op]
                else:  # backward of microbatch ~op
                    i = ~op
                    t = b_next[i] if b_next is not None else f_here[i]
                    if t is None:
                        break
                    busy = b_here[i] = max(busy, t) + bwd[i]
                k += 1
            if k != ptr[s]:
                remaining -= k - ptr[s]
                ptr[s], free[s] = k, busy
                progressed = True
        if not progressed:
            stuck = [(s, orders[s][ptr[s]]) for s in range(S) if ptr[s] < len(orders[s])]
            stuck = [(s, ("F", op) if op >= 0 else ("B", ~op)) for s, op in stuck]
            raise ValueError(
                f"schedule deadlocks under 1F1B with {S} stages: stalled at {stuck[:4]} "
                "(a global batch starts fewer than `stages` microbatches after the previous one ends)"
            )
    makespan = float(max(free))
    useful = sum(S * (fwd[i] + bwd[i]) for i in range(M) if not noop[i])
    real = sum(m.real_tokens for m in mbs)
    padded = sum(sizes_all)
    sizes = np.array([p for p, z in zip(sizes_all, noop) if not z], dtype=float)
    mean = sizes.mean() if sizes.size else 0.0
    return SimResult(
        time=makespan,
        bubble_fraction=1.0 - useful / (S * makespan) if makespan > 0 else 0.0,
        padding_fraction=(padded - real) / padded if padded else 0.0,
        num_microbatches=M,
        num_noops=sum(1 for m in mbs if m.is_noop),
        real_tokens=int(real),
        padded_tokens=int(padded),
        token_cv=float(sizes.std() / mean) if mean > 0 else 0.0,
        token_max_over_mean=float(sizes.max() / mean) if mean > 0 else 0.0,
    )


def simulate_flushed(pieces: list[Schedule], cost: CostModel = CostModel()) -> SimResult:
    """Schedules run one after another with the pipeline drained in between (times add up)."""
    results = [simulate(p, cost) for p in pieces]
    time = sum(r.time for r in results)
    S = pieces[0].stages if pieces else 1
    useful = sum((1.0 - r.bubble_fraction) * S * r.time for r in results)
    real = sum(r.real_tokens for r in results)
    padded = sum(r.padded_tokens for r in results)
    sizes = np.array([m.padded_tokens for p in pieces for m in p.microbatches if not m.is_noop], dtype=float)
    mean = sizes.mean() if sizes.size else 0.0
    return SimResult(
        time=time, bubble_fraction=1.0 - useful / (S * time) if time else 0.0,
        padding_fraction=(padded - real) / padded if padded else 0.0,
        num_microbatches=sum(r.num_microbatches for r in results), num_noops=sum(r.num_noops for r in results),
        real_tokens=real, padded_tokens=padded,
        token_cv=float(sizes.std() / mean) if mean > 0 else 0.0,
        token_max_over_mean=float(sizes.max() / mean) if mean > 0 else 0.0,
    )
