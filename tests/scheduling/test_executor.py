"""The co-training executor (``scheduling.executor``, ``lorafusion cotrain``): every job's adapter co-trained over
one base model from a plan equals that job trained alone with PEFT on the same global batches (float64), a killed run
resumes to the uninterrupted adapters, and bad input is a one-line error naming the key and the value."""
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from scheduling.executor import CoTrainer, CoTrainError, load_cotrain_config, pack_microbatch

LETTERS = "abcdefghijklABCDEFGHIJKL"


def _records(rng, n, lo, hi, text_share=0.0):
    out = []
    for _ in range(n):
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
        if rng.random() < text_share:
            out.append({"text": s + s[::-1]})
        else:
            out.append({"prompt": s + "=", "completion": s[::-1].swapcase()})
    return out


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(tmp_path, tiny_model, jobs, **top):
    cfg = {"model": tiny_model, "output_dir": str(tmp_path / "run"), "capacity": 64, "pad_multiple": 4,
           "stages": 2, "save_every": 0, "precision": "fp64", "jobs": jobs, **top}
    path = tmp_path / "cotrain.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


@pytest.fixture
def three_jobs(tmp_path):
    """Three jobs with different lengths, batch sizes, LoRA targets and optimizer settings, on fresh random data."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    return [
        {"adapter": "short", "data": _write(tmp_path / "a.jsonl", _records(rng, 11, 2, 5, text_share=0.3)),
         "global_batch_size": 4, "epochs": 2, "r": 4, "alpha": 8, "lr": 5e-3},
        {"adapter": "long", "data": _write(tmp_path / "b.jsonl", _records(rng, 9, 8, 14)),
         "global_batch_size": 3, "num_global_batches": 3, "r": 8, "alpha": 8, "lr": 3e-3, "use_rslora": True,
         "target_modules": ["q_proj", "v_proj", "down_proj"], "weight_decay": 0.1, "schedule": "linear",
         "warmup_steps": 1, "min_lr_ratio": 0.2, "max_grad_norm": 0.05},
        {"adapter": "mixed", "data": _write(tmp_path / "c.jsonl", _records(rng, 7, 3, 12)),
         "global_batch_size": 5, "num_global_batches": 2, "r": 2, "alpha": 6, "lr": 1e-2, "betas": [0.8, 0.95],
         "eps": 1e-6},
    ]


def _lr_factor(job, step, total):
    """The job's learning-rate factor at optimizer step ``step``, written out here from the documented schedule."""
    w = job.get("warmup_steps", 0)
    if w and step < w:
        return (step + 1) / w
    kind = job.get("schedule", "constant")
    if kind == "constant":
        return 1.0
    frac = min(1.0, (step - w) / max(1, total - w))
    decay = 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    m = job.get("min_lr_ratio", 0.1)
    return m + (1 - m) * decay


