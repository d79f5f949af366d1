"""Pipeline-parallel co-training: the layer split, an exact resume of a stopped pipeline run, and a stage count the
launcher does not match (test_pipeline.py checks the pipeline against the one-process executor)."""
import json
import os
import sys

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
def test_a_stage_count_the_launcher_does_not_match_is_one_error(tmp_path, model3):
    res = ph.torchrun(2, ph.config(tmp_path, model3, ph.jobs(tmp_path, model3), "bad", stages=3))
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.startswith("lorafusion cotrain:")]
    assert lines == ["lorafusion cotrain: config error: stages: must equal the number of processes the launcher "
                     "started (2): one pipeline stage per process (got 3)"], res.stderr[-3000:]


@ph.needs_torchrun
def test_pipeline_runs_stopped_two_ways_resume_to_the_same_adapters(tmp_path, model3):
    """With dropout, one run is stopped by a SIGTERM to torchrun with no checkpoint boundary ahead (save_every: 0: it
    is taken at the next stop check, every 4 microbatches here), another by --stop-after 7 between checkpoints
    (save_every: 4); both resume, and end with the same adapters and metrics, bit for bit (each stage restores its
    own dropout stream). A one-process resume of a pipeline checkpoint is refused."""
    import signal
    import subprocess
    import time

    jobs = ph.jobs(tmp_path, model3, dropout=0.2)
    jobs[0].pop("eval_data")
    jobs[0]["epochs"] = 12  # "short": a run long enough to be signalled half-way
    sig = ph.config(tmp_path, model3, jobs, "sig")
    out = str(tmp_path / "sig")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFUSION_STOP_CHECK_EVERY": "4",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([ph.TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "lorafusion", "cotrain",
                             "--config", sig], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = os.path.join(out, "metrics.jsonl")
    while proc.poll() is None and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    said = [x for x in stdout.splitlines() if x.startswith("lorafusion cotrain: stopped (SIGTERM) after microbatch")]
    assert said, stdout[-2000:] + stderr[-3000:]
    at = int(said[0].split("after microbatch ")[1].split(";")[0])
    n = len(json.load(open(os.path.join(out, "schedule.json")))["microbatches"])
    assert at % 4 == 0 and 0 < at < n, (at, n)
    assert os.path.isdir(os.path.join(out, "checkpoints", f"step-{at:07d}"))
    with pytest.raises(CoTrainError, match="written by a run of 2 process"):
        CoTrainer(load_cotrain_config(sig)).run(resume=True)
    res = ph.torchrun(2, sig, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]

    part = ph.config(tmp_path, model3, jobs, "part", save_every=4)
    first = ph.torchrun(2, part, "--stop-after", "7")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped (stop_after) after microbatch 7" in first.stdout
    second = ph.torchrun(2, part, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = ph.adapters(out), ph.adapters(str(tmp_path / "part"))
    assert a.keys() == b.keys() == {"long", "short", "tail"}
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name} {k}"
    ma, na = ph.metrics(out)
    mb, nb = ph.metrics(str(tmp_path / "part"))
    assert na == nb == len(ma) and ma == mb  # every step logged once, with the same numbers
