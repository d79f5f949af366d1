"""Tokens/s and peak memory of a short `lorafusion train` run: fused LoRA layers against PEFT's own layers.

Same model, data, seed and config in both rows; each run is its own process (so peak memory is its own);
tokens/s is the median over steps after a warm-up, then the median over `--repeats` alternating runs. The ratio is fused / PEFT from the same invocation.

    python benchmarks/train_throughput.py                       # CPU: the built-in tiny Llama
    python benchmarks/train_throughput.py --steps 40 -- --data.max_length 64 --lora.r 32
Writes $OUT/train_throughput.json when $OUT is set, else --out (benchmarks/results/train_throughput.json, beside
the other benchmarks' results). GPU rows when CUDA is available (device auto).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(fused: bool, steps: int, extra: list[str], workdir: str, rep: int = 0) -> dict:
    out = os.path.join(workdir, f"{'fused' if fused else 'peft'}-{rep}")
    cmd = [sys.executable, "-m", "lorafusion", "train", "--config", os.path.join(ROOT, "configs", "default.yaml"),
           "--train.max_steps", str(steps), "--train.eval_every", "0", "--train.save_every", "0",
           "--train.generate_eval", "false", "--train.plot", "false", "--data.max_eval_samples", "8",
           "--lora.fused", "true" if fused else "false", "--train.output_dir", out, *extra]
    env = dict(os.environ, LORAFUSION_NO_PROGRESS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({'fused' if fused else 'peft'}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        per_step = [json.loads(line)["tokens_per_s"] for line in fh if '"loss"' in line]
    warm = per_step[min(len(per_step) - 1, max(1, len(per_step) // 5)):]
    return {"layers": "lorafusion (fused)" if fused else "peft", "device": summary["device"],
            "fused_layers": summary["fused_layers"], "tokens_per_s_median": statistics.median(warm),
            "tokens_per_s_overall": summary["tokens_per_s"], "peak_memory_mb": summary["peak_memory_mb"],
            "final_train_loss": summary["final_train_loss"], "steps": summary["step"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per row (a shared CPU is noisy)")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json", help="the JSON ($OUT wins if set)")
    ap.add_argument("extra", nargs="*", help="config overrides after --, e.g. -- --lora.r 32")
    args = ap.parse_args()
    runs: dict = {False: [], True: []}
    with tempfile.TemporaryDirectory() as work:
        for rep in range(args.repeats):  # alternate so that load changes hit both rows alike
            for fused in ((False, True) if rep % 2 == 0 else (True, False)):
                runs[fused].append(run(fused, args.steps, args.extra, work, rep))
    rows = []
    for fused in (False, True):
        row = dict(runs[fused][0])
        row["tokens_per_s_runs"] = [r["tokens_per_s_median"] for r in runs[fused]]
        row["tokens_per_s_median"] = statistics.median(row["tokens_per_s_runs"])
        row["peak_memory_mb"] = statistics.median(r["peak_memory_mb"] for r in runs[fused])
        rows.append(row)
    ratio = rows[1]["tokens_per_s_median"] / rows[0]["tokens_per_s_median"]
    print(f"{'layers':<20} {'device':<8} {'tokens/s (median)':>18} {'peak MiB':>9} {'final loss':>11}")
    for r in rows:
        print(f"{r['layers']:<20} {r['device']:<8} {r['tokens_per_s_median']:>18.0f} {r['peak_memory_mb']:>9.0f} "
              f"{r['final_train_loss']:>11.4f}")
    print(f"fused / peft tokens/s: {ratio:.2f}x; same final loss: "
          f"{abs(rows[0]['final_train_loss'] - rows[1]['final_train_loss']) < 1e-3}")
    out = os.path.join(os.environ["OUT"], "train_throughput.json") if os.environ.get("OUT") else args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"rows": rows, "ratio_fused_over_peft": ratio, "steps": args.steps, "repeats": args.repeats,
                   "extra": args.extra}, fh,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
