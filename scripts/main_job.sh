#!/usr/bin/env bash
# Set everything up, then run the main job: LoRA fine-tuning of the built-in default model on the built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${PYTHON:-python3}" -m lorafusion train --config configs/default.yaml "$@"
