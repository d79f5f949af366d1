"""Lower bounds on what any schedule of a set of jobs must carry, for judging how far a plan is from the best.

The padding rule (each adapter's segment of a microbatch rounded up to the padding multiple) costs tokens that no
schedule can avoid entirely: a global batch's samples are split into segments of at most a capacity each, and every
segment pays its own round-up. :func:`min_padding` gives, for each global batch of each job, the least padding over
every way to split its samples into segments, found exactly with HiGHS (``scipy.optimize.milp``, relative gap 0);
where the solver is stopped by its time limit, HiGHS's proven lower bound on that least padding is used instead, so
the figure is a lower bound either way (``proven`` says whether it is the exact least padding of every global
batch). A global batch holding a sample longer than a microbatch (split, where its job allows it, into pieces the
schedule is free to choose) gets the one bound every split obeys: its tokens' round-up, ``(-T) mod pad``.

Why the search may stop at ``2 T / C + 1`` segments (T the batch's tokens, C the largest padded segment): merging two
segments never adds padding (the round-up is subadditive), so some optimal split has no two segments that fit
together, hence at most one segment of C/2 tokens or fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .jobs import Job, PlanParams, round_up, validate_jobs


@dataclass(frozen=True)
class PaddingBound:
    tokens: int  # least padding tokens over all global batches of all jobs (a lower bound)
    proven: bool  # the exact least padding of every global batch (else a lower bound stands in for some)
    per_batch: dict  # (adapter, global batch) -> least padding tokens


def segment_padding_bound(lengths: Sequence[int], segment_cap: int, pad: int,
                          time_limit: float = 10.0) -> tuple[int, bool]:
    """The least total padding of ``lengths`` split into segments of at most ``segment_cap`` padded tokens each,
    every segment rounded up to ``pad``; and whether it is proven optimal (else a lower bound from HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    if pad < 1 or segment_cap < pad:
        raise ValueError(f"need pad >= 1 and segment_cap >= pad, got pad={pad!r}, segment_cap={segment_cap!r}")
    cap = segment_cap // pad * pad  # a padded segment is a whole number of blocks
    items = sorted((int(t) for t in lengths), reverse=True)
    if not items:
        return 0, True
    if round_up(items[0], pad) > cap:
        raise ValueError(f"a piece of {items[0]} tokens does not fit the segment capacity {segment_cap} once padded to "
                         f"a multiple of {pad}")
    total = sum(items)
    floor_pad = -total % pad  # one segment's round-up: no split does better
    if total <= cap or pad == 1:
        return floor_pad, True
    n = len(items)
    bins = min(n, 2 * total // cap + 1)
    # x[i, b] for b <= i only (symmetry: segment b is the one whose largest piece is piece b), y[b] blocks of pad
    xs = [(i, b) for i in range(n) for b in range(min(i, bins - 1) + 1)]
    col = {ib: k for k, ib in enumerate(xs)}
    nx = len(xs)
    nv = nx + bins
    c = np.zeros(nv)
    c[nx:] = pad
    M = lil_matrix((n + bins, nv))
    lo = np.empty(n + bins)
    hi = np.empty(n + bins)
    for i in range(n):
        for b in range(min(i, bins - 1) + 1):
            M[i, col[(i, b)]] = 1
        lo[i] = hi[i] = 1
    for b in range(bins):
        for i in range(b, n):
            M[n + b, col[(i, b)]] = items[i]
        M[n + b, nx + b] = -pad
        lo[n + b], hi[n + b] = -np.inf, 0
    ub = np.ones(nv)
    ub[nx:] = cap // pad
    res = milp(c, constraints=LinearConstraint(M.tocsr(), lo, hi), integrality=np.ones(nv),
               bounds=Bounds(np.zeros(nv), ub),
               options={"time_limit": float(time_limit), "disp": False, "mip_rel_gap": 0.0})
    if res.status == 0:
        return max(floor_pad, int(round(res.fun)) - total), True
    bound = getattr(res, "mip_dual_bound", None)
    if bound is None or not np.isfinite(bound):
        return floor_pad, False
    blocks = math.ceil(bound / pad - 1e-6)  # padded tokens come in whole blocks
    return max(floor_pad, blocks * pad - total), False


def min_padding(jobs: Sequence[Job], params: PlanParams, time_limit: float = 10.0) -> PaddingBound:
    """:func:`segment_padding_bound` for every global batch of every job (its samples into segments of at most the
    capacity rounded down to the padding multiple): the padding no schedule of these jobs can go below. A global
    batch with a split sample gets ``(-T) mod pad`` (a schedule may cut the sample anywhere), not proven exact.
    ``time_limit``: seconds HiGHS may spend on one global batch."""
    validate_jobs(jobs, params)
    pad = params.pad_multiple
    per, proven = {}, True
    for job in jobs:
        for g in range(job.num_global_batches):
            lengths = [job.lengths[x] for x in job.global_batch_samples(g)]
            if max(lengths) > params.max_piece:  # split: its pieces are the schedule's choice
                v, ok = -sum(lengths) % pad, False
            else:
                v, ok = segment_padding_bound(lengths, params.max_piece, pad, time_limit)
            per[(job.adapter, g)] = v
            proven &= ok
    return PaddingBound(sum(per.values()), proven, per)
