"""Pipeline-parallel co-training (``scheduling.pipeline``): ``torchrun --nproc_per_node S -m lorafusion cotrain``
with the decoder layers split over S CPU processes (gloo) ends with the adapters, per-step losses, gradient norms,
learning rates and evals of the one-process executor on the same plan (which test_executor checks against PEFT)."""
import json
import os

import pytest
import torch
import pipeline_helpers as ph

from scheduling.executor import CoTrainer, load_cotrain_config
from scheduling.pipeline import split_layers


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    return ph.make_model3(tmp_path_factory.mktemp("tiny3"))


@pytest.fixture(scope="module")
def model3_tied(tmp_path_factory):
    """The output head tied to the embedding: the last stage (not the first) reads the embedding for it."""
    return ph.make_model3(tmp_path_factory.mktemp("tiny3t"), tied=True)


def _exercising(sched, stages) -> bool:
    """The plan exercises what the pipeline has to get right: shared microbatches, and a global batch starting
    exactly ``stages`` positions after the previous step of its adapter (the tightest the 1F1B order allows)."""
    gaps = [min(sched.microbatches.index(m) for m in sched.microbatches if not m.is_noop and any(
        s.adapter == a and s.global_batch == g + 1 for s in m.segments)) - i
        for a, idx in sched.optimizer_steps.items() for g, i in enumerate(idx[:-1])]
    return any(len(m.segments) > 1 for m in sched.microbatches) and min(gaps) == stages


@ph.needs_torchrun
@pytest.mark.parametrize("stages,model", [(2, "model3_tied"), (3, "model3")])
def test_pipeline_stages_end_where_one_process_does(tmp_path, request, stages, model):
    model3 = request.getfixturevalue(model)
    for _ in range(8):  # fresh random data until its plan exercises the pipeline (most first draws do)
        jobs = ph.jobs(tmp_path, model3)
        one = load_cotrain_config(ph.config(tmp_path, model3, jobs, "one", stages=stages))
        trainer = CoTrainer(one)
        trainer.setup()
        if _exercising(trainer.schedule, stages):
            break
    else:
        pytest.fail("8 random draws gave no plan with shared microbatches and a tight step")
    trainer = CoTrainer(one)
    want = trainer.run()

    res = ph.torchrun(stages, ph.config(tmp_path, model3, jobs, "pipe", stages=stages))
    assert res.returncode == 0, res.stderr[-3000:]
    out = str(tmp_path / "pipe")
    got = json.load(open(os.path.join(out, "summary.json")))
    assert got["pipeline"]["processes"] == stages
    assert got["pipeline"]["layers"] == [[r.start, r.stop] for r in split_layers(3, stages)]
    assert len(got["pipeline"]["peak_memory_mb"]) == stages and min(got["pipeline"]["peak_memory_mb"]) > 0
    assert res.stdout.count("lorafusion cotrain: 3 jobs") == 1, res.stdout  # the last stage reports, once
    a, b = ph.adapters(one.output_dir), ph.adapters(out)
    assert a.keys() == b.keys() == {"long", "short", "tail"}
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            torch.testing.assert_close(b[name][k], a[name][k], rtol=1e-9, atol=1e-12, msg=f"{name} {k}")
    # the PEFT configs (target_modules over the whole model) too
    for name in a:
        cfg = [json.load(open(os.path.join(d, "adapters", name, "adapter_config.json"))) for d in (one.output_dir, out)]
        assert sorted(cfg[0]["target_modules"]) == sorted(cfg[1]["target_modules"]), name
    ma, na = ph.metrics(one.output_dir)
    mb, nb = ph.metrics(out)
    assert na == nb == len(ma) == len(mb)
    for key, rec in ma.items():
        for field in ("loss", "grad_norm", "lr"):
            assert mb[key][field] == pytest.approx(rec[field], rel=1e-9), (key, field)
        assert mb[key]["after_microbatch"] == rec["after_microbatch"]
    assert want["jobs"]["short"]["eval_before"]["eval_exact_match"] == 1.0  # the records are its greedy outputs
    for when in ("eval_before", "eval_after"):
        e1, e2 = want["jobs"]["short"][when], got["jobs"]["short"][when]
        assert e2["eval_loss"] == pytest.approx(e1["eval_loss"], rel=1e-9)
        assert e2["eval_exact_match"] == e1["eval_exact_match"]
    assert got["tokens"] == want["tokens"] and got["microbatches"] == want["microbatches"]
