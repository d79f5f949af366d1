#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the CUDA extension, run the GPU-marked tests (bf16 included), run the
# benchmarks (the layer, a per-kernel profile of the layer and the multi-adapter layer, the multi-adapter benchmark,
# then the opt-in TMA GEMMs against the pointer ones), print a short table last, write JSON and logs under $OUT (or
# ./gpu_out). Budget: GPU_CHECK_BUDGET seconds (560); the optional steps are skipped when they would not fit, and
# the required ones (probes, build, tests, layer benchmark) are cut to what is left of it.
# Targets the GPU image: torch 2.11 (CUDA 13), triton 3.6, transformers, peft; no network, so nothing is pip-installed:
# the extension is built in place and the repository is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"  # the device tool brings back at most 8 files from $OUT: this script writes 7
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# bitsandbytes is not in the GPU image: a session may carry a copy in .gpu_site (see benchmarks/RESULTS.md) so the
# 8-bit GaLore tests run against it; without it they are skipped.
[ -d .gpu_site ] && export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"
unset TRITON_INTERPRET
t0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-560}"  # seconds: the device tool's per-call limit is 600
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
# room for a step of $1 s more? (a step given 0 s is skipped: `timeout 0` would mean no limit at all)
have_time() { [ "$1" -gt 0 ] && [ $(( $(date +%s) - t0 + $1 )) -le "$BUDGET" ]; }
# the limit for a required step: $1 s, or what is left of the budget when that is less (at least 1 s), so the
# required steps cannot overrun the budget either
left() { local l=$(( BUDGET - ($(date +%s) - t0) )); [ "$l" -lt 1 ] && l=1; [ "$1" -lt "$l" ] && l=$1; echo "$l"; }

stamp "device"
timeout "$(left 30)" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
timeout "$(left 60)" python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"

stamp "build the extension (CPU + CUDA sources)"
cap=$(timeout "$(left 60)" python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" MAX_JOBS="${MAX_JOBS:-16}"
if ! timeout "$(left 240)" python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  stamp "BUILD FAILED (tail of $OUT/build.log):"; tail -40 "$OUT/build.log"
fi
timeout "$(left 60)" python3 -c "import lorafusion; print(lorafusion.available_backends())" | tee -a "$OUT/summary.txt"

stamp "GPU tests"
# pytest-xdist (in the GPU image) spreads the tests over processes: most of their time is Triton compiling and
# autotuning on the CPU. Per-test durations go to the log, so a slow test is named even when the stage is cut short.
xdist=$(timeout "$(left 30)" python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_TEST_WORKERS:-14}")
timeout "$(left "${GPU_TEST_TIMEOUT:-200}")" python3 -m pytest -m gpu -p no:cacheprovider -v -rs $xdist --durations=25 \
  --maxfail=15 --timeout=150 tests/lorafusion tests/multi tests/galore 2>&1 | tee "$OUT/gpu_tests.log" \
  | grep -E "FAILED|ERROR|passed|failed|SKIPPED|^[0-9.]+s (call|setup)" | tail -45

# Benchmark output: each step's log goes to $OUT/bench.log as it is written (a call cut short keeps it) and to a
# per-call scratch folder, from which the tables are printed.
LOGS=$(mktemp -d)
bench() {  # bench NAME TIMEOUT_S CMD...: run one benchmark step, log it, say how it ended if it failed
  local name=$1 limit=$2 rc; shift 2
  echo "===== $name: $*" >>"$OUT/bench.log"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" >>"$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    stamp "$name failed: $([ "$rc" -eq 124 ] && echo "timed out after ${limit}s" || echo "exit status $rc")"
    tail -30 "$LOGS/$name.log"
  fi
}
if [ -n "${GPU_SKIP_LAYER:-}" ]; then stamp "layer benchmark skipped (GPU_SKIP_LAYER)"; else
  stamp "layer benchmark (bf16)"
  bench lora_layer "$(left 150)" python3 benchmarks/lora_layer.py --device cuda --out "$OUT/lora_layer.json"
fi
# Each optional step starts only when its whole time limit fits the budget. The profile goes first: it times
# every backend and GEMM placement (fused and multi-adapter, p = 0 and 0.1) against the base, kernel by kernel.
profile_limit=${GPU_PROFILE_TIMEOUT:-150}
if have_time "$profile_limit"; then
  stamp "layer profile: per-kernel time of base / eager / fused / multi, each backend and GEMM placement, p = 0, 0.1"
  bench layer_profile "$profile_limit" \
    python3 benchmarks/layer_profile.py --device cuda --host-profile "fused:triton p=0.1" --out "$OUT/layer_profile.json"
  grep -A 22 '^| variant' "$LOGS/layer_profile.log"
else stamp "layer profile skipped: ${profile_limit}s would overrun GPU_CHECK_BUDGET"; fi
multi_limit=${GPU_MULTI_TIMEOUT:-120}
if have_time "$multi_limit"; then
  stamp "multi-adapter benchmark (bf16)"
  bench multi_lora_layer "$multi_limit" \
    python3 benchmarks/multi_lora_layer.py --device cuda --out "$OUT/multi_lora_layer.json"
  tail -12 "$LOGS/multi_lora_layer.log"
else stamp "multi-adapter benchmark skipped: ${multi_limit}s would overrun GPU_CHECK_BUDGET"; fi
# The TMA step (about 160 s) rarely fits after the others in one call: run it alone with
# GPU_SKIP_LAYER=1 GPU_MULTI_TIMEOUT=0 GPU_PROFILE_TIMEOUT=0 ... (a limit of 0 skips that step).
if [ -z "${GPU_SKIP_TMA:-}" ] && have_time 160; then
  stamp "TMA GEMMs (LORAFUSION_TRITON_TMA=1): agreement with the pointer kernels, then the layer benchmark at r = 16"
  timeout 40 python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import os, torch
from lorafusion.backends import triton_backend as tb
torch.manual_seed(0)
x, W = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
A, B = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16) / 64, torch.randn(4096, 16, device="cuda", dtype=torch.bfloat16)
dy, b = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(4096, device="cuda", dtype=torch.bfloat16)
out = {}
for tma in ("0", "1"):
    os.environ["LORAFUSION_TRITON_TMA"] = tma
    y, S = tb.forward(x, W, b, A, B, 2.0, 7, 0.1)
    out[tma] = (y.float(), tb.backward(dy, x, W, A, B, S, 2.0, 7, 0.1, True)[0].float())
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
print("TMA vs pointer kernels, 8192x4096->4096 bf16 p=0.1: rel diff Y %.2e, dX %.2e" % (rel(out["1"][0], out["0"][0]), rel(out["1"][1], out["0"][1])))
PY
  for tma in 0 1; do  # pointer GEMMs, then TMA GEMMs, on the same two shapes
    LORAFUSION_TRITON_TMA=$tma bench "lora_layer_tma$tma" 60 python3 benchmarks/lora_layer.py --device cuda --ranks 16 \
      --shapes 8192x4096x4096,8192x4096x14336 --out "$LOGS/lora_layer_tma$tma.json"
    echo "LORAFUSION_TRITON_TMA=$tma:"; grep -A 4 '^| shape' "$LOGS/lora_layer_tma$tma.log"
  done
else stamp "TMA step skipped (GPU_SKIP_TMA, or 160 s would overrun GPU_CHECK_BUDGET)"; fi
stamp "done"
grep -A 20 '^| shape' "$LOGS/lora_layer.log" 2>/dev/null || echo "(no layer benchmark table in this call)"
