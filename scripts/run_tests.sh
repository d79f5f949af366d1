#!/usr/bin/env bash
# Set everything up, then run the CPU test suite (GPU-marked tests are run by benchmarks/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Without a GPU, Triton kernels run under its interpreter on CPU tensors.
if ! "${PYTHON:-python3}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
# Test files are spread over min(cores, 4) processes (pytest-xdist; a file's tests stay in one process):
# most tests are single-threaded Python (the Triton interpreter, the planner, subprocess start-ups). On this project's
# 2-core machine that takes the suite from 11.3 to 7.7 minutes. PYTEST_WORKERS=0 runs it in this process.
workers="${PYTEST_WORKERS:-$("${PYTHON:-python3}" -c "import os; print(min(os.cpu_count() or 1, 4))")}"
xdist=()
if [ "$workers" -gt 0 ]; then xdist=(-n "$workers" --dist loadfile); fi
exec "${PYTHON:-python3}" -m pytest tests -m "not gpu" -q -p no:cacheprovider --durations=15 "${xdist[@]}" "$@"
