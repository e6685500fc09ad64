"""What the windows' overlap buys: detection, grading and Dice against the number of windows.

The prepared set's patches (512 px at 1 µm/px) fit in one 1024 px window each, so the stride
cannot matter on them. Here they are laid side by side into mosaics (N x N patches, their label
masks and glomerulus boxes moved with them), so that glomeruli sit at every offset from the
window grid, and each mosaic is analysed through ``analyze`` (the evaluation of ``evaluate
real``) at overlaps 512, 384, 256 and 128 px (strides 512, 640, 768 and 896):

- the validation composites (graded glomeruli pasted into held-out tissue): detection recall and
  precision, grading (balanced accuracy), class Dice, per-mosaic %GS error;
- the outlined real tiles (all 17: 14 of them were trained on, so absolute figures flatter the
  model; what is compared here is the stride): detections, false detections per mm².

The patches' seams are edges no slide has; they are the same at every stride. Timing: windows
inferred and seconds per mosaic (one run each, on this machine). ``--needle-runs N`` also times
the needle biopsy of ``benchmarks/vs_monai.py`` (synthetic, 20000x12000 px at 0.5 µm/px, three
cores) through ``analyze`` at each overlap, N runs in turn, ratios within each round.

    python benchmarks/window_stride.py [--data build/default-model/dataset] [--model M] [--verifier V]
        [--backend openvino] [--mosaic 6] [--overlaps 512,384,256,128] [--needle-runs 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from glomscan.config import analysis_settings_for
from glomscan.model import load_model
from glomscan.shipped import default_model_path, default_verifier_path
from glomscan.imaging import write_png
from glomscan.train.dataset.data import load_patch
from glomscan.train.evaluation.analyze_outputs import read_report
from glomscan.train.evaluation.prepared_set import evaluate_prepared_set
from glomscan.verify import load_verifier


def mosaic_set(dataset_dir: Path, rows: pd.DataFrame, n: int, out_dir: Path, kind: str) -> pd.DataFrame:
    """Lay ``rows`` (patches of one size) out as mosaics of n x n into a prepared set in
    ``out_dir`` (images, masks, manifest rows of ``kind``, glomerulus boxes moved along)."""
    placements = pd.read_csv(dataset_dir / "glomeruli.csv")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    manifest, boxes = [], []
    records = rows.to_dict("records")
    per_mosaic = n * n
    for m in range(len(records) // per_mosaic):
        chunk = records[m * per_mosaic:(m + 1) * per_mosaic]
        patches = [load_patch(dataset_dir, r) for r in chunk]
        side = patches[0][0].shape[0]
        image = np.zeros((n * side, n * side, 3), np.uint8)
        labels = np.zeros((n * side, n * side), np.uint8)
        patch_id = f"mosaic_{kind}_{m:02d}"
        for k, (row, (img, lab)) in enumerate(zip(chunk, patches)):
            y, x = (k // n) * side, (k % n) * side
            image[y:y + side, x:x + side], labels[y:y + side, x:x + side] = img, lab
            for g in placements[placements.patch_id == row["patch_id"]].to_dict("records"):
                boxes.append({**g, "patch_id": patch_id, "x0": g["x0"] + x, "x1": g["x1"] + x,
                              "y0": g["y0"] + y, "y1": g["y1"] + y})
        write_png(out_dir / "images" / f"{patch_id}.png", image, compression=1)
        write_png(out_dir / "masks" / f"{patch_id}.png", labels, compression=1)
        manifest.append({**chunk[0], "patch_id": patch_id, "slide": patch_id, "split": "val", "kind": kind,
                         "tile": n * side, "image": f"images/{patch_id}.png", "mask": f"masks/{patch_id}.png"})
    return pd.DataFrame(manifest), pd.DataFrame(boxes)


def needle_timing(model, backend: str, overlaps: list[int], rounds: int) -> dict:
    """Seconds per needle biopsy through analyze at each overlap, ``rounds`` rounds in turn."""
    from glomscan.batch import run_batch
    from glomscan.engines import EngineOptions, create_engine
    from glomscan.synthetic import needle_biopsy_slide

    out: dict = {"seconds": {o: [] for o in overlaps}, "windows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "needle").mkdir()
        needle_biopsy_slide(tmp / "needle" / "biopsy.tif")
        engine, choice = create_engine(backend, model, EngineOptions(engine_dir=tmp / "engines"))
        try:
            for r in range(rounds + 1):  # round 0 warms the engine up, untimed
                for overlap in overlaps:
                    settings = analysis_settings_for(model.card, None, overlap, viewer=False,
                                                     batch_size=engine.preferred_batch_size,
                                                     verify_candidates=model.verifier is not None)
                    t0 = time.perf_counter()
                    report = run_batch(tmp / "needle", tmp / f"out-{overlap}", model, engine, choice, settings,
                                       force=True, quiet=True).reports[0]
                    seconds = time.perf_counter() - t0
                    if r:
                        out["seconds"][overlap].append(round(seconds, 2))
                        out["windows"][overlap] = report.tiles_tissue
                if r:
                    print(f"needle biopsy, round {r}: " + ", ".join(
                        f"stride {model.card.tile - o} {out['seconds'][o][-1]:.1f} s ({out['windows'][o]} windows, "
                        f"x{out['seconds'][o][-1] / out['seconds'][overlaps[0]][-1]:.2f})" for o in overlaps), flush=True)
        finally:
            engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("build/default-model/dataset"))
    ap.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    ap.add_argument("--verifier", type=Path, default=None, help="default: the shipped verifier ('none': without)")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--mosaic", type=int, default=6, help="patches per mosaic side")
    ap.add_argument("--overlaps", default="512,384,256,128")
    ap.add_argument("--needle-runs", type=int, default=0, help="rounds of the needle-biopsy timing (0: none)")
    ap.add_argument("--skip-scores", action="store_true", help="only the needle-biopsy timing")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not (args.data / "manifest.csv").is_file():
        raise SystemExit(f"{args.data}: no prepared set (make default-model prepares it)")
    model = load_model(args.model or default_model_path())
    if str(args.verifier) != "none":
        model.verifier = load_verifier(args.verifier or default_verifier_path())
    manifest = pd.read_csv(args.data / "manifest.csv")
    overlaps = [int(o) for o in args.overlaps.split(",")]
    results: dict = {"model": model.model_id, "verifier": model.verifier.model_id if model.verifier else None,
                     "backend": args.backend, "mosaic": args.mosaic, "runs": {}}
    if args.needle_runs:
        results["needle"] = needle_timing(model, args.backend, overlaps, args.needle_runs)
    if args.skip_scores:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mosaics"
        composites = manifest[(manifest.split == "val") & (manifest.kind == "composite")]
        tiles = manifest[manifest.kind == "tile"]
        m1, b1 = mosaic_set(args.data, composites, args.mosaic, data, "composite")
        m2, _ = mosaic_set(args.data, tiles, int(math.isqrt(len(tiles))), data, "tile")
        pd.concat([m1, m2]).to_csv(data / "manifest.csv", index=False)
        b1.to_csv(data / "glomeruli.csv", index=False)
        (data / "dataset.json").write_text((args.data / "dataset.json").read_text())
        print(f"{model.model_id} + {results['verifier']}, {args.backend}: {len(m1)} mosaics of {args.mosaic}x"
              f"{args.mosaic} validation composites ({len(b1)} graded glomeruli), {len(m2)} mosaic of "
              f"{int(math.isqrt(len(tiles))) ** 2} outlined tiles", flush=True)
        for overlap in overlaps:
            settings = analysis_settings_for(model.card, None, overlap, mpp_override=1.0, target_mpp=1.0,
                                             viewer=False, verify_candidates=model.verifier is not None)
            out = Path(tmp) / f"out-{overlap}"
            t0 = time.perf_counter()
            metrics = evaluate_prepared_set(model, data, out, args.backend, settings=settings, quiet=True)
            seconds = time.perf_counter() - t0
            windows = sum(read_report(out / "analysis" / pid).get("tiles_tissue") or 0
                          for pid in pd.concat([m1, m2]).patch_id)
            keys = ["composite_detection_recall", "composite_detection_precision", "balanced_accuracy",
                    "sclerosed_sensitivity", "sclerosed_specificity", "composite_dice_mean", "sclerosis_pct_mae",
                    "tile_detection_recall", "tile_detection_precision", "tile_false_detections_per_mm2"]
            run = {"stride": model.card.tile - overlap, "windows": windows, "seconds": round(seconds, 1),
                   **{k: metrics.get(k) for k in keys}}
            results["runs"][overlap] = run
            print(f"stride {run['stride']:4d} (overlap {overlap:3d}): {windows:3d} windows, {seconds:5.1f} s | "
                  + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items()
                              if k in keys), flush=True)
    base = results["runs"][overlaps[0]]
    for overlap in overlaps[1:]:
        r = results["runs"][overlap]
        print(f"stride {r['stride']} vs {base['stride']}: windows x{r['windows'] / base['windows']:.2f}, "
              f"time x{r['seconds'] / base['seconds']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
