"""Optimizer-state memory of AdamW, AdamW 8-bit, GaLore AdamW and GaLore AdamW 8-bit.

1. Computed: state bytes for LLaMA-1B / LLaMA-7B shapes (configs written as numbers below, model built on the meta
   device, the projected weights chosen by ``galore.select_projected(model, "all-linear", rank)``: every attention
   and MLP projection; embeddings, norms and the LM head stay plain), at the GaLore paper's ranks (512 / 1024).
   Accounting: AdamW = 2 fp32 moments per element (8 B). 8-bit = bitsandbytes blockwise: 2 uint8 moments + 2 fp32
   absmax per 256-element block; tensors under 4096 elements keep fp32 moments (as bitsandbytes). GaLore = the same
   moments over the *projected* shape, plus the projection basis, which is counted: the basis is stored in the
   gradient's dtype (bf16 for a BF16 run, the paper's baseline; the fp32 column is also printed). Unprojected
   parameters get the plain optimizer's state (8-bit for the 8-bit variants).
2. Measured on a small LLaMA-shaped model on CPU, one subprocess per optimizer: the state bytes (sum of state
   tensors; checked against the computed accounting for the same shapes), peak process RSS, and training-step
   time (forward + backward + step; median of steady steps, plus the basis-refresh step amortised over T = 200).
   Layer-wise mode: peak bytes of gradients + projected accumulators alive at once during a step.

    python benchmarks/optimizer_memory.py [--out benchmarks/results/optimizer_memory.json] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import galore  # noqa: E402
from galore.projector import basis_shape, matrix_view, projected_shape, projection_side  # noqa: E402

# LLaMA configurations of the GaLore paper (numbers only; nothing downloaded)
CONFIGS = {
    "llama-1b": dict(vocab=32000, hidden=2048, intermediate=5461, layers=24, heads=32, rank=512),
    "llama-7b": dict(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, rank=1024),
}
SMALL = dict(vocab=2048, hidden=256, intermediate=688, layers=4, heads=4, rank=64)
OPTIMIZERS = ("adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit")
GAP = 200
MIN_8BIT = 4096
BLOCK = 256


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden"], c["intermediate"]
        self.heads = c["heads"]
        self.input_norm = nn.RMSNorm(h)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.post_norm = nn.RMSNorm(h)
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        b, t, h = x.shape
        y = self.input_norm(x)
        q, k, v = (proj(y).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + self.o_proj(a)
        y = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class LlamaShaped(nn.Module):
    """LLaMA's parameter shapes (untied embedding and LM head, RMSNorm, SwiGLU MLP); rotary embedding left out."""

    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.norm = nn.RMSNorm(c["hidden"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# ---------------------------------------------------------------------------------------------- accounting
def moment_bytes(numel: int, eight_bit: bool) -> int:
    if eight_bit and numel >= MIN_8BIT:
        return 2 * numel + 2 * 4 * math.ceil(numel / BLOCK)
    return 8 * numel


def state_bytes(model: nn.Module, name: str, rank: int, basis_bytes: int) -> dict:
    eight_bit = name.endswith("8bit")
    projected = []
    if name.startswith("galore"):
        projected = [p for _, p in galore.select_projected(model, "all-linear", rank)[0]]
    ids = {id(p) for p in projected}
    moments = basis = 0
    for p in model.parameters():
        if id(p) in ids:
            shape = tuple(matrix_view(p).shape)
            side = projection_side("std", shape)
            moments += moment_bytes(math.prod(projected_shape(side, shape, rank)), eight_bit)
            basis += math.prod(basis_shape(side, shape, rank)) * basis_bytes
        else:
            moments += moment_bytes(p.numel(), eight_bit)
    return {"moments": moments, "basis": basis, "total": moments + basis, "projected_matrices": len(projected)}


def computed_table() -> dict:
    out = {}
    for cname, c in CONFIGS.items():
        with torch.device("meta"):
            model = LlamaShaped(c)
        n_params = sum(p.numel() for p in model.parameters())
        rows = {}
        for name in OPTIMIZERS:
            bf16 = state_bytes(model, name, c["rank"], basis_bytes=2)
            fp32 = state_bytes(model, name, c["rank"], basis_bytes=4)
            rows[name] = {"bytes_bf16_basis": bf16, "bytes_fp32_basis": fp32}
        base = rows["adamw"]["bytes_bf16_basis"]["total"]
        for r in rows.values():
            r["ratio_to_adamw_bf16_basis"] = r["bytes_bf16_basis"]["total"] / base
            r["ratio_to_adamw_fp32_basis"] = r["bytes_fp32_basis"]["total"] / base
        out[cname] = {"params": n_params, "rank": c["rank"], "optimizers": rows}
    return out


# ---------------------------------------------------------------------------------------------- measured run
def _batch(gen, c, batch=4, seq=64):
    ids = torch.randint(0, c["vocab"], (batch, seq + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _train_step(model, opt, ids, labels, accumulation=1):
    for _ in range(accumulation):
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)) / accumulation
        loss.backward()
    opt.step()
    opt.zero_grad()


def worker(name: str, steps: int, accumulation: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # shared CPUs: one thread keeps timings about the work, not the scheduler
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    layerwise = name.endswith("_layerwise")
    model = LlamaShaped(SMALL)
    opt = galore.build_optimizer(model, name, "all-linear", lr=1e-3, weight_decay=0.0, rank=SMALL["rank"],
                                 update_proj_gap=GAP, scale=0.25, proj_type="std", accumulation_steps=accumulation)
    gen = torch.Generator().manual_seed(1)
    ids, labels = _batch(gen, SMALL)

    grad_peak = [0]
    if layerwise:
        # a tensor hook fires when a parameter's gradient has been computed, before it is accumulated and before
        # the optimizer's post-accumulate-grad hook frees it: the moment of the most gradient memory alive
        def watch(p):
            def hook(_grad):
                live = sum(q.grad.nbytes for q in model.parameters() if q.grad is not None)
                pend = sum(t.nbytes for t in opt._layerwise["pending"].values())
                live_now = live + pend + p.numel() * p.element_size()  # the incoming gradient itself
                grad_peak[0] = max(grad_peak[0], live_now)
            return hook

        for p in model.parameters():
            p.register_hook(watch(p))

    t0 = time.perf_counter()
    _train_step(model, opt, ids, labels, accumulation)  # step 0: basis refresh (SVD)
    refresh_s = time.perf_counter() - t0
    grad_peak_refresh = grad_peak[0]
    grad_peak[0] = 0
    times = []
    for _ in range(steps):
        ids, labels = _batch(gen, SMALL)
        t0 = time.perf_counter()
        _train_step(model, opt, ids, labels, accumulation)
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times)
    state_nbytes = sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    basis_bytes = 4  # fp32 model: the basis is fp32
    expected = state_bytes(model, name.replace("_layerwise", ""), SMALL["rank"], basis_bytes)["total"]
    grads = sorted((p.numel() * p.element_size() for p in model.parameters()), reverse=True)
    pending_full = 0
    if name.startswith("galore"):
        for _, p in galore.select_projected(model, "all-linear", SMALL["rank"])[0]:
            shape = tuple(matrix_view(p).shape)
            pending_full += math.prod(projected_shape(projection_side("std", shape), shape, SMALL["rank"])) * 4
    return {
        "name": name,
        "accumulation": accumulation,
        "state_bytes": state_nbytes,
        "state_bytes_computed": expected,
        "accounting_matches": state_nbytes == expected,
        "step_s_median": steady,
        "refresh_step_s": refresh_s,
        "step_s_amortised_T200": steady + (refresh_s - steady) / GAP,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_model_bytes": baseline_rss,
        "all_gradients_bytes": sum(grads),
        "largest_gradient_bytes": grads[0],
        "projected_accumulators_bytes": pending_full,
        "layerwise_grad_peak_bytes_steady": grad_peak[0] if layerwise else None,
        "layerwise_grad_peak_bytes_refresh": grad_peak_refresh if layerwise else None,
    }


def time_ratio(steps: int) -> dict:
    """AdamW and GaLore AdamW training steps on the small model, alternated in one process so load changes on a
    shared machine hit both alike; medians, with GaLore's refresh (SVD) step amortised over T = 200."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(2)
    runs = {}
    for name in ("adamw", "galore_adamw"):
        torch.manual_seed(0)
        model = LlamaShaped(SMALL)
        opt = galore.build_optimizer(model, name, "all-linear", lr=1e-3, rank=SMALL["rank"], update_proj_gap=GAP)
        runs[name] = (model, opt, [])
    refresh = {}
    for i in range(steps + 1):
        ids, labels = _batch(gen, SMALL)
        for name, (model, opt, times) in runs.items():
            t0 = time.perf_counter()
            _train_step(model, opt, ids, labels)
            elapsed = time.perf_counter() - t0
            if i == 0:
                refresh[name] = elapsed  # step 0 computes GaLore's basis (the SVD)
            else:
                times.append(elapsed)
    out = {}
    for name, (_, _, times) in runs.items():
        med = statistics.median(times)
        out[name] = {"step_s_median": med, "refresh_step_s": refresh[name],
                     "step_s_amortised_T200": med + (refresh[name] - med) / GAP}
    out["ratio_amortised"] = out["galore_adamw"]["step_s_amortised_T200"] / out["adamw"]["step_s_amortised_T200"]
    return out


def run_measured(steps: int) -> list[dict]:
    runs = [(n, 1) for n in OPTIMIZERS] + [("galore_adamw_layerwise", 1), ("galore_adamw_layerwise", 2)]
    results = []
    for name, acc in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--memory-steps", str(steps),
               "--accumulation", str(acc)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def _gb(b):
    return f"{b / 2**30:8.2f} GiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "optimizer_memory.json"))
    ap.add_argument("--steps", type=int, default=8, help="steady steps timed for the AdamW / GaLore step-time ratio")
    ap.add_argument("--memory-steps", type=int, default=2, help="steady steps per optimizer in the memory runs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.memory_steps < 1:
        ap.error(f"--steps and --memory-steps must be >= 1, got {args.steps}, {args.memory_steps}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.memory_steps, args.accumulation)))
        return

    computed = computed_table()
    print("Optimizer state, computed from LLaMA shapes on the meta device (moments + basis; basis in bf16 | fp32)")
    print(f"{'model':9} {'optimizer':17} {'state (bf16 basis)':>19} {'ratio':>7} {'state (fp32 basis)':>19} {'ratio':>7}")
    for cname, c in computed.items():
        for name, r in c["optimizers"].items():
            print(f"{cname:9} {name:17} {_gb(r['bytes_bf16_basis']['total']):>19} "
                  f"{r['ratio_to_adamw_bf16_basis']:7.3f} {_gb(r['bytes_fp32_basis']['total']):>19} "
                  f"{r['ratio_to_adamw_fp32_basis']:7.3f}")

    measured = run_measured(args.memory_steps)
    timing = time_ratio(args.steps)
    print(f"\nMeasured on a small LLaMA-shaped model on CPU ({platform.processor() or platform.machine()}, "
          f"{sum(p.numel() for p in LlamaShaped(SMALL).parameters()) / 1e6:.1f}M params, rank {SMALL['rank']})")
    print(f"{'optimizer':24} {'acc':>3} {'state MiB':>10} {'acct ok':>7} {'step ms':>8} {'refresh ms':>10} "
          f"{'amort. ms':>9} {'peak RSS MiB':>12} {'over start':>10}")
    for m in measured:
        print(f"{m['name']:24} {m['accumulation']:3d} {m['state_bytes'] / 2**20:10.2f} {str(m['accounting_matches']):>7} "
              f"{m['step_s_median'] * 1e3:8.1f} {m['refresh_step_s'] * 1e3:10.1f} "
              f"{m['step_s_amortised_T200'] * 1e3:9.1f} {m['peak_rss_bytes'] / 2**20:12.1f} "
              f"{(m['peak_rss_bytes'] - m['rss_before_model_bytes']) / 2**20:10.1f}")

    by = {(m["name"], m["accumulation"]): m for m in measured}
    c7 = computed["llama-7b"]["optimizers"]
    lw = by[("galore_adamw_layerwise", 1)]
    targets = {
        "galore_adamw_state_le_35pct_of_adamw_7b": {
            "value": c7["galore_adamw"]["ratio_to_adamw_bf16_basis"], "limit": 0.35,
            "value_fp32_basis": c7["galore_adamw"]["ratio_to_adamw_fp32_basis"],
            "accounting": "fp32 moments both; GaLore basis counted, bf16 (gradient dtype of a BF16 run)",
        },
        "galore_adamw8bit_state_le_17_5pct_of_adamw_fp32_7b": {
            "value": c7["galore_adamw8bit"]["ratio_to_adamw_bf16_basis"], "limit": 0.175,
            "value_fp32_basis": c7["galore_adamw8bit"]["ratio_to_adamw_fp32_basis"],
            "accounting": "8-bit blockwise moments + fp32 absmax; basis counted, bf16; unprojected params 8-bit",
        },
        "layerwise_grad_peak_le_largest_grad_plus_projected_accumulators": {
            "value": max(lw["layerwise_grad_peak_bytes_steady"], lw["layerwise_grad_peak_bytes_refresh"]),
            "limit": lw["largest_gradient_bytes"] + lw["projected_accumulators_bytes"],
            "accounting": "small model, accumulation 1, fp32 gradients; bytes of .grad tensors + projected "
                          "accumulators alive at once, on a refresh step and on steady steps",
        },
        "galore_step_time_le_1_2x_adamw_T200": {
            "value": timing["ratio_amortised"],
            "limit": 1.2,
            "accounting": "small model on CPU, 1 thread, forward+backward+step alternated in one process, median "
                          "steady step + (refresh step - median) / T",
        },
    }
    print(f"\nStep time, alternated in one process ({args.steps} steps): AdamW "
          f"{timing['adamw']['step_s_median'] * 1e3:.1f} ms, GaLore AdamW {timing['galore_adamw']['step_s_median'] * 1e3:.1f} ms "
          f"(refresh step {timing['galore_adamw']['refresh_step_s'] * 1e3:.1f} ms)")
    print("\nTargets")
    for k, t in targets.items():
        t["met"] = t["value"] <= t["limit"]
        print(f"  {k:66} {t['value']:.4g} <= {t['limit']:.4g}: {'MET' if t['met'] else 'NOT MET'}")
    acc2 = by[("galore_adamw_layerwise", 2)]
    print(f"  (layer-wise, accumulation 2: peak {acc2['layerwise_grad_peak_bytes_steady'] / 2**20:.2f} MiB steady, "
          f"{acc2['layerwise_grad_peak_bytes_refresh'] / 2**20:.2f} MiB on the refresh step; all gradients "
          f"{acc2['all_gradients_bytes'] / 2**20:.2f} MiB)")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                   "machine": platform.platform(), "configs": CONFIGS, "small": SMALL, "computed": computed,
                   "measured": measured, "step_time": timing, "targets": targets}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
