#!/usr/bin/env bash
# Reproduces the shipped model glomscan/models/default.onnx from the public AIDPATH data:
#   prepare (tile set + graded glomerulus crops composited into tissue, split by slide / tile group)
#   -> train segment (EfficientNet-B3 U-Net, random init, partial-label 0.5 BCE + Dice, bf16 on CPU)
#   -> pack-model (fp16, model card) -> evaluate real (validation tiles and crops)
#   -> train verifier (the second stage: ResNet-18 on crops framed on each candidate; the
#      segmentation model's false candidates mined as hard negatives) -> evaluate real with both
#      stages -> pack-verifier (card with its metrics) -> glomscan/models/verifier.onnx.
# CPU recipe (default): about 1 h 45 min on a 2-core bf16-capable CPU for a segmentation model
# of the previous kind (detection recall 0.82, precision 0.98 on the validation composites),
# about 15 min more for the verifier (VERIFIER_ONLY=1 retrains only the verifier, on the shipped model).
# GPU recipe (SEGMENT_RECIPE=gpu, how the shipped segmentation model was made): the segmentation
# model trained by scripts/gpu-train.sh on a CUDA GPU (the set held on the GPU; about 6 min on an
# H200), then packed, scored and exported here. The shipped verifier: this script with
# PREVIOUS_MODELS naming the segmentation models the shipped one replaced
# (git show c11b89a:glomscan/models/default.onnx > e0cc.onnx;
#  git show cc95ddf:glomscan/models/default.onnx > 5f3a.onnx), so that its hard negatives are
# mined with all three.
# Usage: bash scripts/train_default_model.sh [DATA_DIR] [WORK_DIR]   (inside the venv: make setup)
set -euo pipefail
DATA=${1:-../shared/data}
WORK=${2:-build/default-model}
GLOMSCAN=${GLOMSCAN:-glomscan}
EPOCHS=${EPOCHS:-12}
STEPS=${STEPS:-150}
BATCH=${BATCH:-8}
CROP=${CROP:-320}
WORKERS=${WORKERS:-0}
PRECISION=${PRECISION:-auto}
VERIFIER_EPOCHS=${VERIFIER_EPOCHS:-16}
VERIFIER_ONLY=${VERIFIER_ONLY:-0}
PREVIOUS_MODELS=${PREVIOUS_MODELS:-${PREVIOUS_MODEL:-}}
SEGMENT_RECIPE=${SEGMENT_RECIPE:-cpu}
export PYTHONHASHSEED=0
for d in "$DATA/aidpath_tiles" "$DATA/aidpath_glomeruli"; do
    [ -d "$d" ] || { echo "missing $d (the public AIDPATH tiles and glomerulus crops)" >&2; exit 2; }
done
mkdir -p "$WORK"
if [ ! -f "$WORK/dataset/manifest.csv" ]; then
    rm -rf "$WORK/dataset"
    $GLOMSCAN prepare --tiles "$DATA/aidpath_tiles" --tiles-mpp 0.5 --crops "$DATA/aidpath_glomeruli" \
        --out "$WORK/dataset" --val-fraction 0.2 --seed 0
fi
LICENCE="CC BY-NC-SA 4.0 (non-commercial research); trained on AIDPATH (Bueno et al. 2020, CC BY 4.0) and Weishaupt et al. 2025 crops (CC BY-NC-SA 4.0)"
INTENDED_USE="research use only (weights inherit CC BY-NC-SA 4.0 from the AIDPATH glomerulus crops); PAS-stained kidney tissue at 20x or finer; not a medical device"
if [ "$VERIFIER_ONLY" != 1 ]; then
if [ "$SEGMENT_RECIPE" = gpu ]; then
# scripts/gpu-train.sh's segmentation stage on this machine's GPU, on the set prepared above.
mkdir -p "$WORK/gpu-train"
ln -sfn "$(realpath "$WORK/dataset")" "$WORK/gpu-train/dataset"
VERIFIER_EPOCHS=0 WORK="$WORK/gpu-train" PYTHON="$(command -v python)" \
    bash "$(dirname "$0")/gpu-train.sh" "$WORK/dataset" "$WORK/gpu-train/results"
cp "$WORK/gpu-train/default.pt" "$WORK/default.pt"
else
# Resumes from $WORK/model.last.pt when interrupted.
$GLOMSCAN train segment --data "$WORK/dataset" --out "$WORK/model.pt" --epochs "$EPOCHS" \
    --max-steps-per-epoch "$STEPS" --batch-size "$BATCH" --crop "$CROP" --lr 1e-3 --min-lr 1e-5 --stain-jitter 0.08 \
    --bn-recalibration-steps 10 --tile 1024 --name glomscan-aidpath-pas --seed 0 --workers "$WORKERS" \
    --precision "$PRECISION" --quiet
$GLOMSCAN pack-model "$WORK/model.pt" "$WORK/default.pt" --for-real-tissue \
    --trained-on "AIDPATH PAS (public): 20 of 25 slides' graded glomerulus crops composited into 14 outlined 20x tiles; ${EPOCHS}x${STEPS} steps of ${BATCH}x${CROP} px at 1 um/px ($PRECISION), random init" \
    --intended-use "$INTENDED_USE" --licence "$LICENCE"
fi
# The packed (fp16) model is what ships: score it through analyze, record the scores in its card,
# and ship it as an ONNX model file (runs without torch; the torch network is rebuilt from it).
rm -rf "$WORK/validation"
$GLOMSCAN evaluate real --model "$WORK/default.pt" --data "$WORK/dataset" --out "$WORK/validation"
$GLOMSCAN pack-model "$WORK/default.pt" "$WORK/default.pt" --validation "$WORK/validation/metrics.json"
$GLOMSCAN export-onnx --model "$WORK/default.pt" --out glomscan/models/default.onnx --model-file
fi
# The second stage, trained against the shipped segmentation model's candidates (resumes from
# $WORK/verifier/verifier.last.pt), scored with it through analyze, its card completed, shipped.
ALSO=(); MINED="the shipped segmentation model's mined false candidates"
if [ -n "$PREVIOUS_MODELS" ]; then
    IDS=()
    for previous in $PREVIOUS_MODELS; do
        ALSO+=(--also-mine-with "$previous")
        IDS+=("$(python -c "from glomscan.model import load_model; print(load_model('$previous').model_id)")")
    done
    MINED="the false candidates mined from this segmentation model and from its predecessors (${IDS[*]})"
fi
$GLOMSCAN train verifier --data "$WORK/dataset" --model glomscan/models/default.onnx --out "$WORK/verifier" \
    "${ALSO[@]}" --epochs "$VERIFIER_EPOCHS" --backend openvino --seed 0 --name glomscan-verifier-aidpath-pas \
    --trained-on "AIDPATH PAS (public): the outlined glomeruli of the prepared set (graded crops composited into 14 tiles, and the tiles' own glomeruli of unknown class), random tissue boxes and ${MINED}; ${VERIFIER_EPOCHS} epochs, bf16 on a CPU, random init" \
    --licence "$LICENCE" --intended-use "$INTENDED_USE" --quiet
rm -rf "$WORK/validation-pair"
$GLOMSCAN evaluate real --model glomscan/models/default.onnx --verifier "$WORK/verifier/verifier.onnx" \
    --backend onnxruntime --data "$WORK/dataset" --out "$WORK/validation-pair"
$GLOMSCAN pack-verifier "$WORK/verifier/verifier.onnx" glomscan/models/verifier.onnx \
    --validation "$WORK/validation-pair/metrics.json"
