"""Planner outputs verify; the MILP is never worse than greedy; plans are deterministic and beat the baselines."""

import pytest

from scheduling import (Job, PlanParams, Schedule, check, lognormal_jobs, mlora_like, plan, sequential_ffd, simulate,
                        simulate_flushed, verify)
import scheduling.planner as planner_module
from scheduling.schedule import optimizer_steps_for
from scheduling.planner import (_stream, drain_room, fill_subset, group_adapters, pack_greedy, pack_milp, pack_unit,
                                packing_cost, padded_load, split_tail)

MIX4 = dict(medians=[300, 700, 1200, 2000], batch_sizes=[16] * 4, num_global_batches=[4, 3, 4, 3])
EIGHT_JOBS = dict(medians=[150, 300, 500, 800, 1100, 1500, 2000, 2400], batch_sizes=[8, 16, 8, 16, 12, 8, 16, 8],
                  num_global_batches=[3, 4, 3, 4, 3, 4, 3, 4])


def test_plan_verifies_and_roundtrips(two_jobs, small_params):
    s = plan(two_jobs, small_params, milp_time_limit=0.2)
    assert verify(s, two_jobs, small_params) == []
    back = Schedule.from_json(s.to_json())
    assert back == s
    assert verify(back, two_jobs, small_params) == []


@pytest.mark.parametrize("cap, pad, stages", [(4096, 128, 4), (8192, 128, 4), (2048, 1, 2), (3000, 64, 1)])
def test_plan_on_lognormal_mix_verifies_and_beats_baselines(cap, pad, stages):
    params = PlanParams(cap, pad, stages)
    jobs = lognormal_jobs(**MIX4, maximum=min(cap, 4096) // pad * pad, seed=1)
    s = plan(jobs, params, milp_time_limit=0.1)
    check(s, jobs, params)
    a = sequential_ffd(jobs, params)
    b = mlora_like(jobs, params)
    check(b, jobs, params, exact_padding=False)
    t = simulate(s).time
    assert simulate_flushed(a).time > t
    assert simulate(b).time > t
    assert simulate(s).padding_fraction <= 0.02 or pad == 1


def test_baseline_a_pieces_are_single_global_batches():
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=0)
    pieces = sequential_ffd(jobs, params)
    assert len(pieces) == sum(j.num_global_batches for j in jobs)
    for piece in pieces:
        job = next(j for j in jobs if j.adapter == piece.meta["adapter"])
        g = piece.meta["global_batch"]
        assert {(sg.adapter, sg.global_batch) for m in piece.microbatches for sg in m.segments} == {(job.adapter, g)}
        assert sorted(x for m in piece.microbatches for x in m.segments[0].samples) == job.global_batch_samples(g)
        assert all(m.padded_tokens <= 4096 for m in piece.microbatches)


@pytest.mark.parametrize("seed", [0, 1])
def test_baseline_a_runs_each_flushed_batch_in_its_best_order(seed):
    """The order of a flushed batch's microbatches is left open by the issue and moves its time by up to ~10%: the
    baseline takes the best (it once ran them in the order FFD opened its bins, which made (a) 1-3% slower)."""
    import itertools

    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=seed)
    better_than_ffd = 0
    for piece in sequential_ffd(jobs, params):
        mbs = piece.microbatches
        t = simulate(piece).time

        def time_of(order):
            return simulate(Schedule(list(order), {}, 4096, 128, 4)).time

        by_size = sorted(mbs, key=lambda m: m.padded_tokens)
        assert t <= time_of(by_size) and t <= time_of(by_size[::-1])
        if len(mbs) <= 6:  # an independent brute force over every order
            assert t == min(time_of(o) for o in itertools.permutations(mbs))
        # FFD's own opening order (largest first-fit) for comparison
        job = next(j for j in jobs if j.adapter == piece.meta["adapter"])
        from scheduling.baselines import _ffd
        from scheduling.jobs import round_up

        items = [(x, n) for x in job.global_batch_samples(piece.meta["global_batch"]) for n in job.pieces(x, params)]
        ffd_sizes = [round_up(sum(n for _, n in b), 128) for b in _ffd(items, 4096, 128)]
        assert sorted(ffd_sizes) == sorted(m.padded_tokens for m in mbs)  # the same microbatches, reordered
        better_than_ffd += t < time_of([next(m for m in mbs if m.padded_tokens == s) for s in ffd_sizes]) - 1e-9
    assert better_than_ffd > 0