def _peft_alone(tiny_model, job, init_folder, tokenized):
    """Job ``job`` trained alone: PEFT over a fresh float64 base, each global batch's samples run one by one,
    unpacked, the loss their mean token cross-entropy, AdamW and the job's schedule applied by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    model = PeftModel.from_pretrained(base, init_folder, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = job["lr"]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(job.get("betas", (0.9, 0.999))), eps=job.get("eps", 1e-8),
                            weight_decay=job.get("weight_decay", 0.0))
    total = tokenized.job.num_global_batches
    for g in range(total):
        samples = tokenized.job.global_batch_samples(g)
        n_tok = sum(sum(1 for t in tokenized.targets[s] if t != -100) for s in samples)
        for s in samples:
            logits = model(input_ids=torch.tensor([tokenized.ids[s]])).logits[0]
            loss = F.cross_entropy(logits, torch.tensor(tokenized.targets[s]), ignore_index=-100, reduction="sum")
            (loss / n_tok).backward()
        if job.get("max_grad_norm", 0):
            torch.nn.utils.clip_grad_norm_(params, job["max_grad_norm"])
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(job, g, total)
        opt.step()
        opt.zero_grad()
    return {k.replace(".default", ""): v.detach() for k, v in model.state_dict().items() if "lora_" in k}


def test_cotrained_adapters_equal_each_job_trained_alone_with_peft(tmp_path, tiny_model, three_jobs):
    cfg = load_cotrain_config(_config(tmp_path, tiny_model, three_jobs))
    # the initial adapters (the executor seeds them): a second executor's set-up, saved as PEFT folders
    from lorafusion.multi.io import save_adapter

    first = CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs)))
    first.setup()
    inits = {}
    for j in three_jobs:
        inits[j["adapter"]] = str(tmp_path / "init" / j["adapter"])
        save_adapter(first.mm, j["adapter"], inits[j["adapter"]])
    sched = first.schedule
    assert any(len(m.segments) > 1 for m in sched.microbatches), "no microbatch mixes jobs: the test shows nothing"
    assert any(m.padded_tokens > m.real_tokens for m in sched.microbatches), "no padding exercised"

    summary = CoTrainer(cfg).run()
    assert set(summary["jobs"]) == {"short", "long", "mixed"}
    for j in three_jobs:
        name = j["adapter"]
        got = load_file(os.path.join(cfg.output_dir, "adapters", name, "adapter_model.safetensors"))
        want = _peft_alone(tiny_model, j, inits[name], first.data[name])
        assert set(got) == set(want), name
        init = load_file(os.path.join(inits[name], "adapter_model.safetensors"))
        for k in want:
            assert not torch.equal(init[k], got[k]), f"{name} {k} never moved"
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11, msg=f"{name} {k}")
    lines = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert all(r["grad_norm"] > 0 for r in lines)
    assert sorted((r["adapter"], r["global_batch"]) for r in lines) == sorted(
        (j["adapter"], g) for j in three_jobs for g in range(first.data[j["adapter"]].job.num_global_batches))


def test_a_packed_microbatch_keeps_samples_apart(tmp_path, tiny_model, three_jobs):
    """Each sample's logits in a packed row equal its logits alone (position ids restart per sample), and the
    padding tokens carry no loss."""
    ct = CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs)))
    ct.setup()
    mb = max(ct.schedule.microbatches, key=lambda m: sum(len(s.samples) for s in m.segments))
    ids, pos, tgt, rows, spans = pack_microbatch(mb, ct.data, ct.pad_id)
    assert len(ids) == mb.padded_tokens == len(rows) and sum(1 for t in tgt if t != -100) == sum(
        ct.data[s.adapter].loss_tokens(s.samples) for s in mb.segments)
    with torch.no_grad(), ct.mm.use_segments(ct.mm.make_segments(rows)):
        packed = ct.mm.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), use_cache=False).logits[0]
    at = 0
    for seg in mb.segments:
        for s in seg.samples:
            x = ct.data[seg.adapter].ids[s]
            with torch.no_grad(), ct.mm.use_segments(ct.mm.make_segments([seg.adapter] * len(x))):
                alone = ct.mm.model(input_ids=torch.tensor([x]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[at:at + len(x)], alone, rtol=1e-10, atol=1e-10)
            at += len(x)
        at += seg.padded_tokens - seg.real_tokens


def _adapters(out):
    return {n: load_file(os.path.join(out, "adapters", n, "adapter_model.safetensors"))
            for n in sorted(os.listdir(os.path.join(out, "adapters")))}


@pytest.mark.parametrize("how", ["stopped", "crashed"])
def test_resume_continues_to_the_uninterrupted_adapters(tmp_path, tiny_model, three_jobs, how, monkeypatch):
    """With dropout on (its masks come from the checkpointed RNG) and global batches in flight at the cut (their
    gradients are checkpointed): a run stopped after some microbatches, or crashed past its last checkpoint,
    resumes to exactly the adapters, and the metrics lines, of a run never interrupted."""
    for j in three_jobs:
        j["dropout"] = 0.1
    # one stage: no no-op slots, so the crash below comes exactly one microbatch past the checkpoint
    ref_cfg = load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, precision="fp32", stages=1,
                                          output_dir=str(tmp_path / "ref")))
    CoTrainer(ref_cfg).run()
    probe = CoTrainer(ref_cfg)
    probe.setup()
    spans = probe.schedule.positions().values()
    # a checkpoint after microbatch k with a global batch in flight (begun before k, ended after)
    k = min(k for k in range(2, len(probe.schedule.microbatches)) if any(p[0] < k <= p[-1] for p in spans))
    cfg = load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, precision="fp32", stages=1, save_every=k))
    cut = k if how == "stopped" else k + 1  # crashed: one microbatch past the checkpoint is lost and redone
    if how == "stopped":
        assert CoTrainer(cfg).run(stop_after=cut) == {"stopped": "stop_after", "next_microbatch": cut}
    else:
        real = CoTrainer._microbatch
        calls = {"n": 0}

        def dies(self, mb, inflight):
            calls["n"] += 1
            if calls["n"] > cut:
                raise RuntimeError("killed")
            return real(self, mb, inflight)

        monkeypatch.setattr(CoTrainer, "_microbatch", dies)
        with pytest.raises(RuntimeError, match="killed"):
            CoTrainer(cfg).run()
        monkeypatch.setattr(CoTrainer, "_microbatch", real)
    state = json.load(open(os.path.join(cfg.output_dir, "checkpoints", open(
        os.path.join(cfg.output_dir, "checkpoints", "latest")).read().strip(), "cotrain_state.json")))
    assert state["inflight_loss"], "no global batch was in flight at the checkpoint: the test shows less"
    with pytest.raises(CoTrainError, match="holds an earlier co-training run; pass --resume"):
        CoTrainer(cfg).run()
    CoTrainer(cfg).run(resume=True)
    got, want = _adapters(cfg.output_dir), _adapters(ref_cfg.output_dir)
    assert set(got) == set(want) == {"short", "long", "mixed"}
    for name in want:
        for k in want[name]:
            assert torch.equal(got[name][k], want[name][k]), (name, k)
    lines = lambda out: [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]  # noqa: E731
    assert lines(cfg.output_dir) == lines(ref_cfg.output_dir)


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, tiny_model, three_jobs):
    from lorafusion.train.config import ConfigError

    cfg = load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, precision="fp32"))
    CoTrainer(cfg).run(stop_after=2)
    three_jobs[1]["r"] = 16
    changed = load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, precision="fp32", capacity=96,
                                          save_every=5))
    with pytest.raises(ConfigError, match=r"--resume: capacity, jobs differ"):
        CoTrainer(changed).run(resume=True)


@pytest.mark.parametrize("edit, message", [
    ({"capacity": 0}, "capacity: must be a positive integer (got 0)"),
    ({"pad_multiple": 128}, "pad_multiple: must not exceed capacity 64 (got 128)"),
    ({"precision": "fp8"}, "precision: must be one of fp32, fp64, bf16 (got 'fp8')"),
    ({"colour": 1}, "unknown config key 'colour'"),
    ({"backend": "gpu"}, "backend: backend='gpu' is not one of"),
    ({"jobs": []}, "jobs: a non-empty list of jobs is needed (got [])"),
    ({"job0": {"r": 0}}, "jobs[0] (short).r: must be in [1, 256] (got 0)"),
    ({"job0": {"dropout": 1.0}}, "jobs[0] (short).dropout: must be in [0, 1) (got 1.0)"),
    ({"job0": {"lr": "fast"}}, "jobs[0].lr: expected float, got str ('fast')"),
    ({"job0": {"schedule": "step"}}, "jobs[0] (short).schedule: must be one of cosine, linear, constant (got 'step')"),
    ({"job0": {"epochs": 2, "num_global_batches": 3}}, "jobs[0] (short).epochs: give num_global_batches or epochs"),
    ({"job1": {"adapter": "short"}}, "jobs[1].adapter: is the name of an earlier job too (got 'short')"),
    ({"job0": {"adapter": "a.b"}}, "jobs[0].adapter:"),
    ({"job0": {"betas": [0.9]}}, "jobs[0] (short).betas: must be two numbers in [0, 1) (got [0.9])"),
])
def test_bad_config_is_one_error_naming_key_and_value(tmp_path, tiny_model, three_jobs, edit, message):
    from lorafusion.train.config import ConfigError

    top = {k: v for k, v in edit.items() if k == "jobs" or not k.startswith("job")}
    for k, v in edit.items():
        if k.startswith("job") and k != "jobs":
            three_jobs[int(k[3:])].update(v)
    path = _config(tmp_path, tiny_model, top.pop("jobs", three_jobs), **top)
    with pytest.raises(ConfigError) as exc:
        load_cotrain_config(path)
    assert message in str(exc.value)


def test_bad_data_names_the_job_file_and_line(tmp_path, tiny_model, three_jobs):
    long_path = tmp_path / "long.jsonl"
    _write(long_path, [{"prompt": "ab=", "completion": "BA"}, {"prompt": "a" * 80 + "=", "completion": "b"}])
    three_jobs[2]["data"] = str(long_path)
    with pytest.raises(CoTrainError, match=rf"jobs\[2\] \(mixed\)\.data: {long_path} line 2 has 84 tokens, more "
                                           r"than the 64 a microbatch holds \(capacity 64\)"):
        CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs))).run()
    # a sample that fits the capacity but not once padded (capacity 66 holds 64 tokens in multiples of 4)
    _write(long_path, [{"prompt": "ab=", "completion": "BA"}, {"prompt": "a" * 60 + "=", "completion": "bcd"}])
    with pytest.raises(CoTrainError, match=r"line 2 has 66 tokens, more than the 64 tokens a microbatch holds once "
                                           r"padded \(capacity 66, pad_multiple 4\)"):
        CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, capacity=66,
                                              output_dir=str(tmp_path / "r1")))).run()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab=", "completion": "BA"}\n{"prompt": 3}\n')
    three_jobs[2]["data"] = str(bad)
    with pytest.raises(CoTrainError, match=rf"jobs\[2\] \(mixed\)\.data: {bad} line 2: "):
        CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, output_dir=str(tmp_path / "r2")))).run()
    three_jobs[2]["data"] = "builtin:lowercase:evl"
    with pytest.raises(CoTrainError, match=r"jobs\[2\] \(mixed\)\.data: 'builtin:lowercase:evl' names no split of "
                                           r"builtin:lowercase \(train or eval\)"):
        CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, output_dir=str(tmp_path / "r4")))).run()
    three_jobs[2]["data"] = three_jobs[0]["data"]
    three_jobs[2]["global_batch_size"] = 12
    with pytest.raises(CoTrainError, match=r"jobs\[2\] \(mixed\)\.global_batch_size: 12 is more than the 11 "
                                           r"samples of "):
        CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, output_dir=str(tmp_path / "r5")))).run()
    three_jobs[2]["global_batch_size"] = 5
    with pytest.raises(CoTrainError, match=r"^backend: multi-adapter backend 'cuda' was requested but is unavailable"):
        CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, output_dir=str(tmp_path / "r6"),
                                              backend="cuda"))).run()
    assert not os.path.exists(tmp_path / "r6" / "cotrain_config.json")  # refused before the run was recorded
    three_jobs[2]["data"] = "missing.jsonl"
    with pytest.raises(CoTrainError, match=r"jobs\[2\] \(mixed\)\.data: .*missing.jsonl is not a file"):
        CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, output_dir=str(tmp_path / "r3")))).run()


def test_cli_runs_the_jobs_and_reports_errors_in_one_line(tmp_path, tiny_model, three_jobs, capsys):
    from lorafusion.cli import main

    three_jobs[2].update(eval_data=three_jobs[2]["data"], max_eval_samples=5, max_new_tokens=6)
    path = _config(tmp_path, tiny_model, three_jobs, precision="fp32")
    assert main(["cotrain", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "lorafusion cotrain: 3 jobs" in out and "short:" in out and "long:" in out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapters" / "long"))  # plain PEFT loads it
    # the eval of job "mixed", redone with plain PEFT on its saved adapter: loss sample by sample, greedy decoding
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      str(tmp_path / "run" / "adapters" / "mixed")).eval()
    records = [json.loads(x) for x in open(three_jobs[2]["data"])][:5]
    total, count, hits = 0.0, 0, 0
    from lorafusion.train.data import record_tokens

    with torch.no_grad():
        for r in records:
            ids, labels = record_tokens(r, tok)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            t = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits.double(), t, ignore_index=-100, reduction="sum"))
            count += int((t != -100).sum())
            p = tok(r["prompt"])["input_ids"]
            gen = model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
            gen = gen[:gen.index(tok.eos_token_id)] if tok.eos_token_id in gen else gen
            hits += tok.decode(gen, skip_special_tokens=True).strip() == r["completion"].strip()
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    got = summary["jobs"]["mixed"]["eval_after"]
    assert got["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["eval_exact_match"] == hits / 5
    assert summary["jobs"]["mixed"]["eval_before"]["eval_loss"] > got["eval_loss"]
    assert summary["jobs"]["short"]["eval_after"] is None
    assert main(["cotrain", "--config", path]) == 2
    assert "holds an earlier co-training run; pass --resume" in capsys.readouterr().err
    three_jobs[0]["r"] = -1
    assert main(["cotrain", "--config", _config(tmp_path, tiny_model, three_jobs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafusion cotrain: config error: jobs[0] (short).r") and "Traceback" not in err


def test_a_model_whose_attention_ignores_packed_position_ids_is_refused(tmp_path, three_jobs):
    """Bloom's ALiBi attention takes no position ids: packed samples would attend to each other (its logits moved by
    ~2e-3 in a reviewer's run, and the run trained without a word)."""
    from transformers import BloomConfig, BloomForCausalLM

    from lorafusion.train.presets import build_tokenizer

    tok = build_tokenizer()
    folder = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=32, hidden_size=32, n_layer=2, n_head=4, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    three_jobs[1].pop("target_modules")  # Llama's module names
    with pytest.raises(CoTrainError, match=r"\(BloomForCausalLM\) lets packed samples attend to each other"):
        CoTrainer(load_cotrain_config(_config(tmp_path, str(folder), three_jobs, precision="fp32"))).run()


