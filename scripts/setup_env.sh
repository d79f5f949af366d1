#!/usr/bin/env bash
# Install the project and its dependencies into the current Python (CPU torch pinned; an unpinned torch would pull a
# multi-GB CUDA build) and build the C++ extension. Idempotent: a second run with unchanged sources rebuilds nothing.
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
# pip's editable install compiles the extension from scratch every time (~100 s here): skip it when this Python
# already has the project installed and its extension built from these very sources (a stamp of their digest).
STAMP=build/.setup_stamp
digest=$("$PY" - <<'PY'
import glob, hashlib, os, sys
import torch
h = hashlib.sha256(f"{sys.executable} {torch.__version__}".encode())
for f in [p for p in sorted(glob.glob("csrc/**/*", recursive=True)) if os.path.isfile(p)] + ["setup.py", "pyproject.toml"]:
    h.update(f.encode())
    with open(f, "rb") as fh:
        h.update(fh.read())
print(h.hexdigest())
PY
)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$digest" ] && "$PY" -c \
    "import importlib.metadata as m; m.version('lorafusion'); import lorafusion._C" 2>/dev/null; then
  echo "lorafusion: already installed and built from these sources ($STAMP); not rebuilding"
else
  "$PY" -m pip install -q setuptools wheel ninja
  MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation -e ".[test]"
  mkdir -p build && echo "$digest" >"$STAMP"
fi
"$PY" -c "import lorafusion; print('lorafusion backends:', lorafusion.available_backends())"
