#!/usr/bin/env bash
# Both stages trained on one GPU in one time-boxed run, the training set held on the GPU:
#   1. unpack the compact training set (python -m glomscan.train.dataset.compact pack DATASET PACK.tar,
#      about 37 MB for the AIDPATH set: tiles and masks whole, composites as their pasted boxes);
#   2. train segment --data-on-device (crops, flips, rotations, stain and JPEG augmentation cut
#      on the GPU; no loader processes), bf16; pack-model;
#   3. train verifier: mining with that model (torch engine on the GPU), samples, training (its
#      samples already live on the training device);
#   4. the packed model, the verifier and the logs as one tar cut into 15 MB parts in OUT_DIR
#      (join them with: cat OUT_DIR/results.tar.part-* | tar x).
# Scoring and shipping happen afterwards on any machine: evaluate real, pack-model --validation,
# export-onnx --model-file, pack-verifier (scripts/train_default_model.sh's last steps).
# Usage: bash scripts/gpu-train.sh [PACK] [OUT_DIR]
# Environment: PYTHON (python3), WHEELS_DIR (wheels of pyvips, pyvips-binary, cffi, pycparser and
# segmentation-models-pytorch where they are missing; installed to a private folder), DEVICE
# (cuda), WORK (build/gpu-train), EPOCHS (8), STEPS (350), BATCH (32), CROP (384), LR (1e-3),
# STAIN (0.1), JPEG_MIN_QUALITY (60), SCALE (0.2), SEGMENT_TIMEOUT_S (270), VERIFIER_EPOCHS (16),
# VERIFIER_TIMEOUT_S (150); VERIFIER_EPOCHS=0 trains the segmentation model alone. A CPU check: DEVICE=cpu EPOCHS=1 STEPS=2 BATCH=2 CROP=128 VERIFIER_EPOCHS=1.
set -uo pipefail
PACK=${1:-.gpu/dataset.tar}
OUT_DIR=${2:-gpu-train}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-build/gpu-train}
EPOCHS=${EPOCHS:-8}; STEPS=${STEPS:-350}; BATCH=${BATCH:-32}; CROP=${CROP:-384}; LR=${LR:-1e-3}
STAIN=${STAIN:-0.1}; JPEG_MIN_QUALITY=${JPEG_MIN_QUALITY:-60}; SCALE=${SCALE:-0.2}
VERIFIER_EPOCHS=${VERIFIER_EPOCHS:-16}
T0=$(date +%s)
if [ -n "${WHEELS_DIR:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/glomscan-site \
        "$WHEELS_DIR"/*.whl || exit 1
    export PYTHONPATH=/tmp/glomscan-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0
mkdir -p "$OUT_DIR" "$WORK"
log() { echo "== $* ($(( $(date +%s) - T0 )) s in)"; }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import pyvips, segmentation_models_pytorch, torch; print('libvips', pyvips.version(0), pyvips.version(1), \
'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
status=0
glomscan() { "$PYTHON" -m glomscan "$@"; }

log "1. unpack $PACK"
[ -f "$WORK/dataset/manifest.csv" ] || "$PYTHON" -m glomscan.train.dataset.compact unpack "$PACK" "$WORK/dataset" || exit 1

log "2. train segment on $DEVICE: ${EPOCHS}x${STEPS} steps of ${BATCH}x${CROP} px, data on the device"
timeout "${SEGMENT_TIMEOUT_S:-270}" "$PYTHON" -m glomscan train segment --data "$WORK/dataset" --out "$WORK/model.pt" \
    --epochs "$EPOCHS" --max-steps-per-epoch "$STEPS" --batch-size "$BATCH" --crop "$CROP" --lr "$LR" --min-lr 1e-5 \
    --stain-jitter "$STAIN" --jpeg-min-quality "$JPEG_MIN_QUALITY" --scale-jitter "$SCALE" --bn-recalibration-steps 10 --tile 1024 \
    --name glomscan-aidpath-pas --seed 0 --device "$DEVICE" --precision bf16 --data-on-device --quiet \
    2>&1 | tee "$WORK/segment.log" || status=1
cat "$WORK/model.metrics.csv" 2> /dev/null | cut -d, -f1-4,6-12
LICENCE="CC BY-NC-SA 4.0 (non-commercial research); trained on AIDPATH (Bueno et al. 2020, CC BY 4.0) and Weishaupt et al. 2025 crops (CC BY-NC-SA 4.0)"
INTENDED_USE="research use only (weights inherit CC BY-NC-SA 4.0 from the AIDPATH glomerulus crops); PAS-stained kidney tissue at 20x or finer; not a medical device"
if [ -f "$WORK/model.pt" ]; then
    epochs_done=$(($(wc -l < "$WORK/model.metrics.csv") - 1))
    glomscan pack-model "$WORK/model.pt" "$WORK/default.pt" --for-real-tissue \
        --trained-on "AIDPATH PAS (public): 20 of 25 slides' graded glomerulus crops composited into 14 outlined 20x tiles; ${epochs_done} of ${EPOCHS} planned epochs of ${STEPS} steps of ${BATCH}x${CROP} px at 1 um/px on one GPU (bf16; the set held on the GPU: random crops, scale ${SCALE}, flips and rotations, JPEG 4:2:0 quality >= ${JPEG_MIN_QUALITY}, stain ${STAIN}), random init" \
        --intended-use "$INTENDED_USE" --licence "$LICENCE" || status=1
fi

if [ -f "$WORK/default.pt" ] && [ "$VERIFIER_EPOCHS" -gt 0 ]; then
    log "3. train verifier on $DEVICE (mining with the new model)"
    timeout "${VERIFIER_TIMEOUT_S:-150}" "$PYTHON" -m glomscan train verifier --data "$WORK/dataset" \
        --model "$WORK/default.pt" --out "$WORK/verifier" --epochs "$VERIFIER_EPOCHS" --backend torch \
        --device "$DEVICE" --seed 0 --name glomscan-verifier-aidpath-pas \
        --trained-on "AIDPATH PAS (public): the outlined glomeruli of the prepared set (graded crops composited into 14 tiles, and the tiles' own glomeruli of unknown class), random tissue boxes and the segmentation model's mined false candidates; ${VERIFIER_EPOCHS} epochs on one GPU, random init" \
        --licence "$LICENCE" --intended-use "$INTENDED_USE" --quiet 2>&1 | tee "$WORK/verifier.log" || status=1
    cat "$WORK/verifier/verifier.metrics.csv" 2> /dev/null | cut -d, -f1-11
fi

log "4. results"
(cd "$WORK" && tar cf - default.pt model.metrics.csv segment.log verifier.log verifier/verifier.onnx \
    verifier/verifier.metrics.csv verifier/mined.csv verifier/samples.csv 2> /dev/null) \
    | split -b 15M -d - "$OUT_DIR/results.tar.part-"
ls -la "$OUT_DIR"
log "done, status $status"
exit $status
