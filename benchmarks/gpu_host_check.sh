#!/usr/bin/env bash
# A short GPU call for host-side (launch path) changes of the single-adapter Triton layer: its compiled GPU tests,
# the layer profile with host time per step (this tree, and optionally an older tree for a same-machine before /
# after), then the layer benchmark. Writes under $OUT (or ./gpu_out). About 4-5 minutes on an H100.
#   OLD_TREE=.old bash benchmarks/gpu_host_check.sh    # .old: `git archive <commit> | tar -x -C .old`, carried
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
t0=$(date +%s)
stamp() { echo "[gpu_host_check +$(( $(date +%s) - t0 ))s] $*"; }
stamp "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
stamp "single-adapter Triton GPU tests (bf16 included)"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_TEST_WORKERS:-14}")
timeout "${GPU_TEST_TIMEOUT:-130}" python3 -m pytest -m gpu -p no:cacheprovider -q -rs $xdist --timeout=120 \
  tests/lorafusion/test_triton_gpu.py 2>&1 | tee "$OUT/host_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -12
PROFILE_ARGS=(--device cuda --backends triton,triton+blas --multi-backends triton)
stamp "layer profile, this tree"
timeout 120 python3 benchmarks/layer_profile.py "${PROFILE_ARGS[@]}" --host-profile "fused:triton p=0.1" \
  --out "$OUT/layer_profile.json" >"$OUT/profile.log" 2>&1
grep -A 12 '^| variant' "$OUT/profile.log" || tail -20 "$OUT/profile.log"
if [ -n "${OLD_TREE:-}" ] && [ -d "$OLD_TREE" ]; then
  stamp "layer profile, $OLD_TREE (same machine, for before / after)"
  (cd "$OLD_TREE" && PYTHONPATH="$PWD" timeout 90 python3 benchmarks/layer_profile.py --device cuda \
    --backends triton,triton+blas --multi-backends none --out "$OUT/layer_profile_old.json" 2>&1 \
    | grep -A 8 '^| variant')
fi
stamp "layer benchmark (bf16, the five shapes, r = 16 and 64)"
timeout "${GPU_LAYER_TIMEOUT:-150}" python3 benchmarks/lora_layer.py --device cuda --out "$OUT/lora_layer.json" \
  >"$OUT/lora_layer.log" 2>&1
grep -A 14 '^| shape' "$OUT/lora_layer.log" || tail -20 "$OUT/lora_layer.log"
stamp "host profile of fused:triton p=0.1 (top of the list)"
sed -n '/^host profile/,/^| variant/p' "$OUT/profile.log" | head -42
stamp "done"
