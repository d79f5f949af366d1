"""The two baselines a plan is compared with.

(a) :func:`sequential_ffd`: each job alone, one after another; each global batch packed first-fit-decreasing (to
    the capacity, one adapter segment per microbatch) and the pipeline flushed after it. Returned as one schedule per
    global batch; :func:`scheduling.simulate.simulate_flushed` adds up their times. The order a flushed batch's
    microbatches run in is the issue's to leave open and it moves the time by up to ~10%: the baseline takes the best
    order (every order up to ``BEST_ORDER_EXHAUSTIVE`` microbatches; beyond, the best of FFD's, ascending and
    descending), so it is not handicapped by the order FFD happens to open its bins in.
(b) :func:`mlora_like`: one adapter per microbatch; each adapter's samples in dataset order, as many per microbatch
    as fit when every one is padded to the longest of them (no packing); adapters take turns round-robin, skipping one
    whose next global batch must still wait for its optimizer step, and a no-op slot when every one must wait.
"""

from __future__ import annotations

from typing import Sequence

from .jobs import Job, PlanParams, round_up, validate_jobs
from .schedule import NOOP, Microbatch, Schedule, Segment, optimizer_steps_for
from .simulate import CostModel, simulate


def _ffd(items: list[tuple[int, int]], capacity: int, pad: int) -> list[list[tuple[int, int]]]:
    """Classic first-fit-decreasing of (sample, tokens) pieces of one adapter; a bin's load is padded once."""
    bins: list[list[tuple[int, int]]] = []
    sums: list[int] = []
    for s, t in sorted(items, key=lambda x: (-x[1], x[0])):
        for b in range(len(bins)):
            if round_up(sums[b] + t, pad) <= capacity:
                bins[b].append((s, t))
                sums[b] += t
                break
        else:
            bins.append([(s, t)])
            sums.append(t)
    return bins


def _segment(adapter: str, g: int, pieces: list[tuple[int, int]], padded: int) -> Segment:
    pieces = sorted(pieces)
    return Segment(adapter, g, tuple(s for s, _ in pieces), tuple(t for _, t in pieces), padded)


# Flushed batches of at most this many microbatches are run in their best order found by trying every order.
BEST_ORDER_EXHAUSTIVE = 6


def _best_order(mbs: list[Microbatch], params: PlanParams, cost: CostModel) -> list[Microbatch]:
    """The order of one flushed global batch's microbatches with the least simulated time (ties: the first found)."""
    from itertools import permutations

    def time(order) -> float:
        return simulate(Schedule(list(order), {}, params.capacity, params.pad_multiple, params.stages), cost).time

    if len(mbs) <= 1:
        return mbs
    if len(mbs) <= BEST_ORDER_EXHAUSTIVE:
        candidates = permutations(mbs)
    else:
        by_size = sorted(mbs, key=lambda m: m.padded_tokens)
        candidates = (mbs, by_size, by_size[::-1])
    best, best_t = mbs, time(mbs)
    for order in candidates:
        t = time(order)
        if t < best_t:
            best, best_t = list(order), t
    return best


def sequential_ffd(jobs: Sequence[Job], params: PlanParams, cost: CostModel = CostModel()) -> list[Schedule]:
    """Baseline (a): one flushed schedule per (job, global batch), jobs in the given order, each batch's
    microbatches in their best order under ``cost`` (see the module docstring)."""
    validate_jobs(jobs, params)
    out = []
    for job in jobs:
        for g in range(job.num_global_batches):
            items = [(s, t) for s in job.global_batch_samples(g) for t in job.pieces(s, params)]
            mbs = [Microbatch((_segment(job.adapter, g, b, round_up(sum(t for _, t in b), params.pad_multiple)),))
                   for b in _ffd(items, params.capacity, params.pad_multiple)]
            mbs = _best_order(mbs, params, cost)
            out.append(Schedule(mbs, optimizer_steps_for(mbs), params.capacity, params.pad_multiple, params.stages,
                                {"planner": "sequential-ffd", "adapter": job.adapter, "global_batch": g}))
    return out


def _mlora_microbatches(job: Job, params: PlanParams) -> list[Microbatch]:
    """One adapter's microbatches: dataset order, as many as fit padded to the longest; never across global batches."""
    pad = params.pad_multiple

    def close(g: int, pieces: list[tuple[int, int]]) -> Microbatch:
        padded = round_up(len(pieces) * max(t for _, t in pieces), pad)
        return Microbatch((Segment(job.adapter, g, tuple(s for s, _ in pieces), tuple(t for _, t in pieces), padded),))

    out = []
    for g in range(job.num_global_batches):
        cur: list[tuple[int, int]] = []
        for s in job.global_batch_samples(g):
            for t in job.pieces(s, params):
                trial = cur + [(s, t)]
                if cur and round_up(len(trial) * max(x for _, x in trial), pad) > params.capacity:
                    out.append(close(g, cur))
                    cur = [(s, t)]
                else:
                    cur = trial
        out.append(close(g, cur))
    return out


def mlora_like(jobs: Sequence[Job], params: PlanParams) -> Schedule:
    """Baseline (b): unpacked single-adapter microbatches, adapters round-robin (see the module docstring)."""
    validate_jobs(jobs, params)
    queues = [_mlora_microbatches(j, params) for j in jobs]
    ptr = [0] * len(jobs)
    last_pos: dict[tuple[str, int], int] = {}
    mbs: list[Microbatch] = []
    turn = 0
    S = params.stages
    while any(ptr[k] < len(queues[k]) for k in range(len(jobs))):
        p = len(mbs)
        chosen = None
        for d in range(len(jobs)):
            k = (turn + d) % len(jobs)
            if ptr[k] >= len(queues[k]):
                continue
            seg = queues[k][ptr[k]].segments[0]
            prev = last_pos.get((seg.adapter, seg.global_batch - 1))
            if prev is not None and p - prev < S:
                continue
            chosen = k
            break
        if chosen is None:
            mbs.append(NOOP)
            continue
        mb = queues[chosen][ptr[chosen]]
        ptr[chosen] += 1
        seg = mb.segments[0]
        last_pos[(seg.adapter, seg.global_batch)] = p
        mbs.append(mb)
        turn = (chosen + 1) % len(jobs)
    return Schedule(mbs, optimizer_steps_for(mbs), params.capacity, params.pad_multiple, params.stages,
                    {"planner": "mlora-like"})