def test_mlora_like_has_one_adapter_per_microbatch_padded_to_longest():
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=0)
    s = mlora_like(jobs, params)
    check(s, jobs, params, exact_padding=False)
    for m in s.microbatches:
        if not m.is_noop:
            (sg,) = m.segments
            assert sg.padded_tokens == -(-len(sg.tokens) * max(sg.tokens) // 128) * 128


def test_deterministic():
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=2)
    one = plan(jobs, params, seed=5).to_json()
    two = plan(jobs, params, seed=5).to_json()
    assert one == two
    assert plan(jobs[::-1], params, seed=5).to_json() == one  # job order does not matter


def test_each_packer_alone_verifies():
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=4)
    for modes in (("stream",), ("units",)):
        s = plan(jobs, params, milp_time_limit=0.1, modes=modes)
        check(s, jobs, params)
        assert s.meta["mode"] == modes[0]
    with pytest.raises(ValueError, match="modes must be"):
        plan(jobs, params, modes=("magic",))


def test_bad_plan_arguments(two_jobs, small_params):
    with pytest.raises(ValueError, match="milp_time_limit must be >= 0 seconds, got -1"):
        plan(two_jobs, small_params, milp_time_limit=-1)
    with pytest.raises(ValueError, match=r"group_counts entries must be integers in \[1, 2\], got 3"):
        plan(two_jobs, small_params, group_counts=[3])
    with pytest.raises(ValueError, match="target_fractions entries must be in"):
        plan(two_jobs, small_params, target_fractions=[0])
    with pytest.raises(ValueError, match="seed must be an integer"):
        plan(two_jobs, small_params, seed="x")
    with pytest.raises(ValueError, match="params must be a PlanParams"):
        plan(two_jobs, {"capacity": 5})


def _unit_items(seed, n_adapters=2, per=10, median=400):
    jobs = lognormal_jobs([median * (i + 1) for i in range(n_adapters)], [per] * n_adapters, [1] * n_adapters,
                          maximum=2048, seed=seed)
    return [(j.adapter, s, t) for j in jobs for s, t in enumerate(j.lengths)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_never_worse_than_greedy(seed):
    items = _unit_items(seed)
    cap, pad = 2048, 128
    greedy = pack_greedy(items, 3, cap, pad)
    best, how = pack_unit(items, 3, cap, pad, milp_time_limit=0.5)
    assert packing_cost(best, pad) <= packing_cost(greedy, pad)
    for bins in (greedy, best):
        assert sorted(x for b in bins for x in b) == sorted(items)
        assert all(padded_load(b, pad) <= cap for b in bins)


def test_milp_finds_the_exact_packing_greedy_misses():
    # FFD on [3,3,2,2,2] into two bins of 6 puts 3,3 together and needs three bins; the MILP uses two
    items = [("a", i, t) for i, t in enumerate([3, 3, 2, 2, 2])]
    greedy = pack_greedy(items, 2, 6, 1, improve=False)
    assert len(greedy) == 3
    exact = pack_milp(items, 2, 6, 1, time_limit=5)
    assert exact is not None and len(exact) == 2
    assert sorted(padded_load(b, 1) for b in exact) == [6, 6]
    best, how = pack_unit(items, 2, 6, 1, milp_time_limit=5)
    assert packing_cost(best, 1) <= packing_cost(greedy, 1)
    assert len(best) == 2


def test_plan_with_milp_no_slower_than_without():
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=3)
    with_milp = plan(jobs, params, milp_time_limit=0.2)
    without = plan(jobs, params, milp_time_limit=0.0)
    check(with_milp, jobs, params)
    check(without, jobs, params)
    assert simulate(with_milp).time <= simulate(without).time
    # forced onto the unit packers, the MILP-refined layout is still no slower than the greedy one
    g_with = plan(jobs, params, milp_time_limit=0.2, group_counts=[2], modes=("units",))
    g_without = plan(jobs, params, milp_time_limit=0.0, group_counts=[2], modes=("units",))
    check(g_with, jobs, params)
    assert simulate(g_with).time <= simulate(g_without).time