def test_resume_refuses_changed_data_of_the_same_lengths(tmp_path, tiny_model, three_jobs):
    cfg = load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, precision="fp32"))
    CoTrainer(cfg).run(stop_after=2)
    path = three_jobs[1]["data"]
    recs = [json.loads(x) for x in open(path)]
    _write(tmp_path / "b.jsonl", [{**r, "completion": r["completion"].swapcase()} for r in recs])
    with pytest.raises(CoTrainError, match=r"the data of job\(s\) long changed since it was written"):
        CoTrainer(cfg).run(resume=True)


def test_a_tokenizer_without_pad_token_pads_and_generates_with_eos(tmp_path, tiny_model, three_jobs):
    """Most Llama tokenizers have no pad token: the exact-match eval crashed on it (torch.full with None)."""
    import shutil

    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model, folder)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    job = {**three_jobs[2], "eval_data": three_jobs[2]["data"], "max_eval_samples": 3, "max_new_tokens": 4}
    summary = CoTrainer(load_cotrain_config(_config(tmp_path, str(folder), [job], precision="fp32"))).run()
    assert summary["jobs"]["mixed"]["eval_after"]["eval_exact_match"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_a_folder_of_another_run_is_refused_with_or_without_resume(tmp_path, tiny_model, three_jobs):
    """--resume in a lorafusion train folder (checkpoints, no cotrain_config.json) started afresh there, dropping
    that run's metrics and pruning its checkpoints."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000010").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    cfg = load_cotrain_config(_config(tmp_path, tiny_model, three_jobs, precision="fp32"))
    for resume in (False, True):
        with pytest.raises(CoTrainError, match="holds checkpoints or metrics"):
            CoTrainer(cfg).run(resume=resume)
    assert (out / "checkpoints" / "step-0000010").is_dir() and (out / "metrics.jsonl").read_text() == '{"step": 10}\n'


def test_a_jobs_initial_adapter_does_not_depend_on_its_batch_mates(tmp_path, tiny_model, three_jobs):
    together = CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, three_jobs)))
    together.setup()
    alone = CoTrainer(load_cotrain_config(_config(tmp_path, tiny_model, [three_jobs[2]])))
    alone.setup()
    a, b = together.mm.adapter_parameters("mixed"), alone.mm.adapter_parameters("mixed")
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(together.mm.adapter_parameters("short")[0][:2, :2],
                           together.mm.adapter_parameters("mixed")[0][:2, :2])
