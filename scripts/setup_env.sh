#!/usr/bin/env bash
# Install the project and its dependencies into the current Python (CPU torch pinned; an unpinned torch would pull a
# multi-GB CUDA build) and build the C++ extension. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install -q "torch==2.13.0"
# --no-build-isolation: build the extension against the torch installed above, not a fresh download.
"$PY" -m pip install -q setuptools wheel ninja
MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation -e ".[test]"
"$PY" -c "import lorafusion; print('lorafusion backends:', lorafusion.available_backends())"