def test_fill_subset_is_exact():
    items = [(i, t) for i, t in enumerate([700, 500, 300, 260, 90])]
    take = fill_subset(items, 1000)
    assert sum(items[i][1] for i in take) == 1000  # 700 + 300
    take = fill_subset(items, 1024, pad=128)
    assert sum(items[i][1] for i in take) == 1000  # nothing lands on 1024; 1000 wastes only 24 padding tokens
    # 900 would waste 124 padding tokens; 896 is an exact multiple and gives up only 4 tokens of fill
    two = [(0, 900), (1, 896)]
    assert fill_subset(two, 1024, pad=128) == [1]
    assert fill_subset(two, 1024, pad=1) == [0]
    assert fill_subset(items, 50) == []


def test_group_adapters_pairs_long_with_short():
    jobs = lognormal_jobs([100, 200, 1500, 1600], [8] * 4, [1] * 4, sigma=0.0, seed=0)
    groups = group_adapters(jobs, 2)
    assert sorted(len(g) for g in groups) == [2, 2]
    for g in groups:  # each group holds one of the two long jobs and one of the two short ones
        assert sum(a in ("job2", "job3") for a in g) == 1


def test_split_tail_keeps_every_sample(two_jobs, small_params):
    s = plan(two_jobs, small_params, milp_time_limit=0)
    cut = split_tail(s.microbatches, [0.5, 0.5], small_params.pad_multiple)
    assert len(cut) >= len(s.microbatches)
    t = Schedule(cut, optimizer_steps_for(cut), small_params.capacity, 1, small_params.stages)
    assert verify(t, two_jobs, small_params) == []


def test_noops_when_one_job_must_wait():
    # a single job with tiny global batches: each must wait `stages` positions for the previous optimizer step
    job = Job.from_batches("solo", [[100], [100], [100]])
    params = PlanParams(1024, 1, 3)
    s = plan([job], params)
    check(s, [job], params)
    assert s.num_noops == 4  # two gaps of stages - 1
    simulate(s)


def test_split_samples_are_planned():
    job = Job("big", (5000, 300, 1200, 9000), 2, allow_split=True)
    other = Job("small", (100, 200, 300, 400), 2)
    params = PlanParams(4096, 128, 2)
    s = plan([job, other], params)
    check(s, [job, other], params)
    pieces = [t for m in s.microbatches for sg in m.segments if sg.adapter == "big"
              for x, t in zip(sg.samples, sg.tokens) if x == 3]
    assert sum(pieces) == 9000 and len(pieces) >= 3


def test_stream_passes_over_an_adapter_that_does_not_fit():
    # after A's 700 tokens, none of B's 500-token samples fits the 300 left; C's 250 does, so the microbatch is not
    # closed early at 700 tokens
    jobs = [Job("A", (700,), 1), Job("B", (500, 500), 2), Job("C", (250, 250), 2)]
    params = PlanParams(1000, 1, 2)
    mbs = _stream(jobs, params, [["A", "B", "C"]], 1000)
    assert mbs[0].adapters == ("A", "C") and mbs[0].padded_tokens == 950
    assert len(mbs) == 3  # 700+250, 500+250, 500 (was 4: 700, 500+250, 500+250 .. with B closing the first)
    s = Schedule(mbs, optimizer_steps_for(mbs), 1000, 1, 2)
    assert verify(s, jobs, params) == []


def test_stream_order_picks_which_ready_group_opens_next():
    # "L" holds most tokens in one global batch, "S" fewer tokens over three: "tokens" opens L first, "rounds" S
    jobs = [Job("L", (900, 900, 900), 3), Job("S", (100, 100, 100), 1)]
    params = PlanParams(950, 1, 2)  # a 900-token sample and a 100-token one do not share a microbatch
    by_tokens = _stream(jobs, params, [["L"], ["S"]], 950, order="tokens")
    by_rounds = _stream(jobs, params, [["L"], ["S"]], 950, order="rounds")
    assert by_tokens[0].adapters == ("L",)
    assert by_rounds[0].adapters == ("S",)
    for mbs in (by_tokens, by_rounds):
        assert verify(Schedule(mbs, optimizer_steps_for(mbs), 950, 1, 2), jobs, params) == []
    with pytest.raises(ValueError, match="order must be one of"):
        _stream(jobs, params, [["L"], ["S"]], 950, order="random")


