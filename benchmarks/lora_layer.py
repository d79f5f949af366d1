"""Forward+backward time and saved activation memory of one LoRA linear layer.

Variants, all with a frozen base weight and an input that needs its gradient (a layer inside a model):
  base   the frozen nn.Linear alone (the floor)
  peft   PEFT's LoRA Linear with its defaults (nn.Dropout on the LoRA path, two nn.Linear adapters)
  eager  plain torch: F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B)
  fused  lorafusion.FusedLoRALinear (backend: auto, or --backend)
  fused-blas  (GPU, Triton backend) the same with LORAFUSION_TRITON_GEMM=blas: cuBLAS runs the two big GEMMs onto
         the rank-r term a Triton kernel stored first
Ratio = time / base time, measured in the same run. CPU: variants interleaved round by round, the median of the
per-round ratios; GPU: triton.testing.do_bench
(CUDA events, median). Saved memory = bytes of the tensors autograd keeps for backward, parameters excluded.

    python benchmarks/lora_layer.py                      # CPU shapes, fp32
    python benchmarks/lora_layer.py --device cuda        # GPU shapes, bf16, r = 16 and 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lorafusion  # noqa: E402
from lorafusion.backends import use_gemm_placement  # noqa: E402

CPU_SHAPES = [(2048, 1024, 1024), (2048, 1024, 2816)]
GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (4096, 8192, 8192), (16384, 4096, 4096)]


class _Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def build_variants(T, fin, fout, r, p, dtype, device, backend):
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, device=device, dtype=dtype).requires_grad_(False)
    A = nn.Parameter(torch.randn(r, fin, device=device, dtype=dtype) / fin**0.5)
    B = nn.Parameter(torch.randn(fout, r, device=device, dtype=dtype) / r**0.5)
    s = 2.0  # alpha = 2r
    variants = {"base": lambda x: base(x)}

    def eager(x):
        return F.linear(x, base.weight, base.bias) + s * F.linear(F.linear(F.dropout(x, p, True), A), B)

    variants["eager"] = eager
    try:
        from peft import LoraConfig, get_peft_model

        holder = _Holder(nn.Linear(fin, fout, device=device, dtype=dtype))
        holder.lin.weight.data.copy_(base.weight)
        holder.lin.bias.data.copy_(base.bias)
        pm = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["lin"]))
        pm.train()
        variants["peft"] = lambda x: pm(x)
    except ImportError:
        pass
    fused = lorafusion.FusedLoRALinear(base, r=r, alpha=2 * r, dropout=p, backend=backend).train()
    fused.lora_A.data.copy_(A)
    fused.lora_B.data.copy_(B)
    variants["fused"] = lambda x: fused(x)
    if device == "cuda" and lorafusion.backends.get_backend("cuda", backend, "fused").NAME == "triton":
        # the Triton backend with cuBLAS running the two big GEMMs onto the stored rank-r term
        # (LORAFUSION_TRITON_GEMM=blas), against the Triton GEMMs with the term in the tile ("fused"), each
        # placement set explicitly whatever the environment says (the context manager as a decorator)
        variants["fused"] = use_gemm_placement("fused")(lambda x: fused(x))
        variants["fused-blas"] = use_gemm_placement("blas")(lambda x: fused(x))
    params = [base.weight, base.bias, A, B, fused.lora_A, fused.lora_B]
    if "peft" in variants:
        params += list(pm.parameters())
    return variants, {t.untyped_storage().data_ptr() for t in params}


def saved_bytes(fn, x, dy, param_ptrs):
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key[0] not in param_ptrs and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.backward(dy)
    return total


def time_fn(fn, x, dy, device, reps):
    def step():
        x.grad = None
        fn(x).backward(dy)

    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=100, rep=max(reps * 20, 200), return_mode="median")
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def warm_gpu(seconds: float = 1.0) -> None:
    """Run matrix products until the clocks have left idle. The first shape's autotuning otherwise times its configs
    on a cold GPU: on the first H100 run the same row measured 1.663 ms first and 1.258 ms in a later process."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def run(device, dtype, shapes, ranks, p, reps, backend):
    rows = []
    if device == "cuda":
        warm_gpu()
    for (T, fin, fout) in shapes:
        for r in ranks:
            variants, param_ptrs = build_variants(T, fin, fout, r, p, dtype, device, backend)
            x = torch.randn(T, fin, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(T, fout, device=device, dtype=dtype)
            res = {}
            if device == "cuda":
                for name, fn in variants.items():
                    res[name] = {"ms": time_fn(fn, x, dy, device, reps)}
                for name in res:
                    res[name]["ratio"] = res[name]["ms"] / res["base"]["ms"]
            else:
                # CPU timings drift with the machine's load: time the variants interleaved, round by round, and
                # report the median of each round's ratio to that round's base time.
                times = {name: [] for name in variants}
                for _ in range(reps):
                    for name, fn in variants.items():
                        times[name].append(time_fn(fn, x, dy, device, 1))
                for name in variants:
                    ratios = [t / tb for t, tb in zip(times[name], times["base"])]
                    res[name] = {"ms": statistics.median(times[name]), "ratio": statistics.median(ratios)}
            for name, fn in variants.items():
                res[name]["saved_bytes"] = saved_bytes(fn, x, dy, param_ptrs)
            rows.append({"tokens": T, "in": fin, "out": fout, "r": r, "p": p, "dtype": str(dtype).split(".")[-1],
                         "device": device, "results": res})
            # on CPU "ms" is the median time and the ratio the median of per-round ratios: the two need not divide
            line = "  ".join(f"{n} {v['ms']:8.3f} ms {v['ratio']:5.2f}x" for n, v in res.items())
            print(f"{T:6d} {fin:5d}->{fout:<5d} r={r:<3d} {line}", flush=True)
    return rows


def print_table(rows):
    names = list(rows[0]["results"])
    # GPU: ratio of median times; CPU: median of the per-round ratios (times interleaved round by round)
    what = "x base, median per-round ratio" if rows[0]["device"] == "cpu" else "x base"
    print("\n| shape (tokens, in -> out) | r | " + " | ".join(f"{n} ({what})" for n in names)
          + " | saved MiB " + "/".join(names) + " |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for row in rows:
        res = row["results"]
        ratios = " | ".join(f"{res[n]['ratio']:.2f}x" for n in names)
        mem = "/".join(f"{res[n]['saved_bytes'] / 2**20:.1f}" for n in names)
        print(f"| {row['tokens']}, {row['in']} -> {row['out']} | {row['r']} | {ratios} | {mem} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--ranks", default=None, help="comma-separated ranks (default: cpu 16, cuda 16,64)")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 2048x1024x1024,512x64x64")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--multi", action="store_true",
                    help="also run the multi-adapter benchmark (with this --backend and --reps as its rounds; its "
                         "own file is --out with _multi before the extension; its dtype is its own default)")
    ap.add_argument("--out", default="benchmarks/results/lora_layer.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    ranks = [int(r) for r in (args.ranks or ("16,64" if args.device == "cuda" else "16")).split(",")]
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES))
    reps = args.reps or (20 if args.device == "cuda" else 15)
    if args.device == "cpu":
        print(f"torch threads: {torch.get_num_threads()}", flush=True)
    print("backends:", lorafusion.available_backends(), flush=True)
    rows = run(args.device, dtype, shapes, ranks, args.p, reps, args.backend)
    print_table(rows)
    out = {"rows": rows, "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    if args.multi:
        from benchmarks import multi_lora_layer

        multi_args = ["--device", args.device, "--out", os.path.splitext(args.out)[0] + "_multi.json"]
        if args.backend is not None:
            multi_args += ["--backend", args.backend]
        if args.reps is not None:
            multi_args += ["--rounds", str(args.reps)]
        out["multi"] = multi_lora_layer.main(multi_args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
