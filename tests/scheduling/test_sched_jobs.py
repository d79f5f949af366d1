"""Job input: sources, validation and the errors bad input gives."""

import json

import pytest

from scheduling import Job, PlanParams, load_jobs, plan, sample_lengths, sequential_ffd, mlora_like
from scheduling.jobs import job_from_spec, jsonl_lengths


def test_global_batches_cover_each_sample_once_per_epoch():
    job = Job("a", tuple(range(1, 11)), 4, num_global_batches=5)  # 10 samples, 3 batches per epoch
    gbs = job.global_batches()
    assert gbs[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert gbs[3] == [0, 1, 2, 3]  # second epoch
    assert sorted(s for g in gbs[:3] for s in g) == list(range(10))


def test_from_batches_and_sizes():
    job = Job.from_batches("a", [[5, 6, 7], [8, 9, 10], [11]])
    assert job.global_batch_size == 3 and job.num_global_batches == 3
    assert job.global_batch_samples(2) == [6]
    with pytest.raises(ValueError, match="global batch 1 has 2 samples"):
        Job.from_batches("a", [[5, 6, 7], [8, 9], [1, 2, 3]])
    with pytest.raises(ValueError, match="global batch 1 is empty"):
        Job.from_batches("a", [[5], []])


@pytest.mark.parametrize("kwargs, match", [
    (dict(adapter="a", lengths=(), global_batch_size=2), "job 'a' has no samples"),
    (dict(adapter="a", lengths=(5, 0), global_batch_size=2), "job 'a' sample 1 has length 0"),
    (dict(adapter="a", lengths=(5, -3), global_batch_size=2), "sample 1 has length -3"),
    (dict(adapter="a", lengths=(5,), global_batch_size=0), "global_batch_size must be a positive integer, got 0"),
    (dict(adapter="a", lengths=(5,), global_batch_size=2, num_global_batches=-1), "num_global_batches.*-1"),
    (dict(adapter="", lengths=(5,), global_batch_size=2), "adapter id"),
])
def test_bad_job(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Job(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity=0), "capacity must be a positive integer, got 0"),
    (dict(capacity=-5), "capacity must be a positive integer, got -5"),
    (dict(capacity=100, pad_multiple=128), r"capacity \(100\) must be at least the padding multiple \(128\)"),
    (dict(capacity=1024, stages=0), "stages must be a positive integer, got 0"),
    (dict(capacity=1024, pad_multiple=0), "pad_multiple must be a positive integer, got 0"),
])
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlanParams(**kwargs)


def test_sample_longer_than_capacity_names_job_and_sample():
    jobs = [Job("a", (10, 20), 2), Job("big", (100, 700, 30), 3)]
    p = PlanParams(capacity=512, pad_multiple=128, stages=2)
    for fn in (plan, sequential_ffd, mlora_like):
        with pytest.raises(ValueError, match=r"job 'big' sample 1 has 700 tokens.*capacity 512"):
            fn(jobs, p)


def test_split_when_allowed():
    p = PlanParams(capacity=512, pad_multiple=128, stages=2)
    job = Job("big", (100, 1100, 30), 3, allow_split=True)
    assert job.pieces(1, p) == [512, 512, 76]
    assert job.pieces(0, p) == [100]


def test_empty_and_duplicate_jobs():
    p = PlanParams(capacity=512)
    with pytest.raises(ValueError, match="jobs is empty"):
        plan([], p)
    with pytest.raises(ValueError, match="adapter id 'a' appears in more than one job"):
        plan([Job("a", (1,), 1), Job("a", (2,), 1)], p)


def test_sample_lengths_deterministic_and_bounded():
    x = sample_lengths(500, median=1000, sigma=0.5, minimum=16, maximum=4096, seed=3)
    assert x == sample_lengths(500, median=1000, sigma=0.5, minimum=16, maximum=4096, seed=3)
    assert x != sample_lengths(500, median=1000, sigma=0.5, minimum=16, maximum=4096, seed=4)
    assert min(x) >= 16 and max(x) <= 4096
    assert 850 < sorted(x)[250] < 1150  # median near 1000
    with pytest.raises(ValueError, match="median must be positive, got 0"):
        sample_lengths(5, median=0)


