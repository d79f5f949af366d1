"""Multi-adapter layer benchmark (issue 5): 4 adapters (r = 8, 16, 32, 64, dropout 0.1, alpha = 2r) share one
microbatch, a quarter of the tokens each. Forward+backward (input needs its gradient, as inside a model) of:

  base        the frozen nn.Linear alone on all tokens (the floor)
  multi       lorafusion.multi.MultiLoRALinear: one call for all 4 adapters
  multi-blas  (GPU, Triton backend) the same with LORAFUSION_TRITON_GEMM=blas: cuBLAS GEMMs adding onto the stored
              rank-r term instead of the Triton GEMM with the term in its epilogue
  sequential  the 4 adapters one after another, each on its rows, through lorafusion.FusedLoRALinear
  peft        the 4 adapters one after another through PEFT's LoRA Linear (set_adapter per adapter)

Ratio = time / base. CPU: fp32, 2048 tokens, 1024 -> 1024, medians of interleaved wall-clock rounds. GPU: bf16,
8192 tokens, 4096 -> 4096, triton.testing.do_bench (CUDA events, median). Targets: multi <= 1.15x (GPU), <= 1.35x
(CPU), ahead of sequential and peft. Prints a table and writes JSON (--out).

    python benchmarks/multi_lora_layer.py                 # CPU
    python benchmarks/multi_lora_layer.py --device cuda   # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lorafusion.multi import MultiLoRALinear, ops  # noqa: E402
from lorafusion.backends import use_gemm_placement  # noqa: E402
from lorafusion.multi.backends import get_multi_backend  # noqa: E402

ops.cpp_ops_reason()  # load the C++ ops first (a development JIT build must precede lorafusion._C)

RANKS = (8, 16, 32, 64)
P = 0.1
TARGET = {"cpu": 1.35, "cuda": 1.15}


def build(T, fin, fout, dtype, device, backend):
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, device=device, dtype=dtype).requires_grad_(False)
    names = [f"job{i}" for i in range(len(RANKS))]
    per = T // len(RANKS)
    ids = [i for i in range(len(RANKS)) for _ in range(per)] + [len(RANKS) - 1] * (T - per * len(RANKS))
    bounds = [(i * per, (i + 1) * per if i < len(RANKS) - 1 else T) for i in range(len(RANKS))]

    multi = MultiLoRALinear(base, backend=backend).train()
    for n, r in zip(names, RANKS):
        multi.add_adapter(n, r, 2 * r, P, dtype=torch.float32 if dtype != torch.float32 else None)
        with torch.no_grad():
            multi.lora_B[n].normal_(std=r ** -0.5)
    seg = multi.make_segments(ids)
    variants = {"base": lambda x: base(x), "multi": lambda x: multi(x, segments=seg)}
    if device == "cuda" and get_multi_backend("cuda", backend, dtype).name == "triton":
        # the same layer with cuBLAS running the two big GEMMs onto the rank-r term a Triton kernel stored first
        # (LORAFUSION_TRITON_GEMM=blas), against the Triton GEMM with the term in its epilogue ("multi"), each
        # placement set explicitly whatever the environment says (the context manager as a decorator)
        variants["multi"] = use_gemm_placement("fused")(lambda x: multi(x, segments=seg))
        variants["multi-blas"] = use_gemm_placement("blas")(lambda x: multi(x, segments=seg))

    try:
        import lorafusion

        fused = []
        for n, r in zip(names, RANKS):
            # the same backend as the multi layer; its adapters are in the base dtype (FusedLoRALinear's), where the
            # multi layer's are fp32 over a half-precision base
            f = lorafusion.FusedLoRALinear(base, r=r, alpha=2 * r, dropout=P, backend=backend).train()
            f.lora_A.data.copy_(multi.lora_A[n].data)
            f.lora_B.data.copy_(multi.lora_B[n].data)
            fused.append(f)

        def sequential(x):
            return torch.cat([f(x[a:b]) for f, (a, b) in zip(fused, bounds)])

        variants["sequential"] = sequential
    except Exception as exc:  # the single-adapter layer missing or failing: say so, keep the rest
        print(f"sequential fused variant unavailable: {exc}", file=sys.stderr)

    try:
        from peft import LoraConfig, get_peft_model

        class Holder(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(fin, fout, device=device, dtype=dtype)

            def forward(self, x):
                return self.lin(x)

        h = Holder()
        h.lin.load_state_dict(base.state_dict())
        pm = get_peft_model(h, LoraConfig(r=RANKS[0], lora_alpha=2 * RANKS[0], lora_dropout=P,
                                          target_modules=["lin"]), adapter_name=names[0])
        for n, r in zip(names[1:], RANKS[1:]):
            pm.add_adapter(n, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=P, target_modules=["lin"]))
        pm.train()

        def peft_sequential(x):
            outs = []
            for n, (a, b) in zip(names, bounds):
                pm.base_model.set_adapter(n)
                for name, q in pm.named_parameters():  # set_adapter freezes the other adapters: every adapter
                    if "lora_" in name:                 # trains, as in "multi" and "sequential"
                        q.requires_grad_(True)
                outs.append(pm(x[a:b]))
            return torch.cat(outs)

        variants["peft"] = peft_sequential
    except ImportError:
        pass
    return variants


def bench(variants, x, dy, device, rounds, clock=time.perf_counter):
    def step(fn):
        x.grad = None
        fn(x).backward(dy)

    if device == "cuda":
        import triton.testing

        out = {}
        for k, f in variants.items():  # one line per variant as it is timed: a run cut short still reports
            out[k] = triton.testing.do_bench(lambda f=f: step(f), warmup=50, rep=300, return_mode="median")
            print(f"  {k}: {out[k]:.3f} ms", flush=True)
        return out
    for f in variants.values():
        step(f)
        step(f)
    times = {k: [] for k in variants}
    for _ in range(rounds):  # interleaved: machine noise hits every variant alike
        for k, f in variants.items():
            t0 = clock()
            step(f)
            times[k].append(clock() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--features", type=int, default=None, help="in = out features")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--out", default="benchmarks/results/multi_lora_layer.json")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    T = args.tokens or (8192 if dev == "cuda" else 2048)
    F = args.features or (4096 if dev == "cuda" else 1024)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cuda":
        from benchmarks.lora_layer import warm_gpu

        warm_gpu()
    variants = build(T, F, F, dtype, dev, args.backend)
    x = torch.randn(T, F, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, F, device=dev, dtype=dtype)
    ms = bench(variants, x, dy, dev, args.rounds)
    rows = [{"variant": k, "ms": round(v, 3), "ratio": round(v / ms["base"], 3)} for k, v in ms.items()]
    cpu_rows = None
    if dev == "cpu":
        # On a shared machine wall-clock ratios swing with other load; CPU time of one thread is steadier.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cpu_ms = bench(variants, x, dy, dev, args.rounds, clock=time.process_time)
        torch.set_num_threads(threads)
        cpu_rows = {k: {"cpu_ms_1thread": round(v, 3), "ratio": round(v / cpu_ms["base"], 3)}
                    for k, v in cpu_ms.items()}
    name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"multi-adapter LoRA layer, fwd+bwd, {T} tokens, {F} -> {F}, {str(dtype)[6:]}, ranks {RANKS}, p={P}, "
          f"on {name}")
    head = f"{'variant':<12}{'ms':>10}{'x base':>9}"
    if cpu_rows:
        head += f"{'cpu ms 1thr':>14}{'x base':>9}"
    print(head)
    for r in rows:
        line = f"{r['variant']:<12}{r['ms']:>10.2f}{r['ratio']:>9.2f}"
        if cpu_rows:
            c = cpu_rows[r["variant"]]
            line += f"{c['cpu_ms_1thread']:>14.2f}{c['ratio']:>9.2f}"
        print(line)
    ok = ms["multi"] / ms["base"] <= TARGET[dev]
    print(f"target multi <= {TARGET[dev]}x base: {'met' if ok else 'NOT met'}")
    out = {"device": name, "dtype": str(dtype), "tokens": T, "in": F, "out": F, "ranks": RANKS, "dropout": P,
           "rows": rows, "cpu_time_1thread": cpu_rows, "target_ratio": TARGET[dev], "target_met": ok,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