@pytest.mark.parametrize("seed", [0, 3])
def test_rounds_order_and_wider_ramp_search_speed_up_a_mix_dominated_by_one_job(monkeypatch, seed):
    # one long-sample job (split pieces) holds most tokens, as in the local-text mix of benchmarks/planner.py; the
    # short jobs with more global batches must not be left to the end. Measured gain on these draws: 2-4 %.
    mix = lognormal_jobs(medians=[4000, 110, 120, 370], batch_sizes=[16] * 4, num_global_batches=[3, 4, 3, 4],
                         sigma=0.8, maximum=8192, seed=seed)
    jobs = [Job(j.adapter, j.lengths, j.global_batch_size, j.num_global_batches, allow_split=True) for j in mix]
    params = PlanParams(4096, 128, 4)
    new = plan(jobs, params, milp_time_limit=0.0)
    check(new, jobs, params)
    monkeypatch.setattr(planner_module, "STREAM_ORDERS", ("tokens",))
    monkeypatch.setattr(planner_module, "RAMP_CANDIDATES", 1)
    old = plan(jobs, params, milp_time_limit=0.0)
    assert simulate(old).time / simulate(new).time > 1.01


@pytest.mark.parametrize("step", [0.125, 0.25, 0.35, 0.5])
def test_drain_room_ramps_down_linearly(step):
    target, pad = 4096, 128
    ramp = list(range((target - 1) % max(pad, int(target * step)) + 1, target, max(pad, int(target * step))))
    assert drain_room(sum(ramp) + 1, target, step, pad) == target  # more than the whole ramp holds: full size
    left, sizes = 3 * target + target // 3, []
    while left > 0:
        room = drain_room(left, target, step, pad)
        sizes.append(min(room, left))
        left -= room
    assert sizes == sorted(sizes, reverse=True)  # the last microbatches are the smallest
    assert sizes[-1] < target and max(sizes) <= target


def test_drain_ramps_never_make_the_plan_slower(monkeypatch):
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=2)
    with_ramps = plan(jobs, params, milp_time_limit=0.0)
    monkeypatch.setattr(planner_module, "STREAM_TAILS", (0.0,))
    without = plan(jobs, params, milp_time_limit=0.0)
    check(with_ramps, jobs, params)
    check(without, jobs, params)
    assert simulate(with_ramps).time <= simulate(without).time


@pytest.mark.parametrize("seed", range(6))
def test_joint_fill_is_exact(seed):
    # against brute force over every subset of every adapter: the most real tokens whose padded segments fit
    import itertools
    import random

    from scheduling.jobs import round_up
    from scheduling.planner import joint_fill

    rng = random.Random(seed)
    pad = 16
    groups = [[(i, rng.randint(5, 90)) for i in range(rng.randint(1, 4))] for _ in range(3)]
    room = rng.randint(40, 220)
    best = 0
    per = [[c for r in range(len(g) + 1) for c in itertools.combinations(range(len(g)), r)] for g in groups]
    for combo in itertools.product(*per):
        sums = [sum(g[i][1] for i in c) for g, c in zip(groups, combo)]
        if sum(round_up(x, pad) for x in sums) <= room:
            best = max(best, sum(sums))
    picks = joint_fill(groups, room, pad)
    sums = [sum(g[i][1] for i in p) for g, p in zip(groups, picks)]
    assert all(len(set(p)) == len(p) for p in picks)
    assert sum(round_up(x, pad) for x in sums) <= room
    assert sum(sums) == best


def test_joint_fill_prefers_a_full_microbatch_over_a_greedy_first_adapter():
    from scheduling.planner import joint_fill

    # sequential filling takes A's 600 first and then nothing of B fits the 400 left; jointly, 500 + 500 fills it
    picks = joint_fill([[(0, 600), (1, 500)], [(0, 500), (1, 450)]], 1000, 1)
    assert picks == [[1], [0]]


def test_shape_room_follows_the_ramp():
    from scheduling.planner import shape_room

    shape, target, pad = (0.75, 0.5, 0.25), 4000, 100
    assert shape_room(10_000, target, shape, pad) == target  # the whole ramp (6000) cannot hold it: full size
    left, sizes = 2 * target + 6000, []
    while left > 0:
        room = shape_room(left, target, shape, pad)
        sizes.append(min(room, left))
        left -= room
    assert sizes == [4000, 4000, 3000, 2000, 1000]  # full until only the ramp is left, then the ramp
    assert shape_room(2500, target, shape, pad) == 2000  # the shortest tail of the ramp that holds what is left


