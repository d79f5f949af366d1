"""Shared by the pipeline tests: a random 3-layer Llama, three jobs on fresh random data, and torchrun."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

LETTERS = "abcdefghijklABCDEFGHIJKL"
TORCHRUN = shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
# every linear, the output head too ("long" adapts it: only the last stage holds it)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def tiny_llama(folder, layers: int, seed: int, tied: bool = False):
    """A random Llama of ``layers`` decoder layers over the built-in character tokenizer, saved in ``folder``
    (``tied``: its output head shares the token embedding's weight)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafusion.train.presets import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_model3(folder, tied: bool = False):
    """A random 3-layer Llama (an uneven split over 2 stages), drawn afresh."""
    return tiny_llama(folder, 3, int.from_bytes(os.urandom(4), "little"), tied)


def records(rng, n, lo, hi):
    out = []
    for _ in range(n):
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
        out.append({"prompt": s + "=", "completion": s[::-1].swapcase()})
    return out


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def greedy_records(model, rng, n, max_new):
    """Eval records whose completions are the base model's own greedy continuations (transformers' generate): the
    untrained adapters (B = 0) score exact match 1.0 on them, so the pipeline's greedy decoding must reproduce them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64)
    out = []
    for r in records(rng, 50 * n, 2, 4):
        ids = tok(r["prompt"])["input_ids"]
        gen = base.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=max_new,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id)]
        text = tok.decode(gen, skip_special_tokens=True)
        if text.strip():  # a record needs a completion (an immediate EOS gives none)
            out.append({"prompt": r["prompt"], "completion": text})
        if len(out) == n:
            return out
    raise AssertionError(f"the random model ended {50 * n - len(out)} of {50 * n} prompts at once")


def jobs(tmp_path, model, dropout=0.0):
    """Three jobs on fresh random data; "tail" adapts only the last layer's linears (no parameter on stage 0), "long"
    the output head too."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    return [
        {"adapter": "short", "data": write(tmp_path / "a.jsonl", records(rng, 11, 2, 5)),
         "global_batch_size": 4, "epochs": 2, "r": 4, "alpha": 8, "lr": 5e-3, "dropout": dropout,
         "eval_data": write(tmp_path / "ev.jsonl", greedy_records(model, rng, 5, 6)), "max_new_tokens": 6},
        {"adapter": "long", "data": write(tmp_path / "b.jsonl", records(rng, 9, 8, 14)),
         "global_batch_size": 3, "num_global_batches": 3, "r": 8, "alpha": 8, "lr": 3e-3, "use_rslora": True,
         "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"], "weight_decay": 0.1, "schedule": "linear",
         "warmup_steps": 1, "min_lr_ratio": 0.2, "max_grad_norm": 0.05},
        {"adapter": "tail", "data": write(tmp_path / "c.jsonl", records(rng, 7, 3, 12)),
         "global_batch_size": 5, "num_global_batches": 2, "r": 2, "alpha": 6, "lr": 1e-2, "betas": [0.8, 0.95],
         "eps": 1e-6, "max_grad_norm": 1e-3, "target_modules": ["layers.2.mlp.down_proj", "layers.2.self_attn.o_proj"]},
    ]


def config(tmp_path, model, jobs, name, **top):
    cfg = {"model": model, "output_dir": str(tmp_path / name), "capacity": 64, "pad_multiple": 4, "stages": 2,
           "save_every": 0, "precision": "fp64", "jobs": jobs, "target_modules": LINEARS, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def torchrun(nproc, config, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "lorafusion", "cotrain",
                           "--config", config, *extra], capture_output=True, text=True, env=env, timeout=600)


def adapters(out):
    folder = os.path.join(out, "adapters")
    return {a: load_file(os.path.join(folder, a, "adapter_model.safetensors")) for a in sorted(os.listdir(folder))}


def metrics(out):
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {(r["adapter"], r["global_batch"]): r for r in lines}, len(lines)
