"""The multi-tenant job queue (``scheduling.queue``, ``lorafusion queue``): jobs checked in full when submitted,
batches taken fairly over tenants, every job's adapter equal to the executor's on the same batch, a batch whose
worker died resumed by the next worker, and a batch a live worker holds left alone."""
import json
import os
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from scheduling.executor import CoTrainer
from scheduling.queue import Queue, QueueError, _claim

LETTERS = "abcdefghijklABCDEFGHIJKL"


def _data(path, rng, n, lo, hi):
    rows = []
    for _ in range(n):
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
        rows.append(json.dumps({"prompt": s + "=", "completion": s[::-1]}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def queue(tmp_path, tiny_model):
    settings = tmp_path / "queue.yaml"
    settings.write_text(json.dumps({"model": tiny_model, "capacity": 48, "stages": 1, "save_every": 2,
                                    "max_jobs_per_batch": 2}))
    return Queue.init(str(tmp_path / "Q"), str(settings))


@pytest.fixture
def job_files(tmp_path):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    files = []
    for k, (n, lo, hi, gbs, r) in enumerate([(9, 2, 6, 3, 4), (6, 5, 12, 2, 8), (7, 3, 9, 4, 2), (5, 2, 4, 5, 4)]):
        d = _data(tmp_path / f"d{k}.jsonl", rng, n, lo, hi)
        f = tmp_path / f"job{k}.yaml"
        f.write_text(json.dumps({"data": d.name, "global_batch_size": gbs, "epochs": 2, "r": r, "alpha": 2 * r,
                                 "lr": 1e-2, "dropout": 0.1}))
        files.append(str(f))
    return files


def _direct(tmp_path, q, job_ids, name):
    """The same batch run by the executor directly: the queue adds nothing to the training."""
    cfg = q._cotrain_config([q._job_spec(j) for j in job_ids], output_dir=str(tmp_path / name))
    CoTrainer(cfg).run()
    return {j: load_file(str(tmp_path / name / "adapters" / j / "adapter_model.safetensors")) for j in job_ids}


def _adapter(q, job_id):
    return load_file(os.path.join(q.path, "jobs", job_id, "adapter", "adapter_model.safetensors"))


def test_batches_are_fair_over_tenants_and_train_what_the_executor_trains(tmp_path, queue, job_files):
    a1 = queue.submit("alice", job_files[0])
    a2 = queue.submit("alice", job_files[1])
    a3 = queue.submit("alice", job_files[2])
    b1 = queue.submit("bob", job_files[3])
    assert [j["state"] for j in queue.jobs()] == ["pending"] * 4
    results = queue.work()
    # two a batch, round-robin over tenants in order of submission: bob's one job is not left behind alice's three
    assert [r["done"] for r in results] == [[a1, b1], [a2, a3]]
    states = {j["id"]: j for j in queue.jobs()}
    assert all(s["state"] == "done" and s["result"]["steps"] > 0 for s in states.values())
    want = _direct(tmp_path, queue, [a1, b1], "direct")
    for j in (a1, b1):
        got = _adapter(queue, j)
        assert set(got) == set(want[j]) and all(torch.equal(got[k], want[j][k]) for k in got)
    cfg = json.load(open(os.path.join(queue.path, "jobs", a1, "adapter", "adapter_config.json")))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_a_bad_job_is_refused_at_submit_and_nothing_is_queued(tmp_path, queue, job_files):
    from lorafusion.train.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"data": "d0.jsonl", "global_batch_size": 2, "r": 0}))
    with pytest.raises(ConfigError, match=rf"^job file {bad}: r: must be in \[1, 256\] \(got 0\)"):
        queue.submit("alice", str(bad))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "a" * 60 + "=", "completion": "b"}) + "\n")
    bad.write_text(json.dumps({"data": "long.jsonl", "global_batch_size": 1}))
    with pytest.raises(QueueError, match=rf"job {bad} refused: job\.data: {long} line 1 has 64 tokens, more than "
                                         r"the 48 a microbatch holds"):
        queue.submit("alice", str(bad))
    bad.write_text(json.dumps({"data": "d0.jsonl", "global_batch_size": 2, "colour": "red"}))
    with pytest.raises(ConfigError, match=r"unknown config key 'colour' \(known in a job: adapter, alpha"):
        queue.submit("alice", str(bad))
    with pytest.raises(QueueError, match="--tenant must be 1-64 letters"):
        queue.submit("../x", job_files[0])
    assert queue.jobs() == [] and os.listdir(os.path.join(queue.path, "jobs")) == []


