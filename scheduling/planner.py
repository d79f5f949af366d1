"""Pack many jobs' samples into balanced microbatches for one shared pipeline.

The algorithm (LoRAFusion's, with its free knobs searched and judged by the 1F1B simulator):

1. **Group** adapters: order them long-sample / short-sample alternately, then deal them to ``G`` groups by least
   tokens so far (longest-processing-time), so each group mixes long and short samples and the groups carry similar
   work per global batch. A (global batch, group) pair is a *unit*.
2. **Stagger** the units by list scheduling: whenever work is needed, the *ready* group (its previous global batch
   ended at least ``stages`` microbatches ago, so its optimizer step has run) with the most tokens left, or the most
   global batches left (both orders compete: the second keeps a group of many short global batches from being left
   to the end, where its dependency gaps idle the pipeline), opens its next unit; while one group waits for its
   optimizer step the others keep the pipeline full. When no group is ready, an explicit no-op slot is inserted.
3. **Pack**, two competing packers:
   - *stream*: every microbatch is filled to a target size ``tau <= capacity`` from the open units, oldest first,
     crossing unit boundaries (a microbatch may end one group's global batch and start another group's), so every
     microbatch but the last is full. An adapter's segment is chosen by exact subset sum to land on a padding
     multiple (a padding token costs compute, an empty one does not). An adapter none of whose samples fits the room
     left is passed over for the next one (opening a ready group's unit if need be) instead of closing the
     microbatch: under 1F1B a microbatch smaller than its neighbours saves no time (the stages wait for the larger
     ones around it), so every token left out of the body only lengthens the run. The first microbatches ramp up
     (``HEAD_RAMPS``) and the last ones ramp down linearly (``STREAM_TAILS``, :func:`drain_room`) so the pipeline
     fills and drains with little idle time. A second variant fills each microbatch from all open units' adapters
     at once (:func:`joint_fill`: exact per-adapter subset sums, then a knapsack over padding multiples, so the
     microbatch holds the most real tokens), which leaves fewer microbatches part-empty.
   - *units*: each unit packed on its own into ``K`` microbatches, by greedy first-fit-decreasing onto the
     least-loaded microbatch plus a move/swap local search, and, when ``milp_time_limit > 0`` (opt-in; the
     default and the CLI's default are 0), by an exact MILP (HiGHS through ``scipy.optimize.milp``; fewest
     microbatches, then least ``max padded load + total padded tokens``) under that time limit, keeping the better
     of the two only where HiGHS proves its answer optimal; then a merge pass joins adjacent under-filled
     microbatches of disjoint adapters and drops no-op slots wherever the dependency rule still holds.
4. **Choose** by simulation: every (G, tau, packer, order) is built and simulated; the best stream layout is
   retried with every head and drain ramp, the next ``RAMP_CANDIDATES - 1`` with the best head and then each drain
   (the best layout before the ramps are tuned is not always the best after); a units winner is refined (local
   search, MILP); on the best ``FINISH_CANDIDATES`` layouts the last microbatch may be cut into a drain ramp
   (``TAIL_RAMPS``), or the last few microbatches re-packed into a drain ramp of the shortest samples
   (``REPACK_TAILS``, :func:`repack_window`). The fastest simulated layout after that wins; ties go to the one that
   was better before it.

Rules every output keeps (checked by :mod:`scheduling.verify`): capacity, exact padding per adapter segment, no
microbatch holds two global batches of one adapter, and an adapter's global batch g+1 starts at least ``stages``
microbatches after g's last one. With the MILP off (the default) the output is a pure function of the input (the
seed is only recorded); with it on, see :func:`plan` on wall-clock limits.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .jobs import Job, PlanParams, round_up, validate_jobs
from .schedule import NOOP, Microbatch, Schedule, Segment, optimizer_steps_for
from .simulate import CostModel, simulate

log = logging.getLogger(__name__)

# fill ramps (first microbatches' sizes as fractions of the target) and drain ramp steps (fractions of the target a
# microbatch shrinks by; 0: none) for the stream packer, and the cuts of the last microbatch tried at the end; the
# simulator picks among them
HEAD_RAMPS: tuple[tuple[float, ...], ...] = (
    (), (0.5,), (0.25, 0.5), (0.5, 0.75), (0.25, 0.5, 0.75), (0.125, 0.25, 0.5),
    (0.13, 0.25, 0.44, 0.76), (0.15, 0.3, 0.5, 0.8), (0.18, 0.33, 0.58, 0.9), (0.1, 0.2, 0.35, 0.6, 0.85),
    (0.12, 0.24, 0.45, 0.7, 0.9))
# drain ramps of the stream packer: a float is a linear step (:func:`drain_room`), a tuple the last microbatches'
# sizes as fractions of the target, largest first (:func:`shape_room`); the longer, convex shapes follow the sizes a
# search over the simulator's idle time favours (the drain wants the last few microbatches small, the ones before
# them only a little below full)
STREAM_TAILS: tuple[float | tuple[float, ...], ...] = (
    0.0, 0.125, 0.25, 0.35, 0.5, (0.92, 0.82, 0.65, 0.48, 0.27), (0.9, 0.75, 0.55, 0.3), (0.85, 0.65, 0.45, 0.25),
    (0.95, 0.85, 0.7, 0.55, 0.4, 0.2), (0.93, 0.8, 0.64, 0.47, 0.3, 0.15))
TAIL_RAMPS: tuple[tuple[float, ...], ...] = ((0.5,), (0.3,), (0.5, 0.5), (0.6, 0.5), (0.5, 0.5, 0.5))
# joint filling (:func:`joint_fill`) runs a knapsack over padding multiples: used where a microbatch holds at most
# this many of them (capacity 8192 at padding 128), else only the sequential fill competes
JOINT_MAX_SLOTS = 64
# which ready group the stream packer opens next (:func:`_stream`); both compete
STREAM_ORDERS: tuple[str, ...] = ("tokens", "rounds")
# how many of the best stream layouts of phase 1 (per fill variant) get the head / drain ramp search of phase 2: the
# best layout with the phase-1 ramp is not always the best once the ramps are tuned
RAMP_CANDIDATES = 8
# how many of the best layouts get the final drain tuning (:func:`repack_window`, cut tails); the fastest after it wins
FINISH_CANDIDATES = 3
# entries the planner's fill memo (:func:`_memo`) holds before it starts over (28k for 4 jobs of 128-256-sample
# global batches at 8192, ~120 MiB)
MEMO_LIMIT = 100_000
# the last microbatches re-packed into a drain ramp (:func:`repack_window`): window lengths and ramp shapes
REPACK_WINDOWS: tuple[int, ...] = tuple(range(3, 13))
REPACK_TAILS: tuple[tuple[float, ...], ...] = (
    (0.75, 0.5, 0.25), (0.9, 0.75, 0.55, 0.3), (0.85, 0.65, 0.45, 0.25), (0.92, 0.82, 0.65, 0.48, 0.27),
    (0.95, 0.85, 0.7, 0.55, 0.4, 0.2), (0.93, 0.8, 0.64, 0.47, 0.3, 0.15), (0.9, 0.7, 0.5, 0.3, 0.15))

Item = tuple[str, int, int]  # (adapter, sample id, tokens)
Bin = list[Item]


# ----------------------------------------------------------------------------------------------------- bin helpers


def bin_segments(items: Sequence[Item]) -> dict[str, int]:
    seg: dict[str, int] = {}
    for a, _, t in items:
        seg[a] = seg.get(a, 0) + t
    return seg


def padded_load(items: Sequence[Item], pad: int) -> int:
    return sum(round_up(t, pad) for t in bin_segments(items).values())


def packing_cost(bins: Sequence[Bin], pad: int) -> tuple[int, int]:
    """The key packings are compared by: (microbatches, largest padded load + total padded tokens)."""
    loads = [padded_load(b, pad) for b in bins]
    return (len(bins), (max(loads) if loads else 0) + sum(loads))


# --------------------------------------------------------------------------------------------------------- packers


def _sorted_items(items: Sequence[Item]) -> list[Item]:
    return sorted(items, key=lambda it: (-it[2], it[0], it[1]))


def pack_greedy(items: Sequence[Item], num_bins: int, capacity: int, pad: int, *, improve: bool = True) -> list[Bin]:
    """First-fit-decreasing onto the least-loaded of ``num_bins`` microbatches (more if they cannot hold it all),
    then (``improve``) a local search of moves and swaps that lowers ``max load + total padded tokens``."""
    items = _sorted_items(items)
    k = max(1, num_bins)
    while True:
        bins: list[Bin] = [[] for _ in range(k)]
        segs: list[dict[str, int]] = [{} for _ in range(k)]
        loads = [0] * k
        ok = True
        for it in items:
            a, _, t = it
            best, best_key = -1, None
            for b in range(k):
                old = segs[b].get(a, 0)
                new_load = loads[b] - round_up(old, pad) + round_up(old + t, pad)
                if new_load > capacity:
                    continue
                # least loaded after placing; among ties prefer a bin that already holds this adapter (no new segment)
                key = (new_load, 0 if old else 1, b)
                if best_key is None or key < best_key:
                    best, best_key = b, key
            if best < 0:
                ok = False
                break
            bins[best].append(it)
            segs[best][a] = segs[best].get(a, 0) + t
            loads[best] = best_key[0]
        if ok:
            break
        k += 1
    if improve and k > 1:
        bins = _local_search(bins, capacity, pad)
    return bins


def _local_search(bins: list[Bin], capacity: int, pad: int, max_passes: int = 4) -> list[Bin]:
    """Moves and swaps between microbatches that lower ``max load + total padded tokens`` (capacity kept)."""
    k = len(bins)
    segs = [bin_segments(b) for b in bins]
    loads = [sum(round_up(t, pad) for t in s.values()) for s in segs]

    def load_with(b: int, a_out: str | None, t_out: int, a_in: str | None, t_in: int) -> int:
        s = segs[b]
        load = loads[b]
        if a_out is not None and a_out == a_in:
            old = s[a_out]
            return load - round_up(old, pad) + round_up(old - t_out + t_in, pad)
        if a_out is not None:
            old = s[a_out]
            load += round_up(old - t_out, pad) - round_up(old, pad)
        if a_in is not None:
            old = s.get(a_in, 0)
            load += round_up(old + t_in, pad) - round_up(old, pad)
        return load

    def apply(b: int, a_out: str | None, t_out: int, a_in: str | None, t_in: int) -> None:
        s = segs[b]
        if a_out is not None:
            s[a_out] -= t_out
            if s[a_out] == 0:
                del s[a_out]
        if a_in is not None:
            s[a_in] = s.get(a_in, 0) + t_in
        loads[b] = sum(round_up(t, pad) for t in s.values())

    for _ in range(max_passes):
        improved = False
        for x in range(k):
            for y in range(k):
                if x == y:
                    continue
                i = 0
                while i < len(bins[x]):
                    ax, sx, tx = bins[x][i]
                    cur_max = max(loads)
                    others_max = max((loads[z] for z in range(k) if z != x and z != y), default=0)
                    base = cur_max + loads[x] + loads[y]
                    # move item i from x to y
                    lx, ly = load_with(x, ax, tx, None, 0), load_with(y, None, 0, ax, tx)
                    best = None
                    if ly <= capacity and len(bins[x]) > 1:
                        gain = base - (max(others_max, lx, ly) + lx + ly)
                        if gain > 0:
                            best = (gain, None)
                    # swap item i of x with item j of y
                    for j, (ay, sy, ty) in enumerate(bins[y]):
                        if ty == tx and ay == ax:
                            continue
                        lx2 = load_with(x, ax, tx, ay, ty)
                        ly2 = load_with(y, ay, ty, ax, tx)
                        if lx2 > capacity or ly2 > capacity:
                            continue
                        gain = base - (max(others_max, lx2, ly2) + lx2 + ly2)
                        if gain > 0 and (best is None or gain > best[0]):
                            best = (gain, j)
                    if best is None:
                        i += 1
                        continue
                    improved = True
                    item = bins[x][i]
                    if best[1] is None:
                        apply(x, ax, tx, None, 0)
                        apply(y, None, 0, ax, tx)
                        bins[x].pop(i)
                        bins[y].append(item)
                    else:
                        j = best[1]
                        other = bins[y][j]
                        apply(x, ax, tx, other[0], other[2])
                        apply(y, other[0], other[2], ax, tx)
                        bins[x][i] = other
                        bins[y][j] = item
                        i += 1
        if not improved:
            break
    return [b for b in bins if b]


def pack_milp(items: Sequence[Item], num_bins: int, capacity: int, pad: int, time_limit: float) -> list[Bin] | None:
    """Exact packing into ``num_bins`` microbatches: minimise largest padded load + total padded tokens.

    Returns HiGHS's solution when it proves it optimal within ``time_limit`` seconds, else ``None`` (the caller then
    keeps the greedy packing). An incumbent cut off by the clock is dropped on purpose: which incumbent HiGHS holds
    when the time runs out depends on the machine's speed and load, and a plan must be the same for the same input.
    A proven optimum is what HiGHS's deterministic search reaches whatever the clock, so the plan can then differ
    only where one machine proves the optimum within the limit and another does not (``milp_time_limit=0`` turns
    the MILP off and removes even that).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    items = _sorted_items(items)
    n, K = len(items), num_bins
    adapters = sorted({a for a, _, _ in items})
    A = len(adapters)
    aidx = {a: i for i, a in enumerate(adapters)}
    nx, ns = n * K, A * K
    nv = nx + ns + 1
    zi = nv - 1

    def xv(i: int, b: int) -> int:
        return i * K + b

    def sv(a: int, b: int) -> int:
        return nx + a * K + b

    c = np.zeros(nv)
    c[nx:nx + ns] = pad
    c[zi] = 1.0
    rows = n + ns + 2 * K
    M = lil_matrix((rows, nv))
    lo = np.empty(rows)
    hi = np.empty(rows)
    r = 0
    for i in range(n):
        for b in range(K):
            M[r, xv(i, b)] = 1
        lo[r] = hi[r] = 1
        r += 1
    for a in range(A):
        for b in range(K):
            for i, (ai, _, t) in enumerate(items):
                if aidx[ai] == a:
                    M[r, xv(i, b)] = t
            M[r, sv(a, b)] = -pad
            lo[r], hi[r] = -np.inf, 0
            r += 1
    for b in range(K):
        for a in range(A):
            M[r, sv(a, b)] = pad
        lo[r], hi[r] = -np.inf, capacity
        r += 1
        for a in range(A):
            M[r, sv(a, b)] = pad
        M[r, zi] = -1
        lo[r], hi[r] = -np.inf, 0
        r += 1
    lb = np.zeros(nv)
    ub = np.ones(nv)
    ub[nx:nx + ns] = capacity // pad
    ub[zi] = capacity
    lb[xv(0, 0)] = 1  # symmetry: the largest item sits in microbatch 0
    integrality = np.ones(nv)
    integrality[zi] = 0
    res = milp(c, constraints=LinearConstraint(M.tocsr(), lo, hi), integrality=integrality, bounds=Bounds(lb, ub),
               options={"time_limit": float(time_limit), "disp": False, "presolve": True})
    if res.status != 0 or res.x is None:  # 0: proven optimal; 1: stopped by the time limit; 2: infeasible
        return None
    x = res.x[:nx].reshape(n, K)
    bins: list[Bin] = [[] for _ in range(K)]
    for i in range(n):
        bins[int(np.argmax(x[i]))].append(items[i])
    if any(padded_load(b, pad) > capacity for b in bins):
        return None
    return [b for b in bins if b]


