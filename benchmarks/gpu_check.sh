#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the CUDA extension, run the GPU-marked tests (bf16 included), run the
# benchmarks, print a short table last, write JSON and logs under $OUT (or ./gpu_out). Budget: under 8 minutes.
# Targets the GPU image: torch 2.11 (CUDA 13), triton 3.6, transformers, peft; no network, so nothing is pip-installed:
# the extension is built in place and the repository is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

stamp "build the extension (CPU + CUDA sources)"
cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" MAX_JOBS="${MAX_JOBS:-16}"
if ! timeout 240 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  stamp "BUILD FAILED (tail of $OUT/build.log):"; tail -40 "$OUT/build.log"
fi
python3 -c "import lorafusion; print(lorafusion.available_backends())" | tee "$OUT/backends.txt"

stamp "GPU tests"
timeout 200 python3 -m pytest -m gpu -q --maxfail=15 --timeout 150 -p no:cacheprovider \
  tests/lorafusion tests/multi tests/galore 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

stamp "layer benchmark (bf16)"
timeout 150 python3 benchmarks/lora_layer.py --device cuda --out "$OUT/lora_layer.json" \
  >"$OUT/lora_layer.log" 2>&1 || { stamp "benchmark failed"; tail -30 "$OUT/lora_layer.log"; }
if [ -f benchmarks/multi_lora_layer.py ]; then
  stamp "multi-adapter benchmark (bf16)"
  timeout 60 python3 benchmarks/multi_lora_layer.py --device cuda --out "$OUT/multi_lora_layer.json" \
    >"$OUT/multi_lora_layer.log" 2>&1 || { stamp "multi benchmark failed"; tail -30 "$OUT/multi_lora_layer.log"; }
  tail -12 "$OUT/multi_lora_layer.log"
fi
stamp "done"
grep -A 20 '^| shape' "$OUT/lora_layer.log" || tail -20 "$OUT/lora_layer.log"
