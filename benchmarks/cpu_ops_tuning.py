"""Times the C++ CPU composite ops (forward + backward) against the frozen base linear (x @ W.T under autograd,
W frozen, x requiring grad) and prints the ratio; the block size is set by LORAFUSION_CPU_BLOCK_ROWS.

    python benchmarks/cpu_ops_tuning.py [--tokens 2048] [--shapes 1024x1024,1024x2816] [--blocks 128,256,512]
                                        [--threads 1] [--p 0.1] [--r 16]

Each block size runs in a fresh process (the C++ side reads the variable once). Prints a table; writes JSON to
$OUT/cpu_ops_tuning.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(tokens: int, fin: int, fout: int, r: int, p: float, reps: int, threads: int) -> dict:
    import torch

    import lorafusion._ext  # noqa: F401

    if threads > 0:
        torch.set_num_threads(threads)
    # On a shared machine the best of interleaved runs is the least disturbed estimate; with one thread, process CPU
    # time is steadier still.
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter

    torch.manual_seed(0)
    x = torch.randn(tokens, fin, requires_grad=True)
    W = torch.randn(fout, fin) / fin**0.5
    b = torch.randn(fout)
    A = torch.randn(r, fin) / fin**0.5
    B = torch.randn(fout, r) / r
    dy = torch.randn(tokens, fout)
    ops = torch.ops.lorafusion

    def base():
        y = torch.nn.functional.linear(x, W, b)
        y.backward(dy)

    def fused():
        y, S = ops.lora_linear_forward(x.detach(), W, b, A, B, 2.0, 1234, p)
        ops.lora_linear_backward(dy, x.detach(), W, A, B, S, 2.0, 1234, p, True)

    best = {"base": float("inf"), "fused": float("inf")}
    for _ in range(2):
        base(), fused()
    for _ in range(reps):  # interleaved, so background load hits both alike
        for name, fn in (("base", base), ("fused", fused)):
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return {"tokens": tokens, "in": fin, "out": fout, "r": r, "p": p, "threads": torch.get_num_threads(),
            "base_s": best["base"], "fused_s": best["fused"], "ratio": best["fused"] / best["base"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--shapes", default="1024x1024,1024x2816")
    ap.add_argument("--blocks", default="256")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.child:
        rows = [measure(args.tokens, i, o, args.r, args.p, args.reps, args.threads) for i, o in shapes]
        print(json.dumps(rows))
        return
    results = []
    for blk in args.blocks.split(","):
        env = dict(os.environ, LORAFUSION_CPU_BLOCK_ROWS=blk)
        cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--shapes", args.shapes,
               "--r", str(args.r), "--p", str(args.p), "--reps", str(args.reps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        for row in json.loads(out.strip().splitlines()[-1]):
            row["block_rows"] = int(blk)
            results.append(row)
    print(f"{'block':>6} {'thr':>3} {'tokens':>7} {'in->out':>11} {'base ms':>9} {'fused ms':>9} {'ratio':>7}")
    for row in results:
        print(f"{row['block_rows']:>6} {row['threads']:>3} {row['tokens']:>7} {row['in']:>5}->{row['out']:<5} {row['base_s']*1e3:>9.2f}"
              f" {row['fused_s']*1e3:>9.2f} {row['ratio']:>7.3f}")
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "cpu_ops_tuning.json"), "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
