#!/usr/bin/env bash
# Run on a CUDA machine from the repository root: embedding (decode workers, nvJPEG) + full-mode training, images/s
# and peak GPU memory. Arguments go to bench/gpu_check.py (e.g. --sweep 4 8 16 for img/s per decode-worker count).
# Where the pretrained-weights package is not installed, put its files in .gpu/site (see docs) and they are used.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu/site ]; then export PYTHONPATH="$PWD/.gpu/site:${PYTHONPATH:-}"; fi
PYTHONUNBUFFERED=1 python3 bench/gpu_check.py "$@"
