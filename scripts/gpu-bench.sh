#!/usr/bin/env bash
# GPU proof in one short run (a few minutes): benchmarks/gpu.py on a CUDA machine.
# On a machine without libvips, put wheels of pyvips, pyvips-binary (reads and writes TIFF), cffi,
# pycparser and segmentation-models-pytorch in WHEELS_DIR; they are installed to a private folder.
# Usage: bash scripts/gpu-bench.sh [OUT_DIR] [extra benchmarks/gpu.py options, e.g. --device cpu --quick]
set -euo pipefail
OUT_DIR=${1:-gpu-bench}; shift || true
PYTHON=${PYTHON:-python3}
if [ -n "${WHEELS_DIR:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/glomscan-site "$WHEELS_DIR"/*.whl
    export PYTHONPATH=/tmp/glomscan-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT_DIR"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu.py --json "$OUT_DIR/gpu-bench.json" "$@" 2>&1 | tee "$OUT_DIR/gpu-bench.log"
