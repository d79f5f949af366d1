"""The 1F1B simulator against hand-computed timelines."""

import pytest

from scheduling import CostModel, Microbatch, Schedule, Segment, simulate, simulate_flushed
from scheduling.schedule import NOOP, optimizer_steps_for
from scheduling.simulate import stage_order


def mb(adapter, g, tokens, sample=0):
    return Microbatch((Segment(adapter, g, (sample,), (tokens,), tokens),))


def sched(mbs, stages):
    return Schedule(mbs, optimizer_steps_for(mbs), 100000, 1, stages)


def test_stage_order_is_1f1b():
    assert stage_order(2, 3, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert stage_order(2, 3, 1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert stage_order(4, 2, 0) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_single_microbatch_goes_through_and_back():
    f = 200 + 300
    for S in (1, 2, 4):
        r = simulate(sched([mb("a", 0, 300)], S))
        assert r.time == pytest.approx(S * f + S * 2 * f)
        assert r.bubble_fraction == pytest.approx(1 - S * 3 * f / (S * r.time))


def test_two_equal_microbatches_two_stages():
    f = 200 + 100
    r = simulate(sched([mb("a", 0, 100, 0), mb("b", 0, 100, 0)], 2))
    assert r.time == pytest.approx(9 * f)  # (M + S - 1) * (f + b)


def test_uniform_steady_state_matches_closed_form():
    S, M, f = 4, 20, 200 + 1000
    r = simulate(sched([mb(f"x{i}", 0, 1000) for i in range(M)], S))
    assert r.time == pytest.approx((M + S - 1) * 3 * f)
    assert r.padding_fraction == 0.0
    assert r.token_cv == 0.0


def test_dependency_deadlock_and_noop_fix():
    bad = sched([mb("a", 0, 100, 0), mb("a", 1, 100, 1)], 2)
    with pytest.raises(ValueError, match="deadlock"):
        simulate(bad)
    good = sched([mb("a", 0, 100, 0), NOOP, mb("a", 1, 100, 1)], 2)
    r = simulate(good)
    # stage 0: F0 [0,300], Fnoop [300,350]; stage 1: F0 [300,600], B0 [600,1200], Fnoop [1200,1250], Bnoop
    # [1250,1300]; stage 0: B0 [1200,1800], F2 [1800,2100], Bnoop [2100,2150]; stage 1: F2 [2100,2400], B2
    # [2400,3000]; stage 0: B2 [3000,3600]. Stage 0's 1F1B order runs F_j after B_(j-S), so where the rule holds
    # (g+1 starts S positions after g ends) B0 precedes F2 anyway: the dependency costs no time of its own, and
    # turns a schedule that breaks the rule into a deadlock (above) instead of a wrong time.
    assert r.num_noops == 1
    c = CostModel()
    assert c.forward(100, False) == 300 and c.noop == 50
    assert r.time == pytest.approx(3600)
    assert r.bubble_fraction == pytest.approx(1 - 2 * (300 + 600) * 2 / (2 * 3600))


def test_padding_and_balance_metrics():
    m1 = Microbatch((Segment("a", 0, (0,), (100,), 128),))
    m2 = Microbatch((Segment("b", 0, (0,), (250,), 256),))
    r = simulate(Schedule([m1, m2], optimizer_steps_for([m1, m2]), 512, 128, 2))
    assert r.padding_fraction == pytest.approx((128 + 256 - 350) / (128 + 256))
    assert r.token_max_over_mean == pytest.approx(256 / 192)


def test_flushed_times_add_up():
    a = sched([mb("a", 0, 100)], 2)
    b = sched([mb("b", 0, 300)], 2)
    assert simulate_flushed([a, b]).time == pytest.approx(simulate(a).time + simulate(b).time)


@pytest.mark.parametrize("seed", range(8))
def test_simulator_matches_an_independent_dependency_graph_evaluation(seed):
    # every op ends at max(its stage's previous op, its input: F(s-1) / B(s+1) / the last stage's own F, and for a
    # stage-0 forward the stage-0 backwards of the adapters' previous global batches) + its duration; evaluated by
    # recursion over that graph instead of the simulator's event loop, on random schedules with no-op slots
    import random
    import sys

    rng = random.Random(seed)
    S = rng.choice([1, 2, 3, 4, 6])
    cost = CostModel(overhead=rng.choice([0.0, 200.0, 37.5]), backward_factor=rng.choice([1.0, 2.0, 2.5]))
    mbs, nxt = [], {}
    for _ in range(rng.randint(1, 40)):
        if rng.random() < 0.1:
            mbs.append(NOOP)
            continue
        segs = []
        for a in rng.sample("abcde", rng.randint(1, 3)):
            g = nxt.get(a, 0) + (rng.random() < 0.3)
            nxt[a] = g
            t = rng.randint(1, 3000)
            segs.append(Segment(a, g, (len(mbs),), (t,), t))
        mbs.append(Microbatch(tuple(sorted(segs, key=lambda s: s.adapter))))
    # space each adapter's global batches S slots apart with no-ops, so the 1F1B order cannot deadlock
    spaced, last = [], {}
    for m in mbs:
        need = max([last[(s.adapter, s.global_batch - 1)] + S for s in m.segments if (s.adapter, s.global_batch - 1)
                    in last] + [len(spaced)])
        spaced.extend([NOOP] * (need - len(spaced)))
        for s in m.segments:
            last[(s.adapter, s.global_batch)] = len(spaced)
        spaced.append(m)
    M = len(spaced)
    dur = {("F", i): cost.forward(m.padded_tokens, m.is_noop) for i, m in enumerate(spaced)}
    dur.update({("B", i): cost.backward(m.padded_tokens, m.is_noop) for i, m in enumerate(spaced)})
    prev = {}
    for s in range(S):
        order = stage_order(S, M, s)
        for k, op in enumerate(order):
            prev[(s,) + op] = (s,) + order[k - 1] if k else None
    deps = {}
    for i, m in enumerate(spaced):
        deps[i] = []
        for seg in m.segments:
            earlier = [j for j in range(i) for x in spaced[j].segments
                       if x.adapter == seg.adapter and x.global_batch < seg.global_batch]
            if earlier:
                g = max(x.global_batch for j in earlier for x in spaced[j].segments if x.adapter == seg.adapter
                        and x.global_batch < seg.global_batch)
                deps[i].append(max(j for j in earlier for x in spaced[j].segments
                                   if x.adapter == seg.adapter and x.global_batch == g))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * S * M + 1000))
    memo = {}

    def end(s, kind, i):
        key = (s, kind, i)
        if key not in memo:
            inputs = [end(*prev[key])] if prev[key] else []
            if kind == "F":
                inputs += [end(s - 1, "F", i)] if s else [end(0, "B", p) for p in deps[i]]
            else:
                inputs.append(end(s + 1, "B", i) if s < S - 1 else end(s, "F", i))
            memo[key] = max(inputs, default=0.0) + dur[(kind, i)]
        return memo[key]

    want = max(end(s, "B", M - 1) for s in range(S))
    assert simulate(sched(spaced, S), cost).time == want
