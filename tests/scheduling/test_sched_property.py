"""Property tests over random job mixes: every plan verifies, simulates, and is deterministic."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling import Job, PlanParams, Schedule, mlora_like, plan, sequential_ffd, simulate, simulate_flushed, verify
from scheduling.planner import pack_greedy, pack_unit, packing_cost, padded_load


@st.composite
def job_mixes(draw):
    pad = draw(st.sampled_from([1, 16, 128]))
    capacity = draw(st.integers(min_value=max(pad, 64), max_value=2048)) // pad * pad
    stages = draw(st.integers(min_value=1, max_value=4))
    n_jobs = draw(st.integers(min_value=1, max_value=5))
    allow_split = draw(st.booleans())
    top = capacity * 2 if allow_split else capacity // pad * pad
    jobs = []
    for j in range(n_jobs):
        size = draw(st.integers(min_value=1, max_value=6))
        n_gb = draw(st.integers(min_value=1, max_value=4))
        lengths = draw(st.lists(st.integers(min_value=1, max_value=top), min_size=size * n_gb - (size - 1),
                                max_size=size * n_gb))
        jobs.append(Job(f"j{j}", tuple(lengths), size, allow_split=allow_split))
    return jobs, PlanParams(capacity, pad, stages)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_mixes(), st.integers(min_value=0, max_value=3))
def test_random_mixes_plan_verifies(mix, seed):
    jobs, params = mix
    s = plan(jobs, params, seed=seed, target_fractions=(1.0, 0.6))  # the default: MILP off, a pure function
    assert verify(s, jobs, params) == []
    assert Schedule.from_json(s.to_json()) == s
    assert s.to_json() == plan(jobs, params, seed=seed, target_fractions=(1.0, 0.6)).to_json()
    # the MILP on (its wall-clock limit can change which optimum it proves in time, so only validity is asserted)
    units = plan(jobs, params, seed=seed, milp_time_limit=0.02, target_fractions=(1.0,), modes=("units",))
    assert verify(units, jobs, params) == []
    simulate(units)
    r = simulate(s)
    assert r.real_tokens == sum(j.lengths[x] for j in jobs for g in j.global_batches() for x in g)
    assert r.time > 0
    for piece in sequential_ffd(jobs, params):  # one global batch of one job each, every piece within capacity
        job = next(j for j in jobs if j.adapter == piece.meta["adapter"])
        one = Job(job.adapter, tuple(job.lengths[x] for x in job.global_batch_samples(piece.meta["global_batch"])),
                  len(job.global_batch_samples(piece.meta["global_batch"])), allow_split=job.allow_split)
        start = job.global_batch_samples(piece.meta["global_batch"])[0]
        shifted = Schedule([type(m)(tuple(type(sg)(sg.adapter, 0, tuple(x - start for x in sg.samples), sg.tokens,
                                                    sg.padded_tokens) for sg in m.segments))
                            for m in piece.microbatches], {job.adapter: [len(piece.microbatches) - 1]},
                           piece.capacity, piece.pad_multiple, piece.stages)
        assert verify(shifted, [one], params) == []
        simulate(piece)
    b = mlora_like(jobs, params)
    assert verify(b, jobs, params, exact_padding=False) == []
    simulate(b)
    simulate_flushed(sequential_ffd(jobs, params))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=14),
       st.lists(st.integers(min_value=1, max_value=600), min_size=0, max_size=8),
       st.integers(min_value=1, max_value=4), st.sampled_from([1, 32, 128]))
def test_unit_packers_keep_items_and_capacity(xs, ys, k, pad):
    items = [("a", i, t) for i, t in enumerate(xs)] + [("b", i, t) for i, t in enumerate(ys)]
    cap = max(640, pad)
    greedy = pack_greedy(items, k, cap, pad)
    best, _ = pack_unit(items, k, cap, pad, milp_time_limit=0.05)
    for bins in (greedy, best):
        assert sorted(x for b in bins for x in b) == sorted(items)
        assert all(padded_load(b, pad) <= cap for b in bins)
    assert packing_cost(best, pad) <= packing_cost(greedy, pad)
