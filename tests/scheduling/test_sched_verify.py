"""The verifier catches every kind of violation in hand-made schedules, and accepts a hand-made valid one."""

import pytest

from scheduling import Job, Microbatch, PlanParams, Schedule, Segment, check, verify
from scheduling.schedule import NOOP, optimizer_steps_for

PARAMS = PlanParams(capacity=1024, pad_multiple=128, stages=2)
A = Job.from_batches("a", [[100, 200], [300, 50]])
B = Job.from_batches("b", [[400, 100]])
JOBS = [A, B]


def seg(adapter, g, samples, tokens, padded=None):
    padded = -(-sum(tokens) // 128) * 128 if padded is None else padded
    return Segment(adapter, g, tuple(samples), tuple(tokens), padded)


def sched(mbs, steps=None, **kw):
    p = dict(capacity=PARAMS.capacity, pad_multiple=PARAMS.pad_multiple, stages=PARAMS.stages)
    p.update(kw)
    return Schedule(list(mbs), optimizer_steps_for(list(mbs)) if steps is None else steps, **p)


def valid_mbs():
    # a/g0 at 0, b/g0 at 1, a/g1 at 2: gap for a is 2 == stages
    return [Microbatch((seg("a", 0, [0, 1], [100, 200]),)),
            Microbatch((seg("b", 0, [0, 1], [400, 100]),)),
            Microbatch((seg("a", 1, [2, 3], [300, 50]),))]


def kinds(s, jobs=JOBS, **kw):
    return sorted({v.kind for v in verify(s, jobs, PARAMS, **kw)})


def test_valid_schedule_passes():
    s = sched(valid_mbs())
    assert verify(s, JOBS, PARAMS) == []
    check(s, JOBS, PARAMS)
    assert s.optimizer_steps == {"a": [0, 2], "b": [1]}


def test_params_mismatch():
    assert kinds(sched(valid_mbs(), capacity=2048)) == ["params"]
    # the rules hold against the parameters given: a gap of 2 is enough for the real 2 stages
    assert kinds(sched(valid_mbs(), stages=3)) == ["params"]
    mbs = valid_mbs()
    mbs[1] = Microbatch((seg("b", 0, [0, 1], [900, 200]),))  # 1152 padded: fits the 2048 it claims, not the 1024
    wide = Job.from_batches("b", [[900, 200]])
    assert sorted({v.kind for v in verify(sched(mbs, capacity=2048), [A, wide], PARAMS)}) == ["capacity", "params"]
    # with no parameters given, the schedule's own are the yardstick
    assert verify(sched(mbs, capacity=2048), [A, wide]) == []
    assert {v.kind for v in verify(sched(valid_mbs(), stages=3), JOBS)} == {"dependency"}


def test_unknown_adapter_and_global_batch():
    mbs = valid_mbs() + [Microbatch((seg("zzz", 0, [0], [10]),))]
    assert "unknown" in kinds(sched(mbs))
    mbs = valid_mbs()
    mbs[1] = Microbatch((seg("b", 5, [0, 1], [400, 100]),))
    assert "unknown" in kinds(sched(mbs))


def test_capacity():
    mbs = valid_mbs()
    mbs[1] = Microbatch((seg("b", 0, [0, 1], [400, 100], padded=1152),))  # a multiple, but over the capacity
    assert kinds(sched(mbs), exact_padding=False) == ["capacity"]


def test_padding_wrong_amount():
    mbs = valid_mbs()
    mbs[0] = Microbatch((seg("a", 0, [0, 1], [100, 200], padded=300),))  # not a multiple of 128
    assert kinds(sched(mbs)) == ["padding"]
    assert kinds(sched(mbs), exact_padding=False) == ["padding"]
    mbs[0] = Microbatch((seg("a", 0, [0, 1], [100, 200], padded=512),))  # over-padded: only exact mode rejects
    assert kinds(sched(mbs)) == ["padding"]
    assert kinds(sched(mbs), exact_padding=False) == []


def test_padding_malformed_segment():
    mbs = valid_mbs()
    mbs[0] = Microbatch((Segment("a", 0, (0, 1), (300,), 384),))
    assert "padding" in kinds(sched(mbs))


def test_same_adapter_twice_in_one_microbatch():
    mbs = [Microbatch((seg("a", 0, [0], [100]), seg("a", 0, [1], [200]))),
           Microbatch((seg("b", 0, [0, 1], [400, 100]),)),
           Microbatch((seg("a", 1, [2, 3], [300, 50]),))]
    assert kinds(sched(mbs)) == ["same_adapter"]


def test_coverage_missing_duplicate_foreign_and_wrong_tokens():
    base = valid_mbs()
    missing = [Microbatch((seg("a", 0, [0], [100]),))] + base[1:]
    assert kinds(sched(missing)) == ["coverage"]
    dup = base + [NOOP, Microbatch((seg("b", 0, [1], [100]),))]
    assert "coverage" in kinds(sched(dup))
    foreign = [Microbatch((seg("a", 0, [0, 1, 3], [100, 200, 50]),))] + base[1:]
    assert "coverage" in kinds(sched(foreign))
    wrong = [Microbatch((seg("a", 0, [0, 1], [100, 199]),))] + base[1:]
    assert kinds(sched(wrong)) == ["coverage"]
    absent_b = [base[0], NOOP, base[2]]
    assert kinds(sched(absent_b, steps={"a": [0, 2], "b": [1]})) == ["coverage"]


def test_split_sample_tokens_must_sum_to_length():
    job = Job("c", (1500, 100), 2, allow_split=True)
    p = PlanParams(capacity=1024, pad_multiple=128, stages=2)
    ok = [Microbatch((Segment("c", 0, (0,), (1024,), 1024),)),
          Microbatch((Segment("c", 0, (0, 1), (476, 100), 640),))]
    s = Schedule(ok, optimizer_steps_for(ok), 1024, 128, 2)
    assert verify(s, [job], p) == []
    bad = [ok[0], Microbatch((Segment("c", 0, (0, 1), (400, 100), 512),))]
    assert [v.kind for v in verify(Schedule(bad, optimizer_steps_for(bad), 1024, 128, 2), [job], p)] == ["coverage"]


def test_dependency_gap_too_small():
    mbs = [valid_mbs()[0], valid_mbs()[2], valid_mbs()[1]]  # a/g1 right after a/g0
    assert kinds(sched(mbs)) == ["dependency"]
    # a global batch starting before the previous one is a violation too
    mbs = [valid_mbs()[2], valid_mbs()[1], valid_mbs()[0]]
    assert "dependency" in kinds(sched(mbs, steps={"a": [2, 0], "b": [1]}))


def test_optimizer_steps():
    # a/g1 starts at microbatch 2 with 2 stages: stage 0 runs F0 F1 B0 F2 B1, so a's step may follow microbatch 0
    # only; after microbatch 1 it would land after F2, which ran on the stale weights
    assert kinds(sched(valid_mbs(), steps={"a": [1, 2], "b": [1]})) == ["optimizer_step"]
    assert kinds(sched(valid_mbs(), steps={"a": [2, 2], "b": [1]})) == ["optimizer_step"]  # at g1's first
    three = [valid_mbs()[0], valid_mbs()[1], NOOP, valid_mbs()[2]]  # a/g1 now starts at 3: after 1 is legal
    assert kinds(sched(three, steps={"a": [1, 3], "b": [1]})) == []
    assert kinds(sched(three, steps={"a": [2, 3], "b": [1]})) == ["optimizer_step"]
    assert kinds(sched(valid_mbs(), steps={"a": [0], "b": [1]})) == ["optimizer_step"]  # missing one
    assert kinds(sched(valid_mbs(), steps={"b": [1]})) == ["optimizer_step"]
    assert kinds(sched(valid_mbs(), steps={"a": [0, 2], "b": [0]})) == ["optimizer_step"]  # before b's end
    assert "unknown" in kinds(sched(valid_mbs(), steps={"a": [0, 2], "b": [1], "q": [0]}))


def test_check_raises_naming_the_violation():
    mbs = [valid_mbs()[0], valid_mbs()[2], valid_mbs()[1]]
    with pytest.raises(ValueError, match="dependency"):
        check(sched(mbs), JOBS, PARAMS)


def test_sample_of_unsplittable_job_must_appear_once_whole():
    # token totals right, but sample 1 of 'a' cut in two (in one segment, and across microbatches)
    cut_in_segment = [Microbatch((seg("a", 0, [0, 1, 1], [100, 150, 50]),))] + valid_mbs()[1:]
    assert kinds(sched(cut_in_segment)) == ["coverage"]
    cut_across = [Microbatch((seg("a", 0, [0, 1], [100, 150]),)), Microbatch((seg("a", 0, [1], [50]),))]
    mbs = cut_across + [NOOP, valid_mbs()[1], NOOP, valid_mbs()[2]]
    # the two pieces sit in different microbatches, so only the coverage rule can catch it
    assert kinds(sched(mbs, steps={"a": [1, 5], "b": [3]})) == ["coverage"]
    assert any("appear more than once" in v.message for v in verify(sched(mbs, steps={"a": [1, 5], "b": [3]}),
                                                                     JOBS, PARAMS))


def test_split_job_may_cut_only_samples_longer_than_a_microbatch():
    job = Job("c", (1500, 500), 2, allow_split=True)
    p = PlanParams(capacity=1024, pad_multiple=128, stages=2)
    fits_cut = [Microbatch((Segment("c", 0, (0, 1), (1000, 24), 1024),)),  # sample 1 (500 tokens) fits: not cut
                Microbatch((Segment("c", 0, (0, 1), (500, 476), 1024),))]
    v = verify(Schedule(fits_cut, optimizer_steps_for(fits_cut), 1024, 128, 2), [job], p)
    assert [x.kind for x in v] == ["coverage"] and "samples [1]" in v[0].message and "must not be cut" in v[0].message
    whole = [Microbatch((Segment("c", 0, (0,), (1024,), 1024),)), Microbatch((Segment("c", 0, (0, 1), (476, 500),
                                                                                       1024),))]
    assert verify(Schedule(whole, optimizer_steps_for(whole), 1024, 128, 2), [job], p) == []
    repeated = [whole[0], Microbatch((Segment("c", 0, (0, 0, 1), (200, 276, 500), 1024),))]
    v = verify(Schedule(repeated, optimizer_steps_for(repeated), 1024, 128, 2), [job], p)
    assert [x.kind for x in v] == ["coverage"] and "lists samples [0] more than once" in v[0].message


def test_split_piece_longer_than_a_microbatch_is_caught():
    job = Job("c", (1500,), 1, allow_split=True)
    p = PlanParams(capacity=1024, pad_multiple=128, stages=2)
    too_big = [Microbatch((Segment("c", 0, (0,), (1100,), 1152),)), Microbatch((Segment("c", 0, (0,), (400,), 512),))]
    v = verify(Schedule(too_big, optimizer_steps_for(too_big), 1024, 128, 2), [job], p)
    assert "coverage" in {x.kind for x in v} and any("longer than a microbatch holds (1024)" in x.message for x in v)


@pytest.mark.parametrize("field, value", [("pad_multiple", 0), ("stages", 0), ("capacity", -5)])
def test_nonsense_schedule_params_are_reported_not_crashed_on(field, value):
    s = sched(valid_mbs(), **{field: value})
    v = verify(s, JOBS)
    assert [x.kind for x in v] == ["params"] and f"{field} must be a positive integer, got {value}" in v[0].message
    d = s.to_dict()
    with pytest.raises(ValueError, match=f"schedule {field} must be a positive integer"):
        Schedule.from_dict(d)


def test_malformed_schedule_json_is_a_clear_error():
    d = sched(valid_mbs()).to_dict()
    del d["stages"]
    with pytest.raises(ValueError, match=r"schedule JSON is malformed: .*missing key\(s\) \['stages'\]"):
        Schedule.from_dict(d)
    with pytest.raises(ValueError, match="schedule format must be"):
        Schedule.from_dict([1, 2])


@pytest.mark.parametrize("path, key", [
    (("microbatches", 1), "segment"),  # a misspelt "segments" must not read as a no-op slot
    (("microbatches", 0, "segments", 0), "padded"),
    ((), "optimiser_steps"),
])
def test_schedule_json_with_a_misspelt_key_is_refused(path, key):
    import json

    d = json.loads(sched(valid_mbs()).to_json())
    target = d
    for k in path:
        target = target[k]
    real = {"segment": "segments", "padded": "padded_tokens", "optimiser_steps": "optimizer_steps"}[key]
    target[key] = target.pop(real)
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \['{key}'\].*missing key\(s\) \['{real}'\]"):
        Schedule.from_json(json.dumps(d))
    # meta is optional; a no-op slot is written {"segments": []}
    d = json.loads(sched(valid_mbs()).to_json())
    del d["meta"]
    d["microbatches"].append({"segments": []})
    assert Schedule.from_dict(d).microbatches[-1].is_noop


@pytest.mark.parametrize("path, value", [
    (("microbatches", 0, "segments", 0, "samples"), [0.9, 1.9]),
    (("microbatches", 0, "segments", 0, "padded_tokens"), float("inf")),
    (("microbatches", 0, "segments", 0, "global_batch"), True),
    (("microbatches", 0, "segments", 0, "adapter"), 5),
    (("capacity",), 1024.5),
    (("optimizer_steps", "b"), "1"),
    (("microbatches",), {"0": {}}),
])
def test_schedule_json_with_wrong_types_is_refused_not_rounded(path, value):
    import json

    d = json.loads(sched(valid_mbs()).to_json())
    target = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    with pytest.raises(ValueError, match="schedule JSON is malformed"):
        Schedule.from_json(json.dumps(d))
    assert Schedule.from_json(sched(valid_mbs()).to_json()).to_json() == sched(valid_mbs()).to_json()
