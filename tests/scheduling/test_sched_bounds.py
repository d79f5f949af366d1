"""The padding lower bound: exact against brute force over every split, and never above what a plan pays."""

import random

import pytest

from scheduling import Job, PlanParams, lognormal_jobs, plan
from scheduling.bounds import min_padding, segment_padding_bound


def _partitions(items):
    """Every set partition of ``items`` (lists of lists), by placing each item in an existing block or a new one."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def _brute_force(lengths, cap, pad):
    best = None
    for part in _partitions(list(lengths)):
        sums = [sum(block) for block in part]
        if any(-(-s // pad) * pad > cap for s in sums):
            continue
        cost = sum(-s % pad for s in sums)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(16))
def test_segment_bound_is_the_brute_force_minimum(seed):
    rng = random.Random(seed)
    pad = rng.choice([8, 16, 128])
    cap = pad * rng.randint(3, 12) + (rng.randrange(pad) if seed % 2 else 0)  # odd seeds: not a multiple of pad
    n = rng.randint(2, 8)
    lengths = [rng.randint(1, cap // pad * pad) for _ in range(n)]
    got, proven = segment_padding_bound(lengths, cap, pad)
    assert proven
    assert got == _brute_force(lengths, cap, pad), (lengths, cap, pad)


def test_segment_bound_keeps_segments_within_the_capacity():
    # the best split into segments of at most 48 (pad 8) pays 9; one segment allowed a block more would pay 1
    lengths = [15, 16, 10, 35, 29, 6]
    assert segment_padding_bound(lengths, 48, 8) == (9, True)
    assert _brute_force(lengths, 48, 8) == 9 and _brute_force(lengths, 56, 8) == 1
    # 280 tokens fit a 300-token capacity, but not once padded to 384: two segments, 232 padding (not 104)
    assert segment_padding_bound([140, 140], 300, 128) == (232, True) == (_brute_force([140, 140], 300, 128), True)


def test_segment_bound_gains_from_more_segments_than_the_fewest():
    # 262 tokens in segments of at most 96 (pad 16): three segments is the fewest, and the best three pay 26; four
    # pay 10 (76 | 21 + 37 | 65 + 15 | 48), which a search capped at the fewest segments would miss
    lengths = [21, 76, 37, 65, 15, 48]
    got, proven = segment_padding_bound(lengths, 96, 16)
    assert proven and got == 10 == _brute_force(lengths, 96, 16)
    got, _ = segment_padding_bound([100, 100, 100], 512, 128)  # one segment: no split does better than 84
    assert got == _brute_force([100, 100, 100], 512, 128) == 84


def test_segment_bound_bad_input():
    with pytest.raises(ValueError, match="segment_cap"):
        segment_padding_bound([10], 64, 128)
    with pytest.raises(ValueError, match="does not fit the segment capacity 300"):
        segment_padding_bound([290], 300, 128)  # 290 pads to 384
    assert segment_padding_bound([], 256, 128) == (0, True)


class _Stopped:
    """What ``scipy.optimize.milp`` returns when its time limit stops it."""

    def __init__(self, dual_bound):
        self.status, self.fun, self.x, self.mip_dual_bound = 1, None, None, dual_bound


def test_segment_bound_stopped_by_the_clock_uses_the_dual_bound_rounded_up(monkeypatch):
    import scipy.optimize

    lengths = [300, 200, 260, 90]  # 850 tokens in segments of at most 512 (pad 128): 46 is the one-segment floor
    monkeypatch.setattr(scipy.optimize, "milp", lambda *a, **k: _Stopped(1025.0))  # > 8 blocks: at least 9
    assert segment_padding_bound(lengths, 512, 128) == (9 * 128 - 850, False)
    monkeypatch.setattr(scipy.optimize, "milp", lambda *a, **k: _Stopped(700.0))  # below the floor: the floor stands
    assert segment_padding_bound(lengths, 512, 128) == (46, False)
    monkeypatch.setattr(scipy.optimize, "milp", lambda *a, **k: _Stopped(None))
    assert segment_padding_bound(lengths, 512, 128) == (46, False)


@pytest.mark.parametrize("seed", [0, 3])
def test_no_plan_pays_less_padding_than_the_bound(seed):
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(medians=[300, 1200, 2400], batch_sizes=[12, 8, 6], num_global_batches=[2, 2, 2],
                          maximum=4096, seed=seed)
    bound = min_padding(jobs, params)
    assert bound.proven
    paid: dict = {}
    s = plan(jobs, params)
    for mb in s.microbatches:
        for seg in mb.segments:
            key = (seg.adapter, seg.global_batch)
            paid[key] = paid.get(key, 0) + seg.padded_tokens - seg.real_tokens
    assert set(paid) == set(bound.per_batch)
    assert all(paid[k] >= bound.per_batch[k] for k in paid), (paid, bound.per_batch)
    assert sum(paid.values()) >= bound.tokens > 0


def test_min_padding_of_a_split_sample_is_the_round_up_of_the_batch():
    # capacity 256, pad 128: the 384-token sample is split; the planner's pieces (256 + 128) with the two 150s pay
    # 212, but a schedule may cut it 106 + 106 + 172 and pay 84, the round-up of the batch's 684 tokens
    job = Job.from_batches("long", [[384, 150, 150]], allow_split=True)
    bound = min_padding([job], PlanParams(256, 128, 2))
    assert bound.tokens == 84 and not bound.proven
    short = Job.from_batches("short", [[100, 100, 100]])
    both = min_padding([job, short], PlanParams(256, 128, 2))
    assert both.per_batch == {("long", 0): 84, ("short", 0): _brute_force([100, 100, 100], 256, 128)}


def test_segment_bound_asks_highs_for_a_zero_gap(monkeypatch):
    # HiGHS reports "optimal" once within its default relative gap of 1e-4: with ~10^4 padding blocks in a batch
    # (pad 4 at capacity 4096) that is a whole block short of the optimum, so the bound asks for no gap at all
    import scipy.optimize

    seen = {}
    real = scipy.optimize.milp

    def spy(*a, **k):
        seen.update(k.get("options", {}))
        return real(*a, **k)

    monkeypatch.setattr(scipy.optimize, "milp", spy)
    lengths = [15, 16, 10, 35, 29, 6]
    assert segment_padding_bound(lengths, 48, 8) == (9, True)
    assert seen.get("mip_rel_gap") == 0
