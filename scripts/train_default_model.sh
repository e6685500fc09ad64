#!/usr/bin/env bash
# Reproduces the shipped model glomscan/models/default.pt from the public AIDPATH data:
#   prepare (tile set + graded glomerulus crops composited into tissue, split by slide / tile group)
#   -> train segment (EfficientNet-B3 U-Net, random init, partial-label 0.5 BCE + Dice, bf16 on CPU)
#   -> pack-model (fp16, model card) -> evaluate real (validation tiles and crops).
# About 75 minutes on a 2-core bf16-capable CPU (2 of them preparing), less on a GPU.
# Usage: bash scripts/train_default_model.sh [DATA_DIR] [WORK_DIR]   (inside the venv: make setup)
set -euo pipefail
DATA=${1:-../shared/data}
WORK=${2:-build/default-model}
GLOMSCAN=${GLOMSCAN:-glomscan}
EPOCHS=${EPOCHS:-12}
STEPS=${STEPS:-150}
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
# Resumes from $WORK/model.last.pt when interrupted.
$GLOMSCAN train segment --data "$WORK/dataset" --out "$WORK/model.pt" --epochs "$EPOCHS" \
    --max-steps-per-epoch "$STEPS" --batch-size 8 --crop 320 --lr 1e-3 --min-lr 1e-5 --stain-jitter 0.08 \
    --bn-recalibration-steps 10 --tile 1024 --name glomscan-aidpath-pas --seed 0 --quiet
$GLOMSCAN pack-model "$WORK/model.pt" glomscan/models/default.pt --for-real-tissue \
    --trained-on "AIDPATH PAS (public): 20 of 25 slides' graded glomerulus crops composited into 14 outlined 20x tiles; ${EPOCHS}x${STEPS} steps of 8x320 px at 1 um/px, random init" \
    --intended-use "research use only (weights inherit CC BY-NC-SA 4.0 from the AIDPATH glomerulus crops); PAS-stained kidney tissue at 20x or finer; not a medical device" \
    --licence "CC BY-NC-SA 4.0 (non-commercial research); trained on AIDPATH (Bueno et al. 2020, CC BY 4.0) and Weishaupt et al. 2025 crops (CC BY-NC-SA 4.0)"
# The packed (fp16) model is what ships: score it through analyze, then record the scores in its card.
rm -rf "$WORK/validation"
$GLOMSCAN evaluate real --model glomscan/models/default.pt --data "$WORK/dataset" --out "$WORK/validation"
$GLOMSCAN pack-model glomscan/models/default.pt glomscan/models/default.pt --validation "$WORK/validation/metrics.json"
