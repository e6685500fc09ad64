#!/usr/bin/env bash
# Builds the Dockerfile's images and checks them. Not part of CI (tens of minutes and several GB
# of downloads; docs/backends.md has the last run's time and sizes).
#
#   sudo [PIP_CERT=ca.pem] bash scripts/check-images.sh [--train] [WORK]   (default WORK /var/tmp/glomscan-images)
#
# - Builder: docker where a Docker engine answers, else buildah (daemonless; as root, vfs storage,
#   chroot isolation), installed from Debian when missing.
# - Base: debian:12-slim from the registry; where it cannot be pulled, the same release (Debian 12
#   bookworm, minbase) is made here with debootstrap and used as the base (the output says so).
# - TensorRT's libraries come from pypi.nvidia.com; where that cannot be reached, the GPU image is
#   built with WITH_TENSORRT=0 (the output says so: TensorRT not checked).
# - cpu image: as its non-root user, with the bundled sample mounted read-only, `glomscan analyze`
#   must give the venv's summary.csv (counts, %GS, interval, tissue area, backend, models).
# - gpu image: `glomscan --version`, `glomscan build-engine --help`, the CUDA runtime bindings,
#   TensorRT and ONNX Runtime's CUDA provider libraries load, and without a GPU `analyze` says so
#   and runs on the CPU. Nothing is run on a GPU here.
# - train image (--train): `glomscan train --help` and torch's CUDA build.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TRAIN=0
if [ "${1:-}" = "--train" ]; then TRAIN=1; shift; fi
WORK=${1:-/var/tmp/glomscan-images}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
VENV_GLOMSCAN=${VENV_GLOMSCAN:-$REPO/.venv/bin/glomscan}
mkdir -p "$WORK"
started=$(date +%s)
say() { echo "[check-images $(( $(date +%s) - started ))s] $*"; }

# -- builder ------------------------------------------------------------------------------------
if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
    BUILDER=docker
else
    [ "$(id -u)" = 0 ] || { echo "no Docker engine here: buildah needs root (sudo bash $0)" >&2; exit 2; }
    command -v buildah > /dev/null || { apt-get update -qq && apt-get install -y -qq buildah; }
    BUILDER=buildah
    BUILDAH=(buildah --storage-driver vfs)
fi
say "builder: $BUILDER"

SECRET=()  # behind an HTTPS-inspecting proxy: pip's CA as a build secret (not stored in the images)
if [ -n "${PIP_CERT:-}" ]; then SECRET=(--secret "id=pip_ca,src=$PIP_CERT"); fi
build() {  # build TARGET TAG [build args...]
    local target=$1 tag=$2; shift 2
    set -- "${SECRET[@]}" "$@"
    local t0; t0=$(date +%s)
    if [ "$BUILDER" = docker ]; then
        docker build --target "$target" -t "$tag" "$@" "$REPO"
    else
        "${BUILDAH[@]}" bud --isolation chroot --format docker --layers=false --target "$target" -t "$tag" "$@" "$REPO"
    fi
    say "built $tag (target $target) in $(( $(date +%s) - t0 )) s"
}
image_size() {
    if [ "$BUILDER" = docker ]; then
        docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'
    else
        "${BUILDAH[@]}" images --format '{{.Size}}' "$1"
    fi
}
run_in() {  # run_in IMAGE [--ro SRC:DST] [--rw SRC:DST] -- COMMAND...   (as the image's user)
    local image=$1; shift
    local mounts=()
    while [ "$1" != "--" ]; do
        case $1 in
            --ro) mounts+=("$2:ro"); shift 2 ;;
            --rw) mounts+=("$2"); shift 2 ;;
        esac
    done
    shift
    if [ "$BUILDER" = docker ]; then
        local args=(); for m in "${mounts[@]}"; do args+=(-v "$m"); done
        docker run --rm "${args[@]}" --entrypoint "$1" "$image" "${@:2}"
    else
        local args=(); for m in "${mounts[@]}"; do args+=(--volume "$m"); done
        local ctr; ctr=$("${BUILDAH[@]}" from -q "$image")
        local rc=0
        "${BUILDAH[@]}" run --isolation chroot --user glomscan "${args[@]}" "$ctr" -- "$@" || rc=$?
        "${BUILDAH[@]}" rm "$ctr" > /dev/null
        return $rc
    fi
}

# -- base -----------------------------------------------------------------------------------------
BASE=debian:12-slim
pull() { if [ "$BUILDER" = docker ]; then docker pull -q "$1"; else "${BUILDAH[@]}" pull -q "docker.io/library/$1"; fi; }
if pull "$BASE" > /dev/null 2>&1; then
    say "base: $BASE pulled from the registry"
else
    BASE=localhost/glomscan-debian:12
    if [ "$BUILDER" = buildah ] && "${BUILDAH[@]}" inspect --type image "$BASE" > /dev/null 2>&1; then
        say "base: debian:12-slim cannot be pulled here; using $BASE (Debian 12 bookworm minbase made with debootstrap earlier)"
    else
        command -v debootstrap > /dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
        rootfs="$WORK/debian12-rootfs"
        rm -rf "$rootfs"
        debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$WORK/debootstrap.log"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        if [ "$BUILDER" = docker ]; then
            tar -C "$rootfs" -c . | docker import - "$BASE"
        else
            ctr=$("${BUILDAH[@]}" from scratch)
            mnt=$("${BUILDAH[@]}" mount "$ctr")
            cp -a "$rootfs"/. "$mnt"/
            "${BUILDAH[@]}" umount "$ctr" > /dev/null
            "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
            "${BUILDAH[@]}" commit -q "$ctr" "$BASE" > /dev/null
            "${BUILDAH[@]}" rm "$ctr" > /dev/null
        fi
        rm -rf "$rootfs"
        say "base: debian:12-slim cannot be pulled here; made the same release (Debian 12 bookworm, minbase) with debootstrap as $BASE"
    fi