def pack_unit(items: Sequence[Item], num_bins: int, capacity: int, pad: int, *, milp_time_limit: float = 0.0,
              improve: bool = True) -> tuple[list[Bin], str]:
    """Greedy packing, and (``milp_time_limit > 0``) the MILP's; the better by :func:`packing_cost`."""
    greedy = pack_greedy(items, num_bins, capacity, pad, improve=improve)
    if milp_time_limit <= 0 or len(greedy) == 1 and len(bin_segments(greedy[0])) == 1:
        return greedy, "greedy"
    # fewest microbatches first: the requested count when greedy needed more, else greedy's count
    exact = None
    for k in sorted({min(max(1, num_bins), len(greedy)), len(greedy)}):
        exact = pack_milp(items, k, capacity, pad, milp_time_limit)
        if exact is not None:
            break
    if exact is not None and packing_cost(exact, pad) < packing_cost(greedy, pad):
        return exact, "milp"
    return greedy, "greedy"


# --------------------------------------------------------------------------------------------------- plan pieces


def group_adapters(jobs: Sequence[Job], num_groups: int) -> list[list[str]]:
    """Deal adapters to ``num_groups`` groups: long/short alternating order, each to the group with least tokens."""
    by_len = sorted(jobs, key=lambda j: (-sum(j.lengths) / len(j.lengths), j.adapter))
    order = []
    lo, hi = 0, len(by_len) - 1
    while lo <= hi:
        order.append(by_len[lo])
        if lo != hi:
            order.append(by_len[hi])
        lo, hi = lo + 1, hi - 1
    groups: list[list[str]] = [[] for _ in range(num_groups)]
    work = [0.0] * num_groups
    for j in order:
        per_gb = sum(j.lengths) / len(j.lengths) * j.global_batch_size
        g = min(range(num_groups), key=lambda k: (work[k], k))
        groups[g].append(j.adapter)
        work[g] += per_gb
    return [g for g in groups if g]


