"""LoRAM on the built-in default: prune builtin:tiny-llama at several ratios, train LoRA on the pruned model
(fp32 or NF4 base), recover the adapter, and score the full model with it. Prints a table, writes JSON.

    python benchmarks/loram.py [--steps 300] [--out benchmarks/results/loram.json]

Each row is ``loram run --config configs/default.yaml --keep-ratio K --attn-keep-ratio A [--model.quantization nf4]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LORAFUSION_NO_PROGRESS", "1")

ROWS = [  # (MLP keep ratio, KV-group keep ratio, importance, quantization)
    (1.0, 1.0, "magnitude", "none"),
    (0.5, 1.0, "taylor", "none"),
    (0.25, 1.0, "taylor", "none"),
    (0.25, 1.0, "magnitude", "none"),
    (0.25, 1.0, "taylor", "nf4"),
    (0.5, 0.5, "taylor", "none"),
]


def main() -> int:
    import logging

    from lorafusion.train import load_config
    from loram.pipeline import run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/loram.json")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    rows = []
    print(f"{'mlp':>5} {'kv':>5} {'importance':>10} {'base':>5} {'params':>8} {'pruned+ad EM':>12} "
          f"{'full+rec EM':>11} {'full+rec loss':>13} {'full alone loss':>15} {'s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (keep, attn, imp, quant) in enumerate(ROWS):
            cfg = load_config("configs/default.yaml", {"train": {"max_steps": args.steps},
                                                       "model": {"quantization": quant}})
            t0 = time.perf_counter()
            s = run(cfg, os.path.join(tmp, str(i)), keep_ratio=keep, attn_keep_ratio=attn, importance=imp,
                    calibration="train" if imp == "taylor" else None)
            secs = time.perf_counter() - t0
            p, pa, fr, fa = (s["prune"], s["pruned_model_with_adapter"], s["full_model_with_recovered_adapter"],
                             s["full_model"])
            frac = p["parameters_pruned"] / p["parameters_full"]
            print(f"{keep:>5} {attn:>5} {imp:>10} {quant:>5} {frac:>8.1%} {pa['eval_exact_match']:>12.1%} "
                  f"{fr['eval_exact_match']:>11.1%} {fr['eval_loss']:>13.4f} {fa['eval_loss']:>15.4f} {secs:>6.1f}",
                  flush=True)
            rows.append({"keep_ratio": keep, "attn_keep_ratio": attn, "importance": imp, "quantization": quant,
                         "parameters_full": p["parameters_full"], "parameters_pruned": p["parameters_pruned"],
                         "pruned_with_adapter": pa, "full_with_recovered_adapter": fr, "full_alone": fa,
                         "seconds": secs})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "steps": args.steps,
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
