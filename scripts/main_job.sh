#!/usr/bin/env bash
# Set everything up, then run the main job: LoRA fine-tuning of the built-in default model on the built-in data.
# Each run writes a new folder under runs/ (pass --train.output_dir DIR [--resume] to choose or continue one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${PYTHON:-python3}" -m lorafusion train --config configs/default.yaml \
  --train.output_dir "runs/main-$(date +%Y%m%d-%H%M%S)-$$" "$@"
