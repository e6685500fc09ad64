#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), analyses the bundled real PAS sample
# (glomscan/sample) into ./demo-out and scores it against the sample's outlines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/glomscan analyze glomscan/sample --out demo-out
.venv/bin/glomscan evaluate results --results demo-out --truth glomscan/sample --out demo-out/evaluation
echo "Results: demo-out/index.html, demo-out/summary.csv, demo-out/aidpath_<id>/{mask.tif,glomeruli.csv,glomeruli.geojson,overview.png,thumbnail.png,report.json,viewer.html}; against the outlines: demo-out/evaluation.md"
