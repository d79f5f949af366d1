"""Pipeline-parallel co-training: the layer split, an exact resume of a stopped pipeline run, and a stage count the
launcher does not match (test_pipeline.py checks the pipeline against the one-process executor)."""
import os

import pytest
import torch
import pipeline_helpers as ph

from scheduling.executor import CoTrainer, CoTrainError, load_cotrain_config
from scheduling.pipeline import split_layers


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    return ph.make_model3(tmp_path_factory.mktemp("tiny3"))


def test_split_layers_is_contiguous_and_even():
    for n in range(1, 12):
        for s in range(1, n + 1):
            parts = split_layers(n, s)
            assert [k for r in parts for k in r] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    with pytest.raises(ValueError, match="3 stages for 2 decoder layers"):
        split_layers(2, 3)


@ph.needs_torchrun
def test_a_stopped_pipeline_run_resumes_to_the_uninterrupted_adapters(tmp_path, model3):
    jobs = ph.jobs(tmp_path, model3, dropout=0.2)
    full = ph.torchrun(2, ph.config(tmp_path, model3, jobs, "full", save_every=4))
    assert full.returncode == 0, full.stderr[-3000:]
    part = ph.config(tmp_path, model3, jobs, "part", save_every=4)
    first = ph.torchrun(2, part, "--stop-after", "7")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped (stop_after) after microbatch 7" in first.stdout
    out = str(tmp_path / "part")
    assert not os.path.isdir(os.path.join(out, "adapters")) or len(os.listdir(os.path.join(out, "adapters"))) < 3
    # a pipeline checkpoint is not for one process
    with pytest.raises(CoTrainError, match="written by a run of 2 process"):
        CoTrainer(load_cotrain_config(part)).run(resume=True)
    second = ph.torchrun(2, part, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = ph.adapters(str(tmp_path / "full")), ph.adapters(out)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name} {k}"
    ma, na = ph.metrics(str(tmp_path / "full"))
    mb, nb = ph.metrics(out)
    assert na == nb and ma == mb  # every step logged once, with the same numbers


@ph.needs_torchrun
def test_a_stage_count_the_launcher_does_not_match_is_one_error(tmp_path, model3):
    res = ph.torchrun(2, ph.config(tmp_path, model3, ph.jobs(tmp_path, model3), "bad", stages=3))
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.startswith("lorafusion cotrain:")]
    assert lines == ["lorafusion cotrain: config error: stages: must equal the number of processes the launcher "
                     "started (2): one pipeline stage per process (got 3)"], res.stderr[-3000:]
