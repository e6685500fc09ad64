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
# The shipped segmentation model was trained on one H200 by scripts/gpu-train.sh (the set held on
# the GPU; docs/model-card.md), packed with its validation scores and exported; the shipped
# verifier by this script with VERIFIER_ONLY=1 PREVIOUS_MODEL=<the model it replaced>
# (git show c11b89a:glomscan/models/default.onnx > previous.onnx): its hard negatives are mined
# with both segmentation models.
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
PREVIOUS_MODEL=${PREVIOUS_MODEL:-}
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
# Resumes from $WORK/model.last.pt when interrupted.
$GLOMSCAN train segment --data "$WORK/dataset" --out "$WORK/model.pt" --epochs "$EPOCHS" \
    --max-steps-per-epoch "$STEPS" --batch-size "$BATCH" --crop "$CROP" --lr 1e-3 --min-lr 1e-5 --stain-jitter 0.08 \
    --bn-recalibration-steps 10 --tile 1024 --name glomscan-aidpath-pas --seed 0 --workers "$WORKERS" \
    --precision "$PRECISION" --quiet
$GLOMSCAN pack-model "$WORK/model.pt" "$WORK/default.pt" --for-real-tissue \
    --trained-on "AIDPATH PAS (public): 20 of 25 slides' graded glomerulus crops composited into 14 outlined 20x tiles; ${EPOCHS}x${STEPS} steps of ${BATCH}x${CROP} px at 1 um/px ($PRECISION), random init" \
    --intended-use "$INTENDED_USE" --licence "$LICENCE"
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
if [ -n "$PREVIOUS_MODEL" ]; then
    ALSO=(--also-mine-with "$PREVIOUS_MODEL")
    MINED="the false candidates mined from this segmentation model and from its predecessor ($(python -c "from glomscan.model import load_model; print(load_model('$PREVIOUS_MODEL').model_id)"))"
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