def test_stream_joint_fill_verifies_and_fills_more_microbatches():
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**EIGHT_JOBS, sigma=0.5, maximum=4096, seed=8)
    groups = group_adapters(jobs, len(jobs))
    full = {}
    for joint in (False, True):
        mbs = _stream(jobs, params, groups, 4096, (0.5,), joint=joint)
        check(Schedule(mbs, optimizer_steps_for(mbs), 4096, 128, 4), jobs, params)
        full[joint] = sum(m.padded_tokens == 4096 for m in mbs)
    assert full[True] > full[False]  # 87 vs 82 full microbatches


def test_repack_window_makes_a_drain_ramp():
    from scheduling.planner import repack_window

    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=3)
    mbs = _stream(jobs, params, group_adapters(jobs, 2), 4096, (0.5,))
    n = len(mbs)
    window = mbs[-6:]
    total = sum(m.padded_tokens for m in window)
    sizes = [4096] * (-(-total // 4096)) + [2048, 1024]
    out = repack_window(mbs, n - 6, n, sizes, params)
    assert out is not None and out[:n - 6] == mbs[:n - 6]
    s = Schedule(out, optimizer_steps_for(out), 4096, 128, 4)
    check(s, jobs, params)
    new = out[n - 6:]
    assert all(m.padded_tokens <= lim for m, lim in zip(new, sizes))
    key = sorted((sg.adapter, x, t) for m in window for sg in m.segments for x, t in zip(sg.samples, sg.tokens))
    assert sorted((sg.adapter, x, t) for m in new for sg in m.segments for x, t in zip(sg.samples, sg.tokens)) == key
    assert repack_window(mbs, n - 6, n, [128], params) is None  # does not fit


@pytest.mark.parametrize("seed, floor", [(4, 1.46), (8, 1.448)])
def test_eight_job_mix_beats_mlora_like(seed, floor):
    # the benchmark's hardest case, 8 jobs at capacity 4096, over the mLoRA-like baseline: seed 4 was 1.441x before
    # misfit adapters were passed over, seed 8 1.437x before joint filling and the longer ramps
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**EIGHT_JOBS, sigma=0.5, maximum=4096, seed=seed)
    s = plan(jobs, params)
    check(s, jobs, params)
    r = simulate(s)
    assert simulate(mlora_like(jobs, params)).time / r.time >= floor
    assert r.padding_fraction <= 0.02


def test_milp_cut_off_by_its_time_limit_is_not_used():
    # an incumbent HiGHS holds when the clock runs out depends on the machine's speed and load, so pack_milp drops it
    # (plans stay reproducible); on this unit HiGHS cannot prove an optimum in 10 ms on any machine we run on
    import numpy as np

    rng = np.random.default_rng(1234)
    items = [(f"a{i % 4}", i, int(t)) for i, t in enumerate(rng.integers(50, 900, size=60))]
    assert pack_milp(items, 8, 4096, 128, time_limit=0.01) is None
    best, how = pack_unit(items, 8, 4096, 128, milp_time_limit=0.01)
    assert how == "greedy"


def test_drain_tuning_on_several_layouts_is_never_slower_and_helps_a_draw(monkeypatch):
    """The drain is tuned on the best FINISH_CANDIDATES layouts and the fastest result wins, so the plan is never
    slower than tuning the best layout alone; on the 8-job draw of seed 0 at 4096 (benchmarks/planner.py) it is
    faster (measured 1.7161x -> 1.7171x over baseline (a))."""
    mix8 = dict(medians=[150, 300, 500, 800, 1100, 1500, 2000, 2400], batch_sizes=[8, 16, 8, 16, 12, 8, 16, 8],
                num_global_batches=[3, 4, 3, 4, 3, 4, 3, 4])
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**mix8, sigma=0.5, maximum=4096, seed=0)
    several = plan(jobs, params)
    monkeypatch.setattr(planner_module, "FINISH_CANDIDATES", 1)
    one = plan(jobs, params)
    check(several, jobs, params)
    assert simulate(several).time < simulate(one).time


