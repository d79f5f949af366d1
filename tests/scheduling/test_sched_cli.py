"""`scheduling.cli.main` (what `lorafusion plan` dispatches to) and `python -m scheduling plan`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduling import Schedule, load_jobs, verify
from scheduling.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "benchmarks" / "jobs_example.yaml"


def test_plan_writes_a_valid_schedule(tmp_path, capsys):
    out = tmp_path / "schedule.json"
    metrics = tmp_path / "metrics.json"
    rc = main(["plan", "--jobs", str(EXAMPLE), "-o", str(out), "--milp-time-limit", "0.05",
               "--metrics-json", str(metrics), "--least-padding"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "a: sequential FFD" in text and "b: mLoRA-like" in text
    s = Schedule.load(out)
    jobs, settings = load_jobs(EXAMPLE)
    assert s.capacity == settings["capacity"] and s.pad_multiple == settings["pad_multiple"]
    assert verify(s, jobs) == []
    m = json.loads(metrics.read_text())
    assert m["plan"]["time"] < m["a: sequential FFD"]["time"]
    assert m["plan"]["time"] < m["b: mLoRA-like"]["time"]
    least = m["least_padding"]  # the bound, beside what the plan pays
    assert 0 < least["tokens"] <= least["plan_tokens"] == m["plan"]["padded_tokens"] - m["plan"]["real_tokens"]
    assert f"the plan pays {least['plan_tokens']} tokens (" in text
    assert f"no schedule of these jobs pays fewer than {least['tokens']} (" in text


def test_flags_override_the_file(tmp_path):
    out = tmp_path / "s.json"
    assert main(["--jobs", str(EXAMPLE), "-o", str(out), "--capacity", "8192", "--pad-multiple", "64",
                 "--stages", "2", "--no-baselines", "--milp-time-limit", "0"]) == 0
    s = Schedule.load(out)
    assert (s.capacity, s.pad_multiple, s.stages) == (8192, 64, 2)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["--jobs", str(EXAMPLE), "--capacity", "3000", "--pad-multiple", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: job 'code' sample" in err and "capacity 3000" in err
    assert main(["--jobs", str(EXAMPLE), "--capacity", "64"]) == 2
    assert "capacity (64) must be at least the padding multiple (128)" in capsys.readouterr().err
    assert main(["--jobs", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("capacity: 1024\njobs: []\n")
    assert main(["--jobs", str(empty)]) == 2
    assert "'jobs' is empty" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    out = tmp_path / "s.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "scheduling", "plan", "--jobs", str(EXAMPLE), "-o", str(out),
                        "--milp-time-limit", "0", "--no-baselines"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Schedule.load(out).microbatches


def test_unwritable_outputs_fail_before_planning(tmp_path, capsys):
    missing = tmp_path / "no_such_dir" / "s.json"
    assert main(["--jobs", str(EXAMPLE), "-o", str(missing), "--milp-time-limit", "0"]) == 2
    err = capsys.readouterr().err
    assert f"-o/--output {str(missing)!r}: folder" in err and "does not exist" in err
    assert main(["--jobs", str(EXAMPLE), "--metrics-json", str(tmp_path), "--milp-time-limit", "0"]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    assert main(["--jobs", str(EXAMPLE), "--seed", "-3"]) == 2
    assert "--seed must be a non-negative integer, got -3" in capsys.readouterr().err


def test_benchmark_plans_a_jobs_file_at_its_own_capacity(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("planner_bench", ROOT / "benchmarks" / "planner.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    f = tmp_path / "small.yaml"
    f.write_text("capacity: 1024\npad_multiple: 64\nstages: 2\njobs:\n"
                 "  - {adapter: a, lengths: [300, 500, 200, 700], global_batch_size: 2}\n"
                 "  - {adapter: b, lengths: [100, 900, 400], global_batch_size: 3}\n")
    rows = bench.run_file(str(f), None, 0.0, False)
    assert [r["capacity"] for r in rows] == [1024]
    rows = bench.run_file(str(f), [2048], 0.0, True)
    assert [r["capacity"] for r in rows] == [2048]
    ceiling, ideal = rows[0]["ceiling"], rows[0]["ideal"]  # the ideal with the padding no schedule avoids
    assert ceiling["least_padding_proven"] and 0 < ceiling["least_padding"] <= ceiling["plan_padding"]
    assert ceiling["time"] >= ideal["time"] and ceiling["vs_a"] <= ideal["vs_a"]
    f.write_text("jobs:\n  - {adapter: a, lengths: [300], global_batch_size: 1}\n")
    with pytest.raises(ValueError, match="sets no capacity: pass --capacities"):
        bench.run_file(str(f), None, 0.0, False)


def test_verify_checks_a_written_or_hand_edited_schedule(tmp_path, capsys):
    """--verify: a schedule the planner wrote verifies and gets the same simulated metrics as when it was planned;
    one edited by hand (a sample swapped for another, a microbatch over the capacity) prints each violation and
    exits 1; an unreadable or malformed file, or -o with --verify, exits 2 naming it."""
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text("capacity: 1024\npad_multiple: 128\nstages: 2\njobs:\n"
                         "  - {adapter: a, global_batch_size: 3, num_global_batches: 2,"
                         " distribution: {median: 200, sigma: 0.5, max: 1024}}\n"
                         "  - {adapter: b, global_batch_size: 2, lengths: [300, 500, 120, 90]}\n")
    out, m1, m2 = tmp_path / "s.json", tmp_path / "m1.json", tmp_path / "m2.json"
    assert main(["plan", "--jobs", str(jobs_file), "-o", str(out), "--metrics-json", str(m1)]) == 0
    capsys.readouterr()
    assert main(["plan", "--jobs", str(jobs_file), "--verify", str(out), "--metrics-json", str(m2)]) == 0
    text = capsys.readouterr().out
    assert f"{out} verifies" in text
    planned, verified = json.loads(m1.read_text()), json.loads(m2.read_text())
    assert verified["schedule"] == planned["plan"] and verified["verified"] == str(out)
    assert verified["a: sequential FFD"] == planned["a: sequential FFD"]

    d = json.loads(out.read_text())
    first = d["microbatches"][0]["segments"][0]
    first["samples"][0] = 99  # a sample the job does not have
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    assert main(["plan", "--jobs", str(jobs_file), "--verify", str(bad)]) == 1
    text = capsys.readouterr().out
    assert "violation(s) of the packing rules" in text and "[coverage]" in text and "foreign samples [99]" in text
    # checked against the capacity given, not the one the schedule claims
    assert main(["plan", "--jobs", str(jobs_file), "--verify", str(out), "--capacity", "256"]) == 1
    text = capsys.readouterr().out
    assert "[params] schedule capacity 1024 != expected 256" in text and "[capacity]" in text

    for argv, msg in [(["--verify", str(tmp_path / "none.json")], "cannot read it"),
                      (["--verify", str(jobs_file)], "--verify"),
                      (["--verify", str(out), "-o", str(tmp_path / "x.json")], "drop -o/--output")]:
        assert main(["plan", "--jobs", str(jobs_file), *argv]) == 2
        assert msg in capsys.readouterr().err
