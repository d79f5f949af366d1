#!/usr/bin/env bash
# Set everything up, then run the CPU test suite (GPU-marked tests are run by benchmarks/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Without a GPU, Triton kernels run under its interpreter on CPU tensors.
if ! "${PYTHON:-python3}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
exec "${PYTHON:-python3}" -m pytest tests -m "not gpu" -q -p no:cacheprovider --durations=15 "$@"
