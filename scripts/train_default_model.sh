#!/usr/bin/env bash
# Reproduces the default model shipped as glomscan/models/default.pt (CPU, about 15 minutes on
# 2 cores): synthetic PAS-like slides with QuPath annotations -> prepare -> train -> fp16 pack.
# Usage: bash scripts/train_default_model.sh [WORK_DIR]   (run inside the venv: make setup)
set -euo pipefail
WORK=${1:-build/default-model}
GLOMSCAN=${GLOMSCAN:-glomscan}
export PYTHONHASHSEED=0
rm -rf "$WORK"
$GLOMSCAN synth-slides "$WORK/synthetic" --count 12 --seed 100
$GLOMSCAN prepare --slides "$WORK/synthetic/slides" --annotations "$WORK/synthetic/annotations" \
    --out "$WORK/dataset" --val-fraction 0.2 --seed 0
$GLOMSCAN train segment --data "$WORK/dataset" --out "$WORK/model.pt" --epochs 10 --batch-size 4 --crop 256 \
    --lr 1e-3 --max-steps-per-epoch 60 --name glomscan-demo-synthetic --seed 0
$GLOMSCAN pack-model "$WORK/model.pt" glomscan/models/default.pt --name glomscan-demo-synthetic \
    --trained-on "DEMO ONLY: 10 synthetic PAS-like slides (glomscan synth-slides --seed 100), 256 px crops, 10 epochs x 15 steps on CPU"
$GLOMSCAN evaluate --model glomscan/models/default.pt --data "$WORK/dataset" --split val --out "$WORK/validation"