def test_load_yaml_and_jsonl(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"n": n, "text": "x"}) for n in (30, 40, 50)) + "\n")
    assert jsonl_lengths(data, length_field="n") == [30, 40, 50]
    with pytest.raises(ValueError, match="line 1 has no field 'm'"):
        jsonl_lengths(data, length_field="m")
    cfg = tmp_path / "jobs.yaml"
    cfg.write_text(
        "capacity: 1024\npad_multiple: 64\nstages: 3\nseed: 7\njobs:\n"
        "  - {adapter: x, global_batch_size: 4, num_global_batches: 2, distribution: {median: 200, sigma: 0.5}}\n"
        "  - {adapter: y, batches: [[10, 20], [30]]}\n"
        "  - {adapter: z, dataset: d.jsonl, length_field: n, global_batch_size: 2, epochs: 2}\n"
        "  - {adapter: w, lengths: [5, 6, 7], global_batch_size: 2}\n"
    )
    jobs, settings = load_jobs(cfg)
    assert settings == {"capacity": 1024, "pad_multiple": 64, "stages": 3, "seed": 7}
    assert [j.adapter for j in jobs] == ["x", "y", "z", "w"]
    assert len(jobs[0].lengths) == 8 and jobs[0].num_global_batches == 2
    assert jobs[1].lengths == (10, 20, 30) and jobs[1].num_global_batches == 2
    assert jobs[2].lengths == (30, 40, 50) and jobs[2].num_global_batches == 4
    assert jobs[3].num_global_batches == 2
    again, _ = load_jobs(cfg)
    assert again[0].lengths == jobs[0].lengths
    other, _ = load_jobs(cfg, seed=8)
    assert other[0].lengths != jobs[0].lengths


@pytest.mark.parametrize("spec, match", [
    ({"adapter": "x", "global_batch_size": 2}, "exactly one of"),
    ({"adapter": "x", "lengths": [1], "batches": [[1]]}, "exactly one of"),
    ({"adapter": "x", "lengths": [1, 2]}, "job 'x' needs global_batch_size"),
    ({"adapter": "x", "global_batch_size": 2, "distribution": {"median": 5}}, "needs num_global_batches"),
    ({"adapter": "x", "global_batch_size": 2, "num_global_batches": 1, "distribution": {"kind": "zipf"}},
     "kind 'zipf' is not supported"),
    ({"global_batch_size": 2, "lengths": [1]}, "needs an 'adapter' id"),
    ({"adapter": "x", "global_batch_size": 2, "lengths": [1], "epochs": 1, "num_global_batches": 1}, "not both"),
])
def test_bad_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        job_from_spec(spec)


