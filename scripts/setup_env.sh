#!/usr/bin/env bash
# Install the project and its dependencies into the current Python (CPU torch pinned; an unpinned torch would pull a
# multi-GB CUDA build) and build the C++ extension. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# The pin alone gives the CPU build only where pip already sees the CPU wheel (the reference machine keeps it in its
# local wheel folder); elsewhere PyPI's torch==2.13.0 is the CUDA build: set TORCH_INDEX to take it from an index,
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/run_tests.sh
if [ -n "${TORCH_INDEX:-}" ]; then
  "$PY" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
else
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -c "import torch; print('torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
# --no-build-isolation: build the extension against the torch installed above, not a fresh download.
"$PY" -m pip install -q setuptools wheel ninja
MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation -e ".[test]"
"$PY" -c "import lorafusion; print('lorafusion backends:', lorafusion.available_backends())"