def test_a_queued_job_keeps_its_data_when_the_file_changes(tmp_path, queue, job_files):
    j = queue.submit("alice", job_files[3])
    data = tmp_path / "d3.jsonl"
    before = data.read_text()
    data.write_text("not json\n")
    assert open(os.path.join(queue.path, "jobs", j, "data.jsonl")).read() == before
    assert [r["done"] for r in queue.work()] == [[j]]


def test_cancel_takes_a_pending_job_out_and_refuses_others(queue, job_files):
    a = queue.submit("alice", job_files[0])
    b = queue.submit("bob", job_files[3])
    queue.cancel(a)
    assert [r["done"] for r in queue.work()] == [[b]]
    assert {j["id"]: j["state"] for j in queue.jobs()} == {a: "cancelled", b: "done"}
    with pytest.raises(QueueError, match=rf"job {b} is done; only a pending job can be cancelled"):
        queue.cancel(b)
    with pytest.raises(QueueError, match="no job 'nope'"):
        queue.cancel("nope")


def test_a_batch_whose_worker_died_is_resumed_and_one_a_live_worker_holds_is_left_alone(tmp_path, queue,
                                                                                        job_files, monkeypatch):
    a = queue.submit("alice", job_files[0])
    b = queue.submit("bob", job_files[1])
    real = CoTrainer._microbatch
    calls = {"n": 0}

    def dies(self, mb, inflight):
        calls["n"] += 1
        if calls["n"] > 5:
            raise _Killed()
        return real(self, mb, inflight)

    monkeypatch.setattr(CoTrainer, "_microbatch", dies)
    with pytest.raises(_Killed):
        queue.work()
    monkeypatch.setattr(CoTrainer, "_microbatch", real)
    st = {j["id"]: j for j in queue.jobs()}
    assert st[a]["state"] == st[b]["state"] == "running"
    batch = st[a]["batch"]
    held = _claim(os.path.join(queue.path, "batches", batch))  # a live worker on it: nobody else takes it
    assert held is not None and queue.work() == []
    os.close(held)
    assert queue.work() == [{"batch": batch, "done": [a, b]}]  # resumed from its checkpoint
    want = _direct(tmp_path, queue, [a, b], "direct")
    for j in (a, b):
        got = _adapter(queue, j)
        assert all(torch.equal(got[k], want[j][k]) for k in got)


