"""Where a LoRA layer's time goes: forward + backward (input gradient included) of one layer, per backend and dropout
rate, timed whole and split into the kernels it launches (torch.profiler), beside the frozen base linear.

The first H100 run (benchmarks/RESULTS.md) put the fused layer at 1.27-2.14x of the base and the multi-adapter layer
at 2.71x, without saying which kernels take the excess. This prints, for each variant, the whole step's median time
and its ratio to the base, then each kernel's time per step (largest first), so the next GPU run shows it at once.

Variants: ``base`` (frozen nn.Linear), ``eager`` (plain torch LoRA), ``fused:<backend>`` for every available
single-adapter backend on the device (or --backends), and ``multi:<backend>`` (4 adapters, r = 8/16/32/64, a quarter
of the tokens each, as benchmarks/multi_lora_layer.py) for every multi-adapter backend; each at every --ps value.
On a GPU, times are triton.testing.do_bench medians (CUDA events) and kernels are CUDA kernels; on the CPU, wall-clock
medians and the profiler's CPU ops (self time).

    python benchmarks/layer_profile.py --device cuda                  # 8192 x 4096 -> 4096, bf16, r = 16, p 0 / 0.1
    python benchmarks/layer_profile.py --shape 512x256x256 --steps 3  # CPU, small
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
from benchmarks.lora_layer import warm_gpu  # noqa: E402
from lorafusion.multi import MultiLoRALinear  # noqa: E402
from lorafusion.backends import use_gemm_placement  # noqa: E402

MULTI_RANKS = (8, 16, 32, 64)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        t, fin, fout = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be TOKENSxINxOUT (e.g. 8192x4096x4096), got {text!r}")
    if min(t, fin, fout) < 1:
        raise argparse.ArgumentTypeError(f"--shape sizes must be positive, got {text!r}")
    return t, fin, fout


def _ps(text: str) -> list[float]:
    try:
        ps = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ps must be comma-separated dropout rates, got {text!r}")
    bad = [p for p in ps if not 0.0 <= p < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"--ps values must be in [0, 1), got {bad}")
    return ps


def _fused(base, r, p, name, A, B):
    """``name``: a backend, or "triton+blas" (the Triton backend with LORAFUSION_TRITON_GEMM=blas; "triton" runs
    with the fused placement, whatever the environment says)."""
    placement = "blas" if name == "triton+blas" else "fused" if name == "triton" else None
    layer = lorafusion.FusedLoRALinear(base, r=r, alpha=2 * r, dropout=p,
                                       backend=name.replace("+blas", "")).train()
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    return layer if placement is None else use_gemm_placement(placement)(lambda x: layer(x))


def _multi(base, p, name, ids, dtype):
    """``name``: a multi-adapter backend, or "triton+blas" (as in ``_fused``)."""
    placement = "blas" if name == "triton+blas" else "fused" if name == "triton" else None
    multi = MultiLoRALinear(base, backend=name.replace("+blas", "")).train()
    for k, rk in enumerate(MULTI_RANKS):
        multi.add_adapter(f"job{k}", rk, 2 * rk, p, dtype=torch.float32 if dtype != torch.float32 else None)
        with torch.no_grad():
            multi.lora_B[f"job{k}"].normal_(std=rk ** -0.5)
    seg = multi.make_segments(ids)
    step = lambda x: multi(x, segments=seg)  # noqa: E731
    return step if placement is None else use_gemm_placement(placement)(step)


def _built(make, *args):
    """The variant, or, when it cannot be built (a backend missing here, say), a step that raises why: the run
    records the error and goes on with the other variants."""
    try:
        return make(*args)
    except Exception as exc:
        def failing(x, exc=exc):
            raise RuntimeError(f"could not build the variant: {type(exc).__name__}: {exc}")
        return failing


def build_variants(T, fin, fout, r, ps, dtype, device, backends, multi_backends):
    """name -> step function taking x (T x fin, requires grad)."""
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, device=device, dtype=dtype).requires_grad_(False)
    # trainable, as in the fused layer: eager LoRA then computes dA and dB too
    A = nn.Parameter(torch.randn(r, fin, device=device, dtype=dtype) / fin ** 0.5)
    B = nn.Parameter(torch.randn(fout, r, device=device, dtype=dtype) / r ** 0.5)
    s = 2.0
    variants = {"base": base}
    for p in ps:
        variants[f"eager p={p:g}"] = (lambda x, p=p: F.linear(x, base.weight, base.bias)
                                      + s * F.linear(F.linear(F.dropout(x, p, True), A), B))
        for name in backends:
            variants[f"fused:{name} p={p:g}"] = _built(_fused, base, r, p, name, A, B)
        per = T // len(MULTI_RANKS)
        ids = [min(i // max(per, 1), len(MULTI_RANKS) - 1) for i in range(T)]
        for name in multi_backends:
            variants[f"multi:{name} p={p:g}"] = _built(_multi, base, p, name, ids, dtype)
    return variants


def _step(fn, x, dy):
    x.grad = None
    fn(x).backward(dy)


def time_step(fn, x, dy, device, reps):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(lambda: _step(fn, x, dy), warmup=50, rep=200, return_mode="median")
    _step(fn, x, dy)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _step(fn, x, dy)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def host_time(fn, x, dy, steps: int = 20, rounds: int = 3) -> float:
    """Microseconds of host (Python + launch) time per step on a GPU: the time to enqueue ``steps`` steps back to
    back without waiting for the GPU (best of ``rounds``). A step whose host time is above its GPU time is bound by
    the host: the GPU idles between kernels."""
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            _step(fn, x, dy)
        best = min(best, (time.perf_counter() - t0) / steps)
        torch.cuda.synchronize()
    return best * 1e6


def host_profile(fn, x, dy, steps: int = 50, top: int = 25) -> str:
    """cProfile of ``steps`` steps' host side, the ``top`` functions by own time (a GPU run: where the host time of
    a step goes)."""
    import cProfile
    import io
    import pstats

    _step(fn, x, dy)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        _step(fn, x, dy)
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def kernel_split(fn, x, dy, device, steps):
    """[(kernel or op name, microseconds per step, calls per step)], largest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _step(fn, x, dy)
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            _step(fn, x, dy)
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        if device == "cuda":
            # kernels: the events that ran on the device (CPU-side ops and launches are left out; so are GPU-side
            # user annotations, which span kernels already counted)
            if getattr(evt, "device_type", None) != DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0)
            if not us:
                continue
        else:
            us = evt.self_cpu_time_total
            if not us:
                continue
        rows.append((evt.key, us / steps, evt.count / steps))
    rows.sort(key=lambda t: -t[1])
    return rows