@pytest.mark.parametrize("spec, match", [
    ({"adapter": "x", "global_batch_size": 2, "lengths": 5}, "job 'x' lengths must be a list, got 5"),
    ({"adapter": "x", "batches": [100, 200]}, r"job 'x' batches\[0\] must be a list, got 100"),
    ({"adapter": "x", "batches": "abc"}, "job 'x' batches must be a list"),
    ({"adapter": "x", "global_batch_size": 2, "num_global_batches": 1,
      "distribution": {"median": 300, "sigma": "abc"}}, "job 'x' distribution sigma must be a finite number, got 'abc'"),
    ({"adapter": "x", "global_batch_size": 2, "num_global_batches": 1, "distribution": {"median": 0}},
     "job 'x' distribution: median must be positive, got 0"),
    ({"adapter": "x", "global_batch_size": 2, "num_global_batches": 1, "distribution": {"sigma": 0.5}},
     "job 'x' distribution needs a median"),
    ({"adapter": "x", "global_batch_size": 2, "num_global_batches": 1, "distribution": {"median": 9, "mean": 3}},
     r"job 'x' distribution: unknown key\(s\) \['mean'\]"),
    ({"adapter": "x", "global_batch_size": 2, "lengths": [1], "num_global_batch": 9},
     r"job 'x': unknown key\(s\) \['num_global_batch'\]"),
    ({"adapter": "x", "global_batch_size": 2, "lengths": [1], "allow_split": "false"},
     "job 'x' allow_split must be true or false, got 'false'"),
    ({"adapter": "x", "global_batch_size": 2, "lengths": [1], "tokenizer": "gpt2"},
     r"job 'x': \['tokenizer'\] apply to a 'dataset' source only"),
    ({"adapter": "x", "batches": [[1, 2], [3]], "global_batch_size": 7},
     "job 'x': global_batch_size 7 differs from the 2 samples of its first listed batch"),
    ({"adapter": "x", "global_batch_size": 2, "lengths": [1], "epochs": 0}, "job 'x' epochs must be a positive"),
    # sizes no run has: an error, not a 119 GiB allocation for the lengths or a plan that never ends
    ({"adapter": "x", "global_batch_size": 16, "num_global_batches": 10**9, "distribution": {"median": 300}},
     "job 'x': global_batch_size 16 x num_global_batches 1000000000 = 16,000,000,000 samples to plan, more than "
     "the planner's limit of 1,000,000 per job"),
    ({"adapter": "x", "global_batch_size": 2, "lengths": [5, 6, 7], "num_global_batches": 500_001},
     "job 'x': global_batch_size 2 x num_global_batches 500001 = 1,000,002 samples"),
    ({"adapter": "x", "global_batch_size": 4, "lengths": [5, 6, 7], "epochs": 10**6},
     "job 'x': global_batch_size 4 x num_global_batches 1000000 = 4,000,000 samples"),
])
def test_bad_spec_types_and_keys_name_the_job(spec, match):
    with pytest.raises(ValueError, match=match):
        job_from_spec(spec)