fi

# -- TensorRT's index -------------------------------------------------------------------------------
WITH_TENSORRT=1
if ! python3 -c "import urllib.request; urllib.request.urlopen('https://pypi.nvidia.com/', timeout=10)" 2> /dev/null; then
    WITH_TENSORRT=0
    say "pypi.nvidia.com cannot be reached: the gpu image is built with WITH_TENSORRT=0 (no TensorRT; ONNX Runtime CUDA only). TensorRT in the image is NOT checked."
fi

# -- builds -----------------------------------------------------------------------------------------
build cpu glomscan:cpu --build-arg DEBIAN_IMAGE="$BASE"
build gpu glomscan:gpu --build-arg DEBIAN_IMAGE="$BASE" --build-arg WITH_TENSORRT=$WITH_TENSORRT
[ "$TRAIN" = 0 ] || build train glomscan:train --build-arg DEBIAN_IMAGE="$BASE"

# -- cpu image: analyse the sample as the non-root user, slides read-only -------------------------
sample="$REPO/glomscan/sample"
rm -rf "$WORK/cpu-out" "$WORK/venv-out" "$WORK/gpu-out" "$WORK/venv-ort-out"
mkdir -p "$WORK/cpu-out" "$WORK/gpu-out"
chown 10001:10001 "$WORK/cpu-out" "$WORK/gpu-out"
[ "$(run_in glomscan:cpu -- id -u)" = 10001 ] || { echo "FAIL: the cpu image does not run as uid 10001" >&2; exit 1; }
run_in glomscan:cpu --ro "$sample:/slides" --rw "$WORK/cpu-out:/results" -- glomscan analyze /slides --out /results
"$VENV_GLOMSCAN" analyze "$sample" --out "$WORK/venv-out" > "$WORK/venv-analyze.log" 2>&1
compare() {  # compare A.csv B.csv: the columns that carry the answer
    python3 - "$1" "$2" << 'EOF'
import csv, sys
columns = ["slide", "status", "n_glomeruli", "n_normal", "n_sclerosed", "percent_global_glomerulosclerosis",
           "ci95_low", "ci95_high", "tissue_area_mm2", "mpp", "analysis_mpp", "backend", "model_sha256",
           "verifier_id", "n_rejected"]
a, b = ([{c: row[c] for c in columns} for row in csv.DictReader(open(p))] for p in sys.argv[1:])
if a != b:
    sys.exit(f"FAIL: summary.csv differs\n  image: {a}\n  venv:  {b}")
print(f"summary.csv equal on {len(a)} slides ({', '.join(columns)})")
EOF
}
compare "$WORK/cpu-out/summary.csv" "$WORK/venv-out/summary.csv"
say "cpu image: analysed the sample as uid 10001 with /slides read-only; summary.csv matches the venv's"

# -- gpu image: what can be checked without a GPU ---------------------------------------------------
run_in glomscan:gpu -- glomscan --version
run_in glomscan:gpu -- glomscan build-engine --help > /dev/null
run_in glomscan:gpu -- python -c "
import importlib.util, os, ctypes
import onnxruntime as ort
assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()
ort.preload_dlls()
ctypes.CDLL(os.path.join(os.path.dirname(ort.__file__), 'capi', 'libonnxruntime_providers_cuda.so'))
from cuda.bindings import runtime
assert importlib.util.find_spec('torch') is None
print('onnxruntime', ort.__version__, 'CUDA provider libraries load; CUDA runtime bindings import; no torch')
"
if [ "$WITH_TENSORRT" = 1 ]; then
    run_in glomscan:gpu -- python -c "import tensorrt as trt; print('TensorRT', trt.__version__, 'imports')"
fi
run_in glomscan:gpu --ro "$sample:/slides" --rw "$WORK/gpu-out:/results" -- glomscan analyze /slides --out /results \
    > "$WORK/gpu-analyze.log" 2>&1
grep -i "no NVIDIA GPU is visible" "$WORK/gpu-analyze.log" || { echo "FAIL: the gpu image without a GPU did not say so" >&2; exit 1; }
"$VENV_GLOMSCAN" analyze "$sample" --out "$WORK/venv-ort-out" --backend onnxruntime > "$WORK/venv-ort-analyze.log" 2>&1
compare "$WORK/gpu-out/summary.csv" "$WORK/venv-ort-out/summary.csv"
say "gpu image without a GPU: said so, analysed the sample on the CPU (onnxruntime); summary.csv matches the venv's onnxruntime run"
if [ "$TRAIN" = 1 ]; then
    run_in glomscan:train -- glomscan train --help > /dev/null
    run_in glomscan:train -- python -c "import torch; assert torch.version.cuda, 'torch without CUDA'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
fi

# -- sizes ------------------------------------------------------------------------------------------
for tag in glomscan:cpu glomscan:gpu $([ "$TRAIN" = 1 ] && echo glomscan:train); do
    say "size $tag: $(image_size "$tag")"
done
say "done: images built and checked with $BUILDER on $(date -u +%Y-%m-%d); not run here: anything on a GPU$([ "$WITH_TENSORRT" = 0 ] && echo ', TensorRT (not installed)')"