def autotune_choices():
    """Each Triton autotuner's chosen config per key, from the kernels the run used."""
    out = {}
    mods = []
    try:
        from lorafusion.backends import triton_kernels

        mods.append(triton_kernels)
    except Exception:
        pass
    try:
        from lorafusion.multi import triton_kernels as multi_tk

        mods.append(multi_tk)
    except Exception:
        pass
    for mod in mods:
        for name, obj in vars(mod).items():
            cache = getattr(obj, "cache", None)
            if isinstance(cache, dict) and cache and hasattr(obj, "configs"):
                out[f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"] = {str(k): str(v) for k, v in cache.items()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", type=_shape, default=None, help="TOKENSxINxOUT (cuda 8192x4096x4096, cpu 2048x1024x1024)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--ps", type=_ps, default=[0.0, 0.1], help="comma-separated dropout rates (default 0,0.1)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated single-adapter backends, or triton+blas (the Triton backend with "
                         "LORAFUSION_TRITON_GEMM=blas) (default: every available one but reference, and triton+blas "
                         "with triton)")
    ap.add_argument("--multi-backends", default=None,
                    help="comma-separated multi-adapter backends, or triton+blas (default: as --backends); "
                         "'none' for none")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps per variant")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per variant (CPU)")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per variant")
    ap.add_argument("--host-profile", default=None, metavar="VARIANT",
                    help="on a GPU, also print a cProfile of this variant's host side (e.g. 'fused:triton p=0.1')")
    ap.add_argument("--out", default="benchmarks/results/layer_profile.json")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.r < 1:
        raise SystemExit(f"--r must be at least 1, got {args.r}")
    if args.steps < 1 or args.reps < 1:
        raise SystemExit(f"--steps and --reps must be at least 1, got {args.steps} and {args.reps}")
    T, fin, fout = args.shape or ((8192, 4096, 4096) if dev == "cuda" else (2048, 1024, 1024))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    avail = lorafusion.available_backends()
    usable = [n for n, why in avail.items() if why == "available" and n != "reference"
              and (dev == "cuda") == (n in ("triton", "cuda"))]
    backends = args.backends.split(",") if args.backends else usable + (["triton+blas"] if "triton" in usable else [])
    unknown = [b for b in backends if avail.get("triton" if b == "triton+blas" else b) != "available"]
    if unknown:
        raise SystemExit(f"--backends: {unknown} not available here ({avail})")
    multi_arg = args.multi_backends or ",".join(backends)
    multi_backends = [] if multi_arg == "none" else multi_arg.split(",")
    if dev == "cuda":
        warm_gpu()
    variants = build_variants(T, fin, fout, args.r, args.ps, dtype, dev, backends, multi_backends)
    if args.host_profile is not None and (dev != "cuda" or args.host_profile not in variants):
        raise SystemExit(f"--host-profile {args.host_profile!r}: needs --device cuda and one of {list(variants)}")
    x = torch.randn(T, fin, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, fout, device=dev, dtype=dtype)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"layer profile: {T} tokens, {fin} -> {fout}, {str(dtype)[6:]}, r = {args.r} (multi: ranks {MULTI_RANKS}), "
          f"on {name}", flush=True)
    out = {"device": name, "dtype": str(dtype), "tokens": T, "in": fin, "out": fout, "r": args.r, "ps": args.ps,
           "multi_ranks": MULTI_RANKS, "torch": torch.__version__, "variants": {}, "autotune": {},
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    results = out["variants"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every variant: a run cut short keeps what it measured
        out["autotune"] = autotune_choices()
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    # Every variant is timed first, then profiled: profiling (CUPTI on a GPU) never precedes a timing.
    for vname, fn in variants.items():
        try:
            ms = time_step(fn, x, dy, dev, args.reps)
        except Exception as exc:  # one variant failing (a backend's kernel, say) must not lose the others
            results[vname] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{vname}: FAILED: {results[vname]['error']}", flush=True)
        else:
            results[vname] = {"ms": ms}
            ratio = ms / results["base"]["ms"] if "ms" in results["base"] else float("nan")
            results[vname]["ratio"] = ratio
            host = ""
            if dev == "cuda":
                results[vname]["host_us"] = host_time(fn, x, dy)
                host = f", host {results[vname]['host_us']:.0f} us/step"
            print(f"{vname}: {ms:.3f} ms ({ratio:.2f}x base{host})", flush=True)
        save()
    for vname, fn in variants.items():
        if "error" in results[vname]:
            continue
        try:
            split = kernel_split(fn, x, dy, dev, args.steps)
        except Exception as exc:
            results[vname]["kernels_error"] = f"{type(exc).__name__}: {exc}"
            print(f"\n{vname}: profile FAILED: {results[vname]['kernels_error']}", flush=True)
            save()
            continue
        results[vname]["kernels"] = [{"name": k, "us_per_step": round(us, 2), "calls_per_step": c}
                                     for k, us, c in split]
        print(f"\n{vname}: {results[vname]['ms']:.3f} ms; kernels per step:", flush=True)
        for k, us, c in split[:args.top]:
            print(f"  {us:10.1f} us  x{c:<4g} {k[:110]}", flush=True)
        save()
    if args.host_profile is not None and "error" not in results[args.host_profile]:
        text = host_profile(variants[args.host_profile], x, dy)
        out["host_profile"] = {"variant": args.host_profile, "steps": 50, "top_by_own_time": text}
        print(f"\nhost profile of {args.host_profile}, 50 steps:\n{text}", flush=True)
        save()
    print("\n| variant | ms | x base | host us/step |\n|---|---|---|---|")
    for vname, res in results.items():
        host = f"{res['host_us']:.0f}" if "host_us" in res else ""
        print(f"| {vname} | " + (f"{res['ms']:.3f} | {res['ratio']:.2f}x | {host} |" if "ms" in res
                                 else "failed | | |"))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
