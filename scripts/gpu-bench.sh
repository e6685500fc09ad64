#!/usr/bin/env bash
# GPU proof in one short run, three parts, each time-boxed (2.5 + 5 + 2.5 min at most; the
# part 2 of an earlier version took a few minutes on an H200):
#   1. the torch CUDA fast path against fp32 (the CUDA tests of tests/engines/test_engines.py);
#   2. benchmarks/gpu.py: model-only vs end-to-end tiles/s for torch CUDA fp32 and fp16, the
#      CPU side against tile-reader threads, slides/hour for a needle biopsy, and a batch of
#      needle biopsies with K = 1, 2, 4, 8, 16 slides in flight (slides/hour, tiles/s, end to end /
#      network only, GPU memory);
#   3. benchmarks/cpu_side.py: null-engine tiles/s against cores (1, 2, 4, 8, 16, those the
#      machine has), one run per core count.
# On a machine without libvips, put wheels of pyvips, pyvips-binary (reads and writes TIFF), cffi,
# pycparser and segmentation-models-pytorch in WHEELS_DIR; they are installed to a private folder.
# Usage: bash scripts/gpu-bench.sh [OUT_DIR] [extra benchmarks/gpu.py options, e.g. --device cpu --quick]
# Environment: PYTHON (python3), WHEELS_DIR, CORES (1,2,4,8,16), CPU_SIDE_RUNS (1), SKIP_TESTS=1,
# SKIP_CPU_SIDE=1, TESTS_TIMEOUT_S (150), GPU_PY_TIMEOUT_S (300; a CPU check with --device cpu --quick
# needs more on 2 cores, and a small --model).
# Results: OUT_DIR/gpu.txt, tests.log, gpu-bench.{log,json}, cpu-side.{log,json}; exit 1 if a part failed.
set -uo pipefail
OUT_DIR=${1:-gpu-bench}; shift || true
PYTHON=${PYTHON:-python3}
T0=$(date +%s)
if [ -n "${WHEELS_DIR:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/glomscan-site \
        "$WHEELS_DIR"/*.whl || exit 1
    export PYTHONPATH=/tmp/glomscan-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
QUICK=""
case " $* " in *" --quick "*) QUICK="--quick" ;; esac
status=0

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== 1. torch CUDA fast path vs fp32 (tests; they skip, with the reason, without a CUDA GPU)"
    timeout "${TESTS_TIMEOUT_S:-150}" "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/engines/test_engines.py -k "cuda" 2>&1 \
        | tee "$OUT_DIR/tests.log" || status=1
fi

echo "== 2. benchmarks/gpu.py ($(( $(date +%s) - T0 )) s in)"
timeout "${GPU_PY_TIMEOUT_S:-300}" "$PYTHON" benchmarks/gpu.py --json "$OUT_DIR/gpu-bench.json" "$@" 2>&1 | tee "$OUT_DIR/gpu-bench.log" || status=1

if [ "${SKIP_CPU_SIDE:-0}" != 1 ]; then
    cpus=$("$PYTHON" -c "import os; print(len(os.sched_getaffinity(0)))")
    cores=$(echo "${CORES:-1,2,4,8,16}" | tr ',' '\n' | awk -v n="$cpus" '$1 <= n' | paste -sd, -)
    echo "== 3. benchmarks/cpu_side.py on ${cores} of ${cpus} cores ($(( $(date +%s) - T0 )) s in)"
    timeout 150 "$PYTHON" benchmarks/cpu_side.py $QUICK --cores "$cores" --runs "${CPU_SIDE_RUNS:-1}" \
        --json "$OUT_DIR/cpu-side.json" 2>&1 | tee "$OUT_DIR/cpu-side.log" || status=1
fi
echo "== done in $(( $(date +%s) - T0 )) s, status $status"
exit $status