@dataclass
class _Unit:
    group: int
    round: int
    items: list[Item]
    bins: list[Bin] | None = None


def _units(jobs: Sequence[Job], groups: list[list[str]], params: PlanParams) -> list[list[_Unit]]:
    by_id = {j.adapter: j for j in jobs}
    out = []
    for k, members in enumerate(groups):
        rounds = max(by_id[a].num_global_batches for a in members)
        units = []
        for r in range(rounds):
            items: list[Item] = []
            for a in members:
                job = by_id[a]
                if r < job.num_global_batches:
                    for s in job.global_batch_samples(r):
                        items.extend((a, s, t) for t in job.pieces(s, params))
            units.append(_Unit(k, r, items))
        out.append(units)
    return out


def _num_bins(items: Sequence[Item], capacity: int, target: int) -> int:
    total = sum(t for _, _, t in items)
    return max(1, math.ceil(total / capacity), round(total / target))


def _sequence(units: list[list[_Unit]], stages: int) -> list[tuple[int, int, Bin] | None]:
    """List-schedule the units (each kept contiguous); ``None`` is a no-op slot. Entries: (group, round, bin)."""
    nxt = [0] * len(units)
    ready = [0] * len(units)
    left = [sum(len(u.bins) for u in us) for us in units]
    out: list[tuple[int, int, Bin] | None] = []
    while any(nxt[k] < len(units[k]) for k in range(len(units))):
        p = len(out)
        cands = [k for k in range(len(units)) if nxt[k] < len(units[k]) and ready[k] <= p]
        if not cands:
            out.append(None)
            continue
        k = max(cands, key=lambda k: (left[k], -k))
        u = units[k][nxt[k]]
        for b in u.bins:
            out.append((k, u.round, b))
        left[k] -= len(u.bins)
        nxt[k] += 1
        ready[k] = len(out) - 1 + stages
    return out