def test_the_planned_size_limit_is_inclusive():
    from scheduling.jobs import MAX_PLANNED_SAMPLES

    job = job_from_spec({"adapter": "x", "global_batch_size": 2, "lengths": [5, 6, 7],
                         "num_global_batches": MAX_PLANNED_SAMPLES // 2})
    assert job.num_global_batches * job.global_batch_size == MAX_PLANNED_SAMPLES


def test_batches_job_honours_epochs_and_num_global_batches():
    job = job_from_spec({"adapter": "x", "batches": [[1, 2], [3, 4], [5]], "epochs": 2})
    assert job.num_global_batches == 6 and job.global_batch_samples(3) == [0, 1]
    job = job_from_spec({"adapter": "x", "batches": [[1, 2], [3, 4], [5]], "num_global_batches": 4,
                         "global_batch_size": 2})
    assert job.num_global_batches == 4 and job.global_batch_samples(3) == [0, 1]


def test_bad_jobs_files_and_jsonl_name_file_line_and_job(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("jobs: [{adapter: a, lengths: [1, 2\n")
    with pytest.raises(ValueError, match="jobs file .*bad.yaml' is not valid YAML / JSON"):
        load_jobs(bad_yaml)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("capacity: 64\ncapacty: 9\njobs: [{adapter: a, lengths: [1], global_batch_size: 1}]\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['capacty'\]"):
        load_jobs(unknown)
    seed = tmp_path / "seed.yaml"
    seed.write_text("seed: abc\njobs: [{adapter: a, lengths: [1], global_batch_size: 1}]\n")
    with pytest.raises(ValueError, match="seed.yaml' seed must be a non-negative integer, got 'abc'"):
        load_jobs(seed)
    data = tmp_path / "d.jsonl"
    for body, match in [
        ('{"n": 5}\nnot json\n', "job 'j' dataset .*d.jsonl' line 2 is not valid JSON"),
        ('{"n": 5}\n7\n', "line 2 must be a JSON object, got 7"),
        ('{"n": null}\n', "line 1: 'n' must be a positive integer, got None"),
        ('{"n": 20.9}\n', "line 1: 'n' must be a positive integer, got 20.9"),
        ('{"n": "30"}\n', "line 1: 'n' must be a positive integer, got '30'"),
    ]:
        data.write_text(body)
        with pytest.raises(ValueError, match=match):
            jsonl_lengths(data, length_field="n", job="j")
    data.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match=r"job 'j' dataset .* cannot load tokenizer '.*no_such_tokenizer'"):
        jsonl_lengths(data, tokenizer=str(tmp_path / "no_such_tokenizer"), job="j")


def test_jsonl_through_a_tokenizer_counts_tokens_as_training_feeds_them(tmp_path):
    """Text and prompt/completion records count the tokens the trainer's tokenization gives (special tokens and
    the EOS it appends included); a byte-order mark is skipped; a bad byte names the file and line."""
    pytest.importorskip("transformers")
    import random

    from lorafusion.train.data import tokenize_records
    from lorafusion.train.presets import build_tokenizer

    tok_dir = tmp_path / "tok"
    tok = build_tokenizer()
    tok.save_pretrained(tok_dir)
    rng = random.Random()
    letters = "abcdefghijklmnopqrstuvwxyz"
    recs = []
    for _ in range(12):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 40)))
        recs.append({"text": word} if rng.random() < 0.5 else {"prompt": word.upper() + "=", "completion": word})
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in recs).encode() + b"\n")
    samples, _ = tokenize_records(recs, tok, 10**6)
    assert jsonl_lengths(data, tokenizer=str(tok_dir)) == [len(s.input_ids) for s in samples]
    other = tmp_path / "o.jsonl"  # text under another field
    other.write_text("\n".join(json.dumps({"body": r.get("text", "x")}) for r in recs) + "\n")
    want = [len(s.input_ids) for s in tokenize_records([{"text": r.get("text", "x")} for r in recs], tok, 10**6)[0]]
    assert jsonl_lengths(other, tokenizer=str(tok_dir), text_field="body") == want
    data.write_bytes(b'{"text": "ab"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"job 'j' dataset .*d.jsonl' line 2 is not valid UTF-8 \(byte 0xe9"):
        jsonl_lengths(data, tokenizer=str(tok_dir), job="j")
    data.write_text('{"prompt": "AB="}\n')
    with pytest.raises(ValueError, match=r"line 1: missing field 'completion'"):
        jsonl_lengths(data, tokenizer=str(tok_dir))


def test_numpy_integers_are_stored_as_ints_and_the_plan_serialises():
    import numpy as np

    params = PlanParams(np.int64(300), np.int32(1), np.int64(2))
    job = Job("a", tuple(np.arange(10, 60, 10)), np.int64(2), num_global_batches=np.int16(3), allow_split=np.bool_(0))
    assert all(type(v) is int for v in (params.capacity, params.pad_multiple, params.stages, job.global_batch_size,
                                        job.num_global_batches))
    assert type(job.allow_split) is bool
    s = plan([job], params)
    from scheduling import Schedule, verify

    assert verify(s, [job], params) == [] and Schedule.from_json(s.to_json()).to_json() == s.to_json()


def test_huge_median_clips_to_the_maximum():
    assert sample_lengths(4, median=1e30, maximum=4096) == [4096] * 4
    assert min(sample_lengths(4, median=1e30)) > 2**40  # no wrap-around to tiny lengths


def test_jobs_file_is_read_as_json_when_it_is_json(tmp_path):
    doc = {"capacity": 2048, "jobs": [{"adapter": "a", "global_batch_size": 4, "num_global_batches": 2,
                                       "distribution": {"median": 1e3, "sigma": 1e-05, "max": 2048}}]}
    f = tmp_path / "jobs.json"
    f.write_text(json.dumps(doc, indent="\t"))  # tabs: not YAML; 1e-05: a string to YAML 1.1
    jobs, settings = load_jobs(f)
    assert settings == {"capacity": 2048} and len(jobs[0].lengths) == 8
    assert all(990 <= n <= 1010 for n in jobs[0].lengths)
    f.write_bytes(b"jobs:\n  - adapter: caf\xe9\n")
    with pytest.raises(ValueError, match=r"jobs file .*jobs.json' is not valid UTF-8"):
        load_jobs(f)


def test_a_key_given_twice_in_a_jobs_file_is_an_error_not_the_last_one_wins(tmp_path):
    """YAML and JSON parsers keep the last of two equal keys silently: a jobs file with `lengths` (or `capacity`)
    written twice would plan on whichever came last."""
    cases = [("dup.yaml", "capacity: 1024\njobs:\n  - adapter: a\n    global_batch_size: 1\n    lengths: [10, 20]\n"
                          "    lengths: [30]\n",
              r"(?s)jobs file .*dup.yaml' is not valid YAML / JSON.*found the key 'lengths' twice"),
             ("top.yaml", "capacity: 1024\njobs: [{adapter: a, global_batch_size: 1, lengths: [10]}]\ncapacity: 64\n",
              "found the key 'capacity' twice"),
             ("dup.json", '{"capacity": 1024, "jobs": [{"adapter": "a", "global_batch_size": 1, "lengths": [10], '
                          '"adapter": "b"}]}',
              r"jobs file .*dup.json': key 'adapter' is given twice in one object")]
    for name, text, match in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            load_jobs(tmp_path / name)
    j = tmp_path / "dup.json"
    j.write_text('{"capacity": 1024, "jobs": [{"adapter": "a", "global_batch_size": 1, "lengths": [10]}]}')
    assert load_jobs(j)[0][0].lengths == (10,)  # the same file without the repeat loads


def test_unreadable_jobs_file_or_dataset_is_a_clear_error(tmp_path, monkeypatch):
    """A jobs file or dataset that exists but cannot be read (no permission: root reads anything, so the error is
    injected) is a ValueError naming the file (and the job), not a traceback; a folder is named as one."""
    from pathlib import Path

    f = tmp_path / "jobs.yaml"
    f.write_text("jobs: [{adapter: a, global_batch_size: 1, dataset: d.jsonl, length_field: n}]\n")
    (tmp_path / "d.jsonl").write_text('{"n": 5}\n')
    assert load_jobs(f)[0][0].lengths == (5,)
    with pytest.raises(ValueError, match=r"jobs file .* is a folder, not a file"):
        load_jobs(tmp_path)
    real_open = open

    def no_dataset(path, *a, **k):
        if str(path).endswith("d.jsonl"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", no_dataset)
    with pytest.raises(ValueError, match=r"job 'a' dataset .*d.jsonl' cannot be read: Permission denied"):
        load_jobs(f)
    monkeypatch.undo()

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ValueError, match=r"jobs file .*jobs.yaml' cannot be read: Permission denied"):
        load_jobs(f)


def test_a_bad_text_field_is_named_by_its_own_name(tmp_path):
    pytest.importorskip("transformers")
    from lorafusion.train.presets import build_tokenizer

    tok_dir = tmp_path / "tok"
    build_tokenizer().save_pretrained(tok_dir)
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "ab"}\n{"body": 5}\n')
    with pytest.raises(ValueError, match=r"line 2: field 'body' must be a string, got int"):
        jsonl_lengths(data, tokenizer=str(tok_dir), text_field="body")
    data.write_text('{"body": ""}\n')
    with pytest.raises(ValueError, match=r"line 1: field 'body' is empty"):
        jsonl_lengths(data, tokenizer=str(tok_dir), text_field="body")