@pytest.mark.parametrize("joint", [False, True])
def test_stream_tails_share_one_body_and_match_separate_streams(joint):
    # the planner streams a layout's body once for all its drain ramps, with fills memoised across calls; each result
    # must be exactly what a separate, memo-free _stream call with that ramp gives
    from scheduling.planner import STREAM_TAILS, _StreamState, _stream_tails, shape_room

    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**EIGHT_JOBS, sigma=0.5, maximum=4096, seed=1)
    groups = group_adapters(jobs, 2)
    target = 3686

    def alone_stream(head, tail):
        # the reference: the drain ramp's room applied at every step from the first microbatch, nothing shared
        st = _StreamState(jobs, params, groups, "tokens", None)
        while st.running():
            p = len(st.mbs)
            room = int(target * head[p]) if p < len(head) else target
            if isinstance(tail, float) and tail:
                room = min(room, drain_room(sum(st.left), target, tail, 128))
            elif isinstance(tail, tuple):
                room = min(room, shape_room(sum(st.left), target, tail, 128))
            st.step(room, joint)
        return st.mbs

    memo: dict = {}
    for head in ((), (0.5,)):
        shared = _stream_tails(jobs, params, groups, target, head, STREAM_TAILS, joint=joint, memo=memo)
        alone = [alone_stream(head, tl) for tl in STREAM_TAILS]
        assert shared == alone
        assert alone == [_stream(jobs, params, groups, target, head, tl, joint=joint) for tl in STREAM_TAILS]
        assert len({tuple(m) for m in alone}) > 2  # the ramps do change the drains, so the test can tell them apart
    assert memo  # and the fills were memoised


@pytest.mark.parametrize("seed", range(4))
def test_joint_fill_tables_memoised_across_calls_change_nothing(seed):
    import random

    from scheduling.planner import _set_bits, joint_fill

    rng = random.Random(seed)
    memo: dict = {}
    groups = [[(i, rng.randint(1, 900)) for i in range(rng.randint(0, 9))] for _ in range(4)]
    for _ in range(12):  # successive microbatches: one adapter's items change, the others' tables are reused
        room = rng.choice([128, 1024, 2000, 4096])
        assert joint_fill(groups, room, 128, memo) == joint_fill(groups, room, 128)
        k = rng.randrange(len(groups))
        groups[k] = groups[k][1:] + [(99, rng.randint(1, 900))]
    bits = rng.getrandbits(3000) | 1
    assert _set_bits(bits).tolist() == [i for i in range(bits.bit_length()) if bits >> i & 1]
    assert _set_bits(0).tolist() == []


def test_stream_and_plan_edge_settings():
    from scheduling import CostModel
    from scheduling.planner import _stream_tails

    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs([300, 800], [8, 8], [2, 2], seed=1, maximum=4096)
    groups = group_adapters(jobs, 2)
    with pytest.raises(ValueError, match=r"head ramp fractions must be in \(0, 1\], got \(1.5, 1.5\)"):
        _stream(jobs, params, groups, 2048, (1.5, 1.5), 0.25)
    with pytest.raises(ValueError, match="at least one drain ramp"):
        _stream_tails(jobs, params, groups, 2048, (), ())
    for field in ("overhead", "per_token", "backward_factor", "noop"):
        with pytest.raises(ValueError, match=f"CostModel.{field} must be a finite number >= 0, got nan"):
            CostModel(**{field: float("nan")})
        with pytest.raises(ValueError, match=f"CostModel.{field} must be a finite number >= 0, got -1"):
            CostModel(**{field: -1})


def test_plan_without_drain_ramps(monkeypatch):
    # no drain ramp at all (an empty STREAM_TAILS) skips the drain search instead of failing
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs([300, 800], [8, 8], [2, 2], seed=1, maximum=4096)
    monkeypatch.setattr(planner_module, "STREAM_TAILS", ())
    s = plan(jobs, params)
    check(s, jobs, params)


def test_fill_memo_starts_over_at_its_limit_and_changes_nothing(monkeypatch):
    params = PlanParams(4096, 128, 4)
    jobs = lognormal_jobs(**MIX4, maximum=4096, seed=5)
    groups = group_adapters(jobs, 2)
    want = _stream(jobs, params, groups, 4096, (0.5,), 0.25, joint=True)
    monkeypatch.setattr(planner_module, "MEMO_LIMIT", 7)
    memo: dict = {}
    got = _stream(jobs, params, groups, 4096, (0.5,), 0.25, joint=True, memo=memo)
    assert got == want
    assert 0 < len(memo) <= 7 + len(jobs)  # cleared along the way (plus the per-adapter tables of the last fill)