def _to_microbatch(items: Bin, round_of: dict[str, int], pad: int) -> Microbatch:
    by_a: dict[str, list[tuple[int, int]]] = {}
    for a, s, t in items:
        by_a.setdefault(a, []).append((s, t))
    segs = []
    for a in sorted(by_a):
        st = sorted(by_a[a])
        tot = sum(t for _, t in st)
        segs.append(Segment(a, round_of[a], tuple(s for s, _ in st), tuple(t for _, t in st), round_up(tot, pad)))
    return Microbatch(tuple(segs))


def _dependencies_hold(mbs: list[Microbatch], stages: int) -> bool:
    first: dict[tuple[str, int], int] = {}
    last: dict[tuple[str, int], int] = {}
    for i, mb in enumerate(mbs):
        for s in mb.segments:
            first.setdefault((s.adapter, s.global_batch), i)
            last[(s.adapter, s.global_batch)] = i
    for (a, g), p in last.items():
        q = first.get((a, g + 1))
        if q is not None and q - p < stages:
            return False
    return True


def merge_pass(mbs: list[Microbatch], capacity: int, stages: int, target: int) -> list[Microbatch]:
    """Drop no-op slots and merge adjacent under-filled microbatches of disjoint adapters where the rules allow."""
    out = list(mbs)
    i = 0
    while i < len(out):
        if out[i].is_noop:
            trial = out[:i] + out[i + 1:]
            if _dependencies_hold(trial, stages):
                out = trial
                continue
        i += 1
    i = 0
    while i + 1 < len(out):
        a, b = out[i], out[i + 1]
        if (not a.is_noop and not b.is_noop and set(a.adapters).isdisjoint(b.adapters)
                and a.padded_tokens + b.padded_tokens <= min(capacity, target)
                and (a.padded_tokens < target // 2 or b.padded_tokens < target // 2)):
            merged = Microbatch(tuple(sorted(a.segments + b.segments, key=lambda s: s.adapter)))
            trial = out[:i] + [merged] + out[i + 2:]
            if _dependencies_hold(trial, stages):
                out = trial
                continue
        i += 1
    return out


def _build(jobs: Sequence[Job], params: PlanParams, groups: list[list[str]], target: int, *,
           milp_time_limit: float, improve: bool, stats: dict | None = None) -> list[Microbatch]:
    units = _units(jobs, groups, params)
    for us in units:
        for u in us:
            k = _num_bins(u.items, params.capacity, target)
            u.bins, how = pack_unit(u.items, k, params.capacity, params.pad_multiple,
                                    milp_time_limit=milp_time_limit, improve=improve)
            if stats is not None:
                stats[how] = stats.get(how, 0) + 1
    seq = _sequence(units, params.stages)
    mbs = []
    for e in seq:
        if e is None:
            mbs.append(NOOP)
        else:
            k, r, b = e
            mbs.append(_to_microbatch(b, {a: r for a in groups[k]}, params.pad_multiple))
    return merge_pass(mbs, params.capacity, params.stages, target)


def _reach(items: Sequence[tuple[int, int]], limit: int) -> list[int]:
    """Subset-sum bitsets: bit s of entry i is set when some subset of the first i items sums to s (s <= limit)."""
    mask = (1 << (limit + 1)) - 1
    reach = [1]
    for _, t in items:
        reach.append((reach[-1] | (reach[-1] << t)) & mask)
    return reach


def _set_bits(bits: int) -> np.ndarray:
    """The positions of the set bits of a non-negative integer, ascending (int64)."""
    n = bits.bit_length()
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    flags = np.unpackbits(np.frombuffer(bits.to_bytes((n + 7) // 8, "little"), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(flags).astype(np.int64)


def _max_below(bits: int, m: int) -> int:
    """The largest set bit of ``bits`` at or below ``m`` (0 when none but bit 0)."""
    return (bits & ((1 << (m + 1)) - 1)).bit_length() - 1 if m >= 0 else -1


def _pick(reach: list[int], items: Sequence[tuple[int, int]], total: int) -> list[int]:
    chosen = []
    for i in range(len(items) - 1, -1, -1):
        if not (reach[i] >> total) & 1:
            chosen.append(i)
            total -= items[i][1]
    return chosen[::-1]


WASTE_WEIGHT = 4  # a padding token costs compute; room left empty is mostly filled by the next adapter
WASTE_SEARCH = 4  # how many padding multiples below the room a segment may stop short to avoid padding


def _best_fills(bits: int, limit: int, pad: int) -> list[int]:
    """For every padded budget m = 0, pad, 2 pad, .. <= limit: the best ``s - WASTE_WEIGHT * padding(s)`` over the
    reachable sums ``s`` whose padded size fits m."""
    out, best = [], 0
    for m in range(0, limit + 1, pad):
        s = _max_below(bits, m)
        if s > 0:
            best = max(best, s - WASTE_WEIGHT * (-s % pad))
        out.append(best)
    return out


def fill_subset(items: Sequence[tuple[int, int]], limit: int, pad: int = 1,
                after: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Indices of a subset of (sample, tokens) items to place in ``limit`` padded tokens (exact subset sum).

    The subset's padded size (its sum rounded up to ``pad``) fits ``limit``; it maximises its real tokens minus
    ``WASTE_WEIGHT`` times its padding tokens (a padding token costs compute, an empty one does not), plus, given
    ``after`` (the items of the adapter that fills the room left), the same value for that adapter's best fill.
    """
    if limit <= 0 or not items:
        return []
    limit = limit // pad * pad
    reach = _reach(items, limit)
    full = reach[-1]
    rest_value = _best_fills(_reach(after, limit)[-1], limit, pad) if after else None
    best, value = 0, None
    lowest = 0 if after else max(0, limit - WASTE_SEARCH * pad)
    m = limit
    while m > lowest:
        s = _max_below(full, m)
        if s <= 0:
            break
        padded = -(-s // pad) * pad
        v = s - WASTE_WEIGHT * (padded - s)
        if rest_value is not None:
            v += rest_value[(limit - padded) // pad]
        if value is None or v > value:
            best, value = s, v
        m = min(m, padded) - pad  # every sum in (m - pad, m] was this one or smaller
    if best <= 0:
        return []
    return _pick(reach, items, best)


def joint_fill(groups: Sequence[Sequence[tuple[int, int]]], room: int, pad: int,
               memo: dict | None = None) -> list[list[int]]:
    """Fill ``room`` padded tokens from several adapters at once: for each list of (sample, tokens) items (one
    adapter's), the indices of the subset to take, so that the padded segments fit ``room`` together and hold the
    most real tokens (fewest padding plus empty tokens in the microbatch); exact (subset sums per adapter, then a
    max-plus knapsack over padding multiples). Ties go to the smaller share for the earlier adapters (measured
    better than the larger: the later, newer units' samples fill the microbatch and the older units' remain
    for the gaps). ``memo``: a dict keeping each adapter's subset-sum table across calls (:func:`_slot_sums`)."""
    slots = room // pad
    n = len(groups)
    if slots <= 0 or n == 0:
        return [[] for _ in groups]
    limit = slots * pad
    m_idx, shift, valid = _knapsack_index(slots)
    best = np.zeros(slots + 1, dtype=np.int64)  # most real tokens from adapters i.. in m slots
    tables = []
    for i in range(n - 1, -1, -1):
        sk = _slot_sums(groups[i], limit, pad, memo)
        cand = np.where(valid & (sk[:, None] >= 0), sk[:, None] + best[shift], -1)
        k_best = np.argmax(cand, axis=0)
        best = cand[k_best, m_idx]
        tables.append((k_best, sk))
    tables.reverse()
    out, m = [], slots
    for i in range(n):
        k_best, sk = tables[i]
        k = int(k_best[m])
        # the prefix bitsets are rebuilt for the adapters that give samples only (kept for all, they took memory
        # in proportion to items x capacity)
        out.append(_pick(_reach(groups[i], int(sk[k])), groups[i], int(sk[k])) if k else [])
        m -= k
    return out


@functools.lru_cache(maxsize=64)
def _knapsack_index(slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays of :func:`joint_fill`'s max-plus step over ``slots`` padding multiples: m, (m - k) clipped at
    0, and whether m - k >= 0 ([k, m])."""
    m_idx = np.arange(slots + 1)
    shift = m_idx[None, :] - m_idx[:, None]
    valid = shift >= 0
    shift = np.where(valid, shift, 0)
    for a in (m_idx, shift, valid):
        a.flags.writeable = False
    return m_idx, shift, valid


def _slot_sums(items: Sequence[tuple[int, int]], limit: int, pad: int, memo: dict | None) -> np.ndarray:
    """One adapter's table for :func:`joint_fill`: for every k padding multiples up to ``limit``, the largest sum
    of a subset of ``items`` whose padded size is exactly k (-1: none; k = 0: nothing), kept in ``memo`` (an
    adapter's items are often unchanged from one microbatch to the next)."""
    key = ("slot_sums", tuple(items), limit, pad)
    sk = memo.get(key) if memo is not None else None
    if sk is None:
        sums = _set_bits(_reach(items, limit)[-1])
        tops = np.arange(limit // pad + 1) * pad  # the largest sum each number of slots holds
        sk = sums[np.searchsorted(sums, tops, side="right") - 1]  # sum 0 is always reachable
        sk[1:][sk[1:] <= tops[:-1]] = -1
        sk.flags.writeable = False
        if memo is not None:
            memo[key] = sk
    return sk


def _memo(memo: dict | None, fill, items: list, room: int, pad: int) -> tuple:
    """``fill(items, room, pad)`` (:func:`joint_fill` or :func:`fill_subset`) as tuples, looked up in / stored to
    ``memo`` (tuples: a stored result is handed out as it is, and nobody can change it)."""
    key = (fill.__name__, tuple(tuple(x) if isinstance(x, list) else x for x in items), room, pad)
    got = memo.get(key) if memo is not None else None
    if got is None:
        if fill is joint_fill:
            got = tuple(tuple(take) for take in joint_fill(items, room, pad, memo))
        else:
            got = tuple(fill(items, room, pad))
        if memo is not None:
            if len(memo) >= MEMO_LIMIT:  # a bound on its memory; results never depend on it
                memo.clear()
            memo[key] = got
    return got


def _ramp_room(left: int, ramp: Iterable[int], target: int) -> int:
    """Room for the next microbatch on a drain ramp (its sizes, smallest first): the first size of the shortest tail
    of the ramp that still holds the ``left`` tokens, or ``target`` while the whole ramp cannot, so the ramp starts
    as late as possible and the last microbatches are the smallest."""
    held = 0
    for size in ramp:
        held += size
        if held >= left:
            return size
    return target


def _drain_sizes(target: int, tail: float | Sequence[float], pad: int) -> Sequence[int]:
    """The drain ramp ``tail``'s microbatch sizes, smallest first: a linear step (a float, see :func:`drain_room`) or
    the last microbatches' sizes as fractions of ``target``, largest first (a sequence, see :func:`shape_room`)."""
    if isinstance(tail, (int, float)):
        delta = max(pad, int(target * tail))
        return range((target - 1) % delta + 1, target, delta)
    return [max(pad, int(target * frac)) for frac in reversed(tail)]


def drain_room(left: int, target: int, step: float, pad: int) -> int:
    """:func:`_ramp_room` on a linear drain ramp whose sizes fall by ``step * target`` tokens a microbatch
    (``target - d``, ``target - 2 d``, .. down to the smallest positive one), at least ``pad``."""
    return max(pad, _ramp_room(left, _drain_sizes(target, step, pad), target))


def shape_room(left: int, target: int, shape: Sequence[float], pad: int) -> int:
    """:func:`_ramp_room` on an explicit drain ramp: ``shape`` lists the last microbatches' sizes as fractions of
    ``target``, largest first (each at least ``pad``)."""
    return _ramp_room(left, _drain_sizes(target, shape, pad), target)


def _stream(jobs: Sequence[Job], params: PlanParams, groups: list[list[str]], target: int,
            head: Sequence[float] = (), tail: float | Sequence[float] = 0.0,
            joint: bool = False, order: str = "tokens", memo: dict | None = None) -> list[Microbatch]:
    """Stream packing: fill every microbatch to ``target`` from the open (global batch, group) units, oldest first,
    opening a ready group's next unit when they run dry; an adapter's segment is chosen by exact subset sum so that
    it fills the room to a padding multiple, and an adapter with nothing that fits is passed over for the next.
    ``head``: the first microbatches' sizes as fractions of ``target``; ``tail``: the drain ramp, a linear step as a
    fraction of ``target`` (0: none; see :func:`drain_room`) or the last microbatches' sizes (:func:`shape_room`).
    ``order``: which ready group opens next, the one with the most tokens left (``"tokens"``) or the most global
    batches left, then tokens (``"rounds"``: a group with many short global batches is started early, so its
    dependency gaps do not pile up at the end). A no-op slot when nothing may run. ``memo``: a dict that keeps the
    fills computed for one (items, room) across calls (the planner's many variants of one layout share most of their
    microbatches); the result does not depend on it."""
    return _stream_tails(jobs, params, groups, target, head, (tail,), joint=joint, order=order, memo=memo)[0]


class _StreamState:
    """The stream packer's progress (:func:`_stream_tails`); :meth:`copy` forks it so several drain ramps can finish
    one body."""

    def __init__(self, jobs: Sequence[Job], params: PlanParams, groups: list[list[str]], order: str,
                 memo: dict | None):
        self.params, self.groups, self.order, self.memo = params, groups, order, memo
        self.by_id = {j.adapter: j for j in jobs}
        self.rounds = [max(self.by_id[a].num_global_batches for a in members) for members in groups]
        self.nxt = [0] * len(groups)
        self.ready = [0] * len(groups)
        self.left = [sum(t for a in members for s in self.by_id[a].global_batches() for x in s
                         for t in self.by_id[a].pieces(x, params)) for members in groups]
        # open units: [group, round, {adapter: [(sample, tokens), ...]}] in opening order
        self.active: list[list] = []
        self.mbs: list[Microbatch] = []

    def copy(self) -> "_StreamState":
        new = object.__new__(_StreamState)
        new.__dict__.update(self.__dict__)
        new.nxt, new.ready, new.left, new.mbs = self.nxt[:], self.ready[:], self.left[:], self.mbs[:]
        new.active = [[u[0], u[1], {a: list(its) for a, its in u[2].items()}] for u in self.active]
        return new

    def running(self) -> bool:
        return bool(self.active) or any(self.nxt[k] < self.rounds[k] for k in range(len(self.groups)))

    def priority(self, k: int) -> tuple:
        left, nxt = self.left, self.nxt
        return (left[k], -k) if self.order == "tokens" else (self.rounds[k] - nxt[k], left[k], -k)

    def openable(self, p: int) -> list[int]:
        return [k for k in range(len(self.groups)) if self.nxt[k] < self.rounds[k] and self.ready[k] <= p
                and all(u[0] != k for u in self.active)]

    def open_unit(self, k: int) -> None:
        r = self.nxt[k]
        self.nxt[k] += 1
        rem = {}
        for a in self.groups[k]:
            job = self.by_id[a]
            if r < job.num_global_batches:
                its = [(x, t) for x in job.global_batch_samples(r) for t in job.pieces(x, self.params)]
                rem[a] = sorted(its, key=lambda it: (-it[1], it[0]))
        self.active.append([k, r, rem])

    def step(self, room: int, joint: bool) -> None:
        """Add the next microbatch (or no-op slot), filling at most ``room`` padded tokens."""
        pad, S, cap = self.params.pad_multiple, self.params.stages, self.params.capacity
        active, left = self.active, self.left
        p = len(self.mbs)
        content: dict[str, list[tuple[int, int]]] = {}
        round_of: dict[str, int] = {}
        finished: list[list] = []
        misfits: set[tuple[int, str]] = set()
        while joint:
            cands = [(unit, a) for unit in active for a, its in unit[2].items() if its]
            opts = self.openable(p)
            picks = _memo(self.memo, joint_fill, [unit[2][a] for unit, a in cands], room, pad) if cands else []
            used = sum(round_up(sum(unit[2][a][i][1] for i in take), pad) for (unit, a), take in zip(cands, picks))
            if opts and (not cands or room - used >= pad):
                self.open_unit(max(opts, key=self.priority))
                continue
            if cands and not any(picks):  # nothing fits the room: an empty microbatch takes the smallest sample
                unit, a = cands[0]
                picks = [[len(unit[2][a]) - 1]] + [[] for _ in cands[1:]]
            for (unit, a), take in zip(cands, picks):
                if not take:
                    continue
                its = unit[2][a]
                chosen = [its[i] for i in take]
                unit[2][a] = [it for i, it in enumerate(its) if i not in set(take)]
                content[a] = chosen
                round_of[a] = unit[1]
                left[unit[0]] -= sum(t for _, t in chosen)
                if all(not v for v in unit[2].values()):
                    finished.append(unit)
            break
        while not joint:
            cand = next(((unit, a) for unit in active if unit not in finished for a, its in unit[2].items()
                         if its and a not in content and (unit[0], a) not in misfits), None)
            if cand is None:
                opts = self.openable(p)
                if not opts:
                    break
                self.open_unit(max(opts, key=self.priority))
                continue
            unit, a = cand
            its = unit[2][a]
            limit = room // pad * pad
            if not content and its[-1][1] > limit:
                limit = cap // pad * pad  # an empty microbatch always takes the adapter's smallest sample
            total = sum(t for _, t in its)
            if total <= limit:
                take = list(range(len(its)))
            else:
                take = _memo(self.memo, fill_subset, its, limit, pad)
            if not take:
                misfits.add((unit[0], a))  # nothing of it fits the room left: try the other adapters
                continue
            chosen = [its[i] for i in take]
            unit[2][a] = [it for i, it in enumerate(its) if i not in set(take)]
            got = sum(t for _, t in chosen)
            content[a] = chosen
            round_of[a] = unit[1]
            room -= round_up(got, pad)
            left[unit[0]] -= got
            if all(not v for v in unit[2].values()):
                finished.append(unit)
            if room < pad:
                break
        for unit in finished:
            active.remove(unit)
            self.ready[unit[0]] = p + S
        if not content:
            self.mbs.append(NOOP)
            return
        self.mbs.append(_to_microbatch([(a, x, t) for a, its in content.items() for x, t in its], round_of, pad))


def _stream_tails(jobs: Sequence[Job], params: PlanParams, groups: list[list[str]], target: int,
                  head: Sequence[float], tails: Sequence[float | Sequence[float]], *, joint: bool = False,
                  order: str = "tokens", memo: dict | None = None) -> list[list[Microbatch]]:
    """:func:`_stream` for each drain ramp of ``tails``: the same as calling it once per ramp, but the body, where
    no ramp changes the room yet (more tokens left than the largest ramp holds), is packed once and shared."""
    if order not in STREAM_ORDERS:
        raise ValueError(f"order must be one of {STREAM_ORDERS}, got {order!r}")
    if not tails:
        raise ValueError("tails must name at least one drain ramp (0.0: none), got none")
    if any(not 0 < f <= 1 for f in head):
        raise ValueError(f"head ramp fractions must be in (0, 1], got {tuple(head)!r}")
    pad = params.pad_multiple

    def room_at(st: _StreamState, tail: float | Sequence[float] | None) -> int:
        p = len(st.mbs)
        room = int(target * head[p]) if p < len(head) else target
        if not tail:
            return room
        if isinstance(tail, (int, float)):
            return min(room, drain_room(sum(st.left), target, tail, pad))
        return min(room, shape_room(sum(st.left), target, tail, pad))

    body = _StreamState(jobs, params, groups, order, memo)
    # while more tokens are left than a ramp holds, it leaves the microbatches' room alone (0: no ramp)
    reach = max(sum(_drain_sizes(target, tl, pad)) if tl else 0 for tl in tails)
    while body.running() and sum(body.left) > reach:
        body.step(room_at(body, None), joint)
    out = []
    for j, tl in enumerate(tails):
        st = body if j == len(tails) - 1 else body.copy()
        while st.running():
            st.step(room_at(st, tl), joint)
        out.append(st.mbs)
    return out


def split_tail(mbs: list[Microbatch], fractions: Sequence[float], pad: int) -> list[Microbatch]:
    """Cut the last microbatch into a ramp of smaller ones (each ``fraction`` of the one before it), so the pipeline
    drains faster. Splitting only adds positions, so dependency gaps never shrink."""
    out = list(mbs)
    for frac in fractions:
        last = out[-1]
        if last.is_noop:
            break
        items = [(s.adapter, x, t) for s in last.segments for x, t in zip(s.samples, s.tokens)]
        if len(items) < 2:
            break
        round_of = {s.adapter: s.global_batch for s in last.segments}
        take = fill_subset([(i, t) for i, (_, _, t) in enumerate(items)], int(last.real_tokens * frac))
        if not take or len(take) == len(items):
            break
        small = [items[i] for i in take]
        rest = [it for i, it in enumerate(items) if i not in set(take)]
        out[-1:] = [_to_microbatch(rest, round_of, pad), _to_microbatch(small, round_of, pad)]
    return out


def repack_window(mbs: list[Microbatch], start: int, end: int, sizes: Sequence[int], params: PlanParams,
                  ) -> list[Microbatch] | None:
    """Re-pack the samples of ``mbs[start:end]`` into ``len(sizes)`` microbatches of at most ``sizes[j]`` padded
    tokens each (in position order), largest samples first into the largest microbatches (ties: the one nearest the
    body of the schedule, i.e. away from the end the window touches), so that a window at the end becomes a drain ramp
    and one at the start a fill ramp made of the shortest samples. ``None`` when the samples do not fit, the window
    holds two global batches of one adapter, or the dependency rule would break."""
    pad, cap = params.pad_multiple, params.capacity
    window = mbs[start:end]
    round_of: dict[str, int] = {}
    items: list[Item] = []
    for mb in window:
        for seg in mb.segments:
            if round_of.setdefault(seg.adapter, seg.global_batch) != seg.global_batch:
                return None
            items.extend((seg.adapter, x, t) for x, t in zip(seg.samples, seg.tokens))
    if not items or not sizes:
        return None
    k = len(sizes)
    at_end = end >= len(mbs)
    order = sorted(range(k), key=lambda j: (-min(sizes[j], cap), j if at_end else -j))
    bins: list[Bin] = [[] for _ in range(k)]
    segs: list[dict[str, int]] = [{} for _ in range(k)]
    loads = [0] * k
    for it in _sorted_items(items):
        a, _, t = it
        for j in order:
            old = segs[j].get(a, 0)
            new_load = loads[j] - round_up(old, pad) + round_up(old + t, pad)
            if new_load <= min(sizes[j], cap):
                bins[j].append(it)
                segs[j][a] = old + t
                loads[j] = new_load
                break
        else:
            return None
    out = mbs[:start] + [_to_microbatch(b, round_of, pad) for b in bins if b] + mbs[end:]
    return out if _dependencies_hold(out, params.stages) else None


def _ramp_sizes(total: int, shape: Sequence[float], capacity: int, pad: int) -> list[list[int]]:
    """Microbatch size limits for a window of ``total`` padded tokens re-packed into full microbatches followed by
    the drain ramp ``shape`` (fractions of ``capacity``): with as few full ones as could hold it, and one more."""
    ramp = [max(pad, int(capacity * f) // pad * pad) for f in shape]
    full = max(0, -(-(total - sum(ramp)) // capacity))
    return [[capacity] * n + ramp for n in (full, full + 1)]


def _as_schedule(mbs: list[Microbatch], params: PlanParams, meta: dict) -> Schedule:
    return Schedule(mbs, optimizer_steps_for(mbs), params.capacity, params.pad_multiple, params.stages, meta)


def plan(
    jobs: Sequence[Job],
    params: PlanParams,
    *,
    seed: int = 0,
    milp_time_limit: float = 0.0,
    cost: CostModel = CostModel(),
    group_counts: Sequence[int] | None = None,
    target_fractions: Sequence[float] = (1.0, 0.9, 0.8, 0.65, 0.5),
    modes: Sequence[str] = ("stream", "units"),
) -> Schedule:
    """Plan ``jobs`` on the pipeline described by ``params``; deterministic for a given input (with the MILP off,
    the default; see ``milp_time_limit``).

    ``seed`` is recorded in the schedule's meta: the search itself has no randomness (every tie is broken by a fixed
    key), so the same input gives the same schedule whatever the seed; sampled lengths take their seed elsewhere.

    ``milp_time_limit``: seconds per packing unit for the exact packer (default 0: off); only an optimum it proves
    within the limit is used (:func:`pack_milp`). Off, the plan is a pure function of the input. On, a unit whose
    optimum HiGHS proves just within the limit on one run and just outside it on another (a loaded machine) can
    change the plan: a wall-clock limit cannot be reproducible, which is why it is opt-in. ``group_counts``: the numbers
    of adapter groups to try (default 1..4 and one group per adapter). ``target_fractions``: microbatch sizes to
    try, as fractions of the capacity. ``modes``: which packers compete ("stream": every microbatch filled across
    unit boundaries; "units": each (global batch, group) packed on its own, greedy vs MILP). ``cost``: the pipeline
    cost model candidates are judged by.
    """
    if not isinstance(params, PlanParams):
        raise ValueError(f"params must be a PlanParams, got {type(params).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not milp_time_limit >= 0:
        raise ValueError(f"milp_time_limit must be >= 0 seconds, got {milp_time_limit!r}")
    validate_jobs(jobs, params)
    jobs = list(jobs)
    A = len(jobs)
    if group_counts is None:
        group_counts = sorted({g for g in (1, 2, 3, 4, A) if g <= A})
    for g in group_counts:
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= A:
            raise ValueError(f"group_counts entries must be integers in [1, {A}], got {g!r}")
    for f in target_fractions:
        if not 0 < f <= 1:
            raise ValueError(f"target_fractions entries must be in (0, 1], got {f!r}")
    if not modes or any(m not in ("stream", "units") for m in modes):
        raise ValueError(f"modes must be a non-empty subset of ('stream', 'units'), got {modes!r}")
    targets = sorted({max(params.pad_multiple, int(params.capacity * f)) for f in target_fractions}, reverse=True)

    def sim(mbs: list[Microbatch]) -> float:
        return simulate(_as_schedule(mbs, params, {}), cost).time

    def finish(mbs: list[Microbatch]) -> tuple[float, list[Microbatch], tuple[float, ...], list]:
        """The best drain: the layout as is, its last microbatch cut into a ramp (``TAIL_RAMPS``), or its last
        microbatches re-packed into a ramp shape (``REPACK_TAILS``, :func:`repack_window`); simulated time, the
        microbatches, the cut fractions and the re-pack (window, shape) used."""
        out = (sim(mbs), mbs, (), [])
        for fr in TAIL_RAMPS:
            cut = split_tail(mbs, fr, params.pad_multiple)
            t = sim(cut)
            if t < out[0]:
                out = (t, cut, fr, [])
        base = out[1]
        for w in REPACK_WINDOWS:
            if w >= len(base):
                break
            total = sum(m.padded_tokens for m in base[-w:])
            for shape in REPACK_TAILS:
                for sizes in _ramp_sizes(total, shape, params.capacity, params.pad_multiple):
                    cand = repack_window(base, len(base) - w, len(base), sizes, params)
                    if cand is None:
                        continue
                    t = sim(cand)
                    if t < out[0]:
                        out = (t, cand, out[2], [w, list(shape)])
        return out

    # phase 1: group count x target size x stream order, every packer; phase 2: head and drain ramps for the best
    # few stream layouts of each fill variant (sequential fill, and joint fill across adapters): every pair for the
    # leader, the best head and then each drain for the others
    fills = (False, True) if params.capacity // params.pad_multiple <= JOINT_MAX_SLOTS else (False,)
    layouts: dict[bool, list] = {}
    pool: dict[tuple, tuple] = {}  # each distinct layout (its microbatches): its best (key, entry)
    memo: dict = {}  # fills already computed, shared by the stream layouts (:func:`_memo`)

    def consider(key: tuple, entry: tuple) -> None:
        mbs_key = tuple(entry[-1])
        if mbs_key not in pool or key < pool[mbs_key][0]:
            pool[mbs_key] = (key, entry)

    for g in group_counts:
        groups = group_adapters(jobs, g)
        for tau in targets:
            if "stream" in modes:
                for jf in fills:
                    for order in STREAM_ORDERS:
                        mbs = _stream(jobs, params, groups, tau, HEAD_RAMPS[1], joint=jf, order=order, memo=memo)
                        key = (sim(mbs), len(mbs), False, jf, g, -tau, STREAM_ORDERS.index(order))
                        consider(key, (groups, tau, "stream", jf, order, (HEAD_RAMPS[1], 0.0), mbs))
                        layouts.setdefault(jf, []).append((key, groups, tau, order))
            if "units" in modes:
                mbs = _build(jobs, params, groups, tau, milp_time_limit=0.0, improve=False)
                consider((sim(mbs), len(mbs), True, False, g, -tau, 0), (groups, tau, "units", False, "", (), mbs))

    def attempt(groups_s: list[list[str]], tau_s: int, jf: bool, order: str, h: Sequence[float],
                tails: Sequence[float | tuple[float, ...]]) -> list[tuple]:
        """Stream one layout with head ramp ``h`` and each drain ramp of ``tails`` (one shared body), consider each;
        their keys."""
        if not tails:
            return []
        keys = []
        streams = _stream_tails(jobs, params, groups_s, tau_s, h, tails, joint=jf, order=order, memo=memo)
        for tl, mbs in zip(tails, streams):
            key = (sim(mbs), len(mbs), False, jf, len(groups_s), -tau_s, STREAM_ORDERS.index(order))
            consider(key, (groups_s, tau_s, "stream", jf, order, (h, tl), mbs))
            keys.append(key)
        return keys

    for jf, cands in sorted(layouts.items()):
        for rank, (_, groups_s, tau_s, order) in enumerate(sorted(cands, key=lambda c: c[0])[:RAMP_CANDIDATES]):
            if rank == 0:  # the phase-1 leader: every head with every drain
                for h in HEAD_RAMPS:
                    attempt(groups_s, tau_s, jf, order, h, STREAM_TAILS)
                continue
            h_best = min(HEAD_RAMPS, key=lambda h: attempt(groups_s, tau_s, jf, order, h, (0.0,))[0])  # noqa: B023
            attempt(groups_s, tau_s, jf, order, h_best, STREAM_TAILS[1:])
    # the drain is tuned on the best few distinct layouts, not just the best: the best before it is not always the
    # best after
    finished = []
    for rank, (key, entry) in enumerate(sorted(pool.values(), key=lambda c: c[0])[:FINISH_CANDIDATES]):
        t_fin, mbs_fin, tail_fin, repack_fin = finish(entry[-1])
        finished.append(((t_fin, rank), entry, mbs_fin, tail_fin, repack_fin))
    (t_best, _), (groups, tau, mode, jf, order, head, _), chosen, tail, repack = min(finished, key=lambda f: f[0])
    how = mode + ("+joint-fill" if jf else "")
    stats: dict = {}
    if mode == "units":
        # refine the winner: local search, and the MILP where enabled; keep whichever simulates fastest
        for limit in ((0.0, milp_time_limit) if milp_time_limit > 0 else (0.0,)):
            st: dict = {}
            refined = _build(jobs, params, groups, tau, milp_time_limit=limit, improve=True, stats=st)
            t_ref, refined, tail_ref, repack_ref = finish(refined)
            if t_ref <= t_best:
                t_best, tail, chosen, repack = t_ref, tail_ref, refined, repack_ref
                how, stats = "units+local-search" + ("+milp" if limit else ""), st
    meta = {
        "planner": "grouped-staggered", "mode": mode, "seed": seed, "groups": groups, "target_tokens": tau,
        "packing": how, "stream_order": order if mode == "stream" else "", "unit_packers": stats,
        "head_ramp": list(head[0]) if mode == "stream" else [],
        "drain_step": (list(head[1]) if isinstance(head[1], tuple) else head[1]) if mode == "stream" else 0.0,
        "tail_ramp": list(tail), "tail_repack": repack,
        "cost_model": {"overhead": cost.overhead, "per_token": cost.per_token,
                       "backward_factor": cost.backward_factor, "noop": cost.noop},
    }
    log.info("plan: %d microbatches, groups %s, target %d tokens, %s", len(chosen), groups, tau, how)
    return _as_schedule(chosen, params, meta)