def test_cli(tmp_path, tiny_model, job_files, capsys):
    from lorafusion.cli import main

    settings = tmp_path / "q.yaml"
    settings.write_text(json.dumps({"model": tiny_model, "capacity": 48}))
    q = str(tmp_path / "Q")
    assert main(["queue", "init", "--queue", q, "--config", str(settings)]) == 0
    assert main(["queue", "submit", "--queue", q, "--tenant", "carol", job_files[3]]) == 0
    job = capsys.readouterr().out.strip().splitlines()[-1]
    assert job.startswith("carol-")
    assert main(["queue", "status", "--queue", q]) == 0
    assert "1 pending" in capsys.readouterr().out
    assert main(["queue", "work", "--queue", q, "--once"]) == 0
    assert f"done: {job}" in capsys.readouterr().out
    assert main(["queue", "status", "--queue", q, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "done"
    assert main(["queue", "status", "--queue", str(tmp_path)]) == 2
    assert "is not a queue (no queue.yaml" in capsys.readouterr().err
    settings.write_text(json.dumps({"model": tiny_model, "max_jobs_per_batch": 0}))
    assert main(["queue", "init", "--queue", str(tmp_path / "Q2"), "--config", str(settings)]) == 2
    assert "max_jobs_per_batch: must be a positive integer (got 0)" in capsys.readouterr().err
    assert main(["queue", "work", "--queue", q, "--poll", "nan"]) == 2
    assert "--poll must be a finite number of seconds >= 0, got nan" in capsys.readouterr().err
    settings.write_text(json.dumps({"model": tiny_model}))
    assert main(["queue", "init", "--queue", "/dev/null/Q", "--config", str(settings)]) == 2
    assert "lorafusion queue: --queue /dev/null/Q: cannot make the queue there" in capsys.readouterr().err
    assert main(["queue", "retry", "--queue", q, job]) == 2
    assert f"job {job} is done; only a failed or cancelled job can be retried" in capsys.readouterr().err


class _Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` sees it, as no handler runs when a process is killed."""


def test_resume_keeps_the_batch_order_finishes_copying_and_takes_another_path_spelling(tmp_path, queue, job_files,
                                                                                       monkeypatch):
    """Three defects a reviewer found, each of which failed every job of a batch whose worker died: the resume took
    the jobs in submission order instead of the batch's round-robin order; a worker killed while copying adapters
    left its last jobs to a resume with only them; a worker naming the queue by another path spelling saw other
    data paths."""
    import yaml

    qy = os.path.join(queue.path, "queue.yaml")
    cfg = yaml.safe_load(open(qy))
    cfg["max_jobs_per_batch"] = 3
    yaml.safe_dump(cfg, open(qy, "w"))
    a1 = queue.submit("alice", job_files[0])
    a2 = queue.submit("alice", job_files[1])
    b1 = queue.submit("bob", job_files[3])
    real_copy = __import__("shutil").copytree
    copies = {"n": 0}

    def dies_in_copy(src, dst, *a, **k):
        copies["n"] += 1
        if copies["n"] == 2:
            raise _Killed()
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr("scheduling.queue.shutil.copytree", dies_in_copy)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Killed):
        Queue("Q").work()  # a relative spelling of the queue
    monkeypatch.setattr("scheduling.queue.shutil.copytree", real_copy)
    st = {j["id"]: j["state"] for j in queue.jobs()}
    assert st == {a1: "done", b1: "running", a2: "running"}  # round-robin: [a1, b1, a2]
    batch = next(j["batch"] for j in queue.jobs())
    assert queue.work() == [{"batch": batch, "done": [a1, b1, a2]}]
    want = _direct(tmp_path, queue, [a1, b1, a2], "direct")
    for j in (a1, b1, a2):
        got = _adapter(queue, j)
        assert all(torch.equal(got[k], want[j][k]) for k in got)


def test_a_broken_job_fails_its_batch_with_the_reason_and_the_queue_goes_on(tmp_path, queue, job_files):
    a = queue.submit("alice", job_files[0])
    b = queue.submit("bob", job_files[3])
    with open(os.path.join(queue.path, "jobs", a, "job.yaml"), "w") as fh:
        fh.write("data: [unclosed\n")
    (result,) = queue.work()
    assert result["failed"].startswith(f"batch {result['batch']}: ")
    st = {j["id"]: j for j in queue.jobs()}
    assert st[a]["state"] == st[b]["state"] == "failed" and "batch" in st[b]["error"]
    c = queue.submit("carol", job_files[2])
    assert [r["done"] for r in queue.work()] == [[c]]  # not blocked behind the failed batch
    queue.retry(b)
    assert [r["done"] for r in queue.work()] == [[b]]


def test_corrupt_states_and_unfinished_submits_do_not_stop_the_queue(queue, job_files):
    a = queue.submit("alice", job_files[0])
    b = queue.submit("bob", job_files[3])
    with open(os.path.join(queue.path, "jobs", a, "state.json"), "w") as fh:
        fh.write("{not json")
    os.makedirs(os.path.join(queue.path, "jobs", "bob-19990101-000000-abcdef.tmp"))  # a submit killed half-way
    st = {j["id"]: j["state"] for j in queue.jobs()}
    assert st == {a: "corrupt", b: "pending"}
    assert [r["done"] for r in queue.work()] == [[b]]
    with pytest.raises(QueueError, match=f"job {a}: its state file .* is corrupt"):
        queue.cancel(a)


def test_fairness_carries_over_from_batch_to_batch(tmp_path, tiny_model, job_files):
    """With one job a batch, alice's four jobs and bob's one alternate instead of bob waiting behind all four."""
    settings = tmp_path / "one.yaml"
    settings.write_text(json.dumps({"model": tiny_model, "capacity": 48, "max_jobs_per_batch": 1}))
    q = Queue.init(str(tmp_path / "Q1"), str(settings))
    alice = [q.submit("alice", job_files[k]) for k in (0, 1, 2)]
    bob = q.submit("bob", job_files[3])
    order = [q._take_batch() for _ in range(4)]
    for *_, fd in order:
        os.close(fd)
    assert [ids for _, ids, _, _ in order] == [[alice[0]], [bob], [alice[1]], [alice[2]]]


def test_a_job_or_queue_that_would_fail_every_batch_is_refused_up_front(tmp_path, tiny_model, queue, job_files):
    from scheduling.executor import CoTrainError

    bad = tmp_path / "targets.yaml"
    bad.write_text(json.dumps({"data": "d0.jsonl", "global_batch_size": 2, "target_modules": ["no_such_proj"]}))
    with pytest.raises(QueueError, match=r"refused: target_modules: adapter 'job': target_modules=\['no_such_proj'\] "
                                         r"match none of the wrapped linears"):
        queue.submit("mallory", str(bad))
    settings = tmp_path / "s.yaml"
    for value, message in (({"device": "cuda"}, "device: cuda, but no CUDA device is available here"),
                           ({"model": str(tmp_path / "nope")}, "is not a Hugging Face model folder"),
                           ({"target_modules": ["nope"]}, "target_modules=\\['nope'\\] matched no nn.Linear")):
        settings.write_text(json.dumps({"model": tiny_model, **value}))
        with pytest.raises((QueueError, CoTrainError), match=message):
            Queue.init(str(tmp_path / "Qx"), str(settings))
        assert not os.path.exists(tmp_path / "Qx" / "queue.yaml")


def test_a_pipeline_queue_runs_each_batch_over_its_stages(tmp_path, tiny_model):
    """pipeline_processes: each batch runs under torchrun, one process per stage, and its jobs end with the
    adapters the one-process executor trains on the same batch; a setting the pipeline cannot run is refused."""
    from lorafusion.train.config import ConfigError

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    files = []
    for k, (n, lo, hi, gbs) in enumerate([(7, 2, 6, 3), (5, 4, 10, 2)]):
        d = _data(tmp_path / f"p{k}.jsonl", rng, n, lo, hi)
        f = tmp_path / f"pjob{k}.yaml"
        f.write_text(json.dumps({"data": d.name, "global_batch_size": gbs, "epochs": 2, "r": 4, "alpha": 8,
                                 "lr": 1e-2, "max_grad_norm": 0.5}))
        files.append(str(f))
    base = {"model": tiny_model, "capacity": 48, "stages": 2, "save_every": 3, "precision": "fp64"}
    for bad, message in [({"pipeline_processes": 3}, "pipeline_processes: must equal stages (2)"),
                         ({"pipeline_processes": 3, "stages": 3}, "3 stages for 2 decoder layers")]:
        path = tmp_path / "bad.yaml"
        path.write_text(json.dumps({**base, **bad}))
        with pytest.raises((ConfigError, QueueError), match=re.escape(message)):
            Queue.init(str(tmp_path / "Qbad"), str(path))
    settings = tmp_path / "pq.yaml"
    settings.write_text(json.dumps({**base, "pipeline_processes": 2}))
    q = Queue.init(str(tmp_path / "PQ"), str(settings))
    ids = [q.submit("alice", files[0]), q.submit("bob", files[1])]
    results = q.work()
    assert results == [{"batch": results[0]["batch"], "done": ids}], open(
        os.path.join(q.path, "batches", results[0]["batch"], "pipeline.log")).read()[-3000:]
    summary = json.load(open(os.path.join(q.path, "batches", results[0]["batch"], "run", "summary.json")))
    assert summary["pipeline"]["processes"] == 2
    want = _direct(tmp_path, q, ids, "direct")
    for j in ids:
        got = _adapter(q, j)
        assert set(got) == set(want[j])
        for k in got:
            torch.testing.assert_close(got[k], want[j][k], rtol=1e-9, atol=1e-12)


def test_priorities_pick_the_batch_and_a_tenant_quota_caps_what_it_queues(tmp_path, tiny_model, job_files, capsys):
    """A batch holds jobs of the highest pending priority only, round-robin over their tenants; a job's priority can
    be changed while it is pending; max_queued_per_tenant refuses a tenant's submit beyond the cap (pending and
    running jobs count), queuing nothing; bad priorities and caps are refused by name."""
    from lorafusion.cli import main
    from lorafusion.train.config import ConfigError

    settings = tmp_path / "pq.yaml"
    settings.write_text(json.dumps({"model": tiny_model, "capacity": 48, "max_jobs_per_batch": 2,
                                    "max_queued_per_tenant": 2}))
    q = Queue.init(str(tmp_path / "PQ"), str(settings))
    a0, a1 = q.submit("alice", job_files[0]), q.submit("alice", job_files[1])
    with pytest.raises(QueueError, match=r"tenant alice has 2 jobs pending or running, the most "
                                         r"max_queued_per_tenant \(2\) allows"):
        q.submit("alice", job_files[2])
    assert len(q.jobs()) == 2  # nothing queued, no half-made folder
    assert not [n for n in os.listdir(os.path.join(q.path, "jobs")) if n.endswith(".tmp")]
    b0 = q.submit("bob", job_files[2], priority=5)
    c0 = q.submit("carol", job_files[3], priority=-3)
    assert main(["queue", "priority", "--queue", q.path, a1, "--priority", "5"]) == 0
    assert f"{a1} has priority 5" in capsys.readouterr().out
    batch, ids, resumed, claim = q._take_batch()
    assert ids == [a1, b0] and not resumed  # priority 5 only, alice's first job of it submitted before bob's
    with pytest.raises(QueueError, match=f"job {a1} is running; only a pending job's priority can be changed"):
        q.set_priority(a1, 0)
    with pytest.raises(QueueError, match="tenant alice has 2 jobs pending or running"):  # a0 pending, a1 running
        q.submit("alice", job_files[2])
    for j in (a1, b0):  # the batch ends
        q._set_state(j, state="done")
    os.close(claim)
    a2 = q.submit("alice", job_files[2])
    _, ids, _, fd = q._take_batch()
    os.close(fd)
    assert ids == [a0, a2]  # priority 0 before carol's -3, however long carol has waited
    for j in ids:
        q._set_state(j, state="done")
    _, ids, _, claim = q._take_batch()
    assert ids == [c0] and q._take_batch() is None  # its worker holds the last batch: nothing else to run
    os.close(claim)
    for bad in (1001, -1001, True, "high"):
        with pytest.raises(QueueError, match=r"--priority must be an integer from -1000 to 1000"):
            q.submit("dave", job_files[3], priority=bad)
    assert main(["queue", "submit", "--queue", q.path, "--tenant", "dave", "--priority", "2000", job_files[3]]) == 2
    assert "--priority must be an integer from -1000 to 1000 (higher runs first), got 2000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["queue", "status", "--queue", q.path, "--priority", "1"])
    assert "--priority is for submit and priority, not status" in capsys.readouterr().err
    for cap in (0, -1, 1.5, True, "2"):
        settings.write_text(json.dumps({"model": tiny_model, "max_queued_per_tenant": cap}))
        with pytest.raises(ConfigError, match=re.escape(f"max_queued_per_tenant: must be a positive integer, or null "
                                                        f"for no cap (got {cap!r})")):
            Queue.init(str(tmp_path / "PQx"), str(settings))
