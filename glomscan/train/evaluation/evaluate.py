"""``evaluate segment`` and ``evaluate results``: a model on a prepared patch set, or analyze's
outputs against annotated slides, scored per class pixel by pixel and glomerulus by glomerulus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips

from ...model import LoadedModel
from ...postprocess import glomeruli_in_image
from ...engines.torch_engine import TorchEngine
from ...imaging import image_to_array
from ...qupath import read_qupath_geojson, read_qupath_points
from ..dataset.data import DEFAULT_CLASS_MAP, label_image_from_masks, load_patch, rasterise_polygons
from .metrics import dice, glomerulus_counts, instance_matches, known_class_counts, pixel_metrics, sclerosis_percent


class _Scores:
    """Pixel and detection counts summed over items; one row per item plus an ALL row."""

    def __init__(self):
        self.tp, self.fp, self.fn = np.zeros(2), np.zeros(2), np.zeros(2)
        self.glomerulus = np.zeros(3)  # tp, fp, fn of glomerulus (any class) vs background
        self.detection = {"n_predicted": 0, "n_true": 0, "matched": 0, "class_agreement": 0}
        self.rows: list[dict] = []

    def add(self, item: str, pred: np.ndarray, truth: np.ndarray, points=(), **extra) -> dict:
        t, f, n = known_class_counts(pred, truth)
        self.tp, self.fp, self.fn = self.tp + t, self.fp + f, self.fn + n
        g = glomerulus_counts(pred, truth)
        self.glomerulus += g
        inst = instance_matches(pred, truth, true_points=points)
        for k in self.detection:
            self.detection[k] += inst[k]
        row = {"item": item, **pixel_metrics(t, f, n), "dice_glomerulus": dice(*g), **inst, **extra}
        self.rows.append(row)
        return row

    def overall(self) -> dict:
        d = self.detection
        p, r = d["matched"] / max(d["n_predicted"], 1), d["matched"] / max(d["n_true"], 1)
        return {"item": "ALL", **pixel_metrics(self.tp, self.fp, self.fn),
                "dice_glomerulus": dice(*self.glomerulus), "detection_precision": p,
                "detection_recall": r, "detection_f1": 2 * p * r / (p + r) if p + r else 0.0, **d}


def evaluate_patch_set(model: LoadedModel, dataset_dir: Path, split: str = "val", batch_size: int = 2) -> pd.DataFrame:
    """Per-patch and overall pixel metrics and detection metrics of a model on a dataset split."""
    engine = TorchEngine(model)
    manifest = pd.read_csv(Path(dataset_dir) / "manifest.csv")
    if split != "all":
        manifest = manifest[manifest.split == split]
    if manifest.empty:
        raise ValueError(f"no patches in split {split!r} of {dataset_dir}")
    scores = _Scores()
    records = manifest.to_dict("records")
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        patches = [load_patch(dataset_dir, r) for r in chunk]
        probs = engine.predict(np.stack([p[0] for p in patches]))
        for record, (_, truth), p in zip(chunk, patches, probs):
            scores.add(record["patch_id"], predicted_labels(p), truth)
    return pd.DataFrame([*scores.rows, scores.overall()])


def predicted_labels(probabilities: np.ndarray, threshold: float = 0.5, min_area_px: float = 0.0) -> np.ndarray:
    """(2, H, W) probabilities -> labels 0/1/2 as analyze paints them: glomeruli are connected
    components of max probability >= threshold, each classified by ``glomerulus_class``."""
    _, labels = glomeruli_in_image(probabilities, ("normal", "sclerosed"), min_area_px, threshold)
    return labels


def slide_truth(truth_dir: Path, stem: str, width: int, height: int, downsample: float, class_map: dict) -> np.ndarray:
    """Truth labels of a whole slide at analysis resolution (GeoJSON, label image or masks)."""
    geojson = Path(truth_dir) / f"{stem}.geojson"
    if geojson.is_file():
        polygons, _ = read_qupath_geojson(geojson, class_map)
        return rasterise_polygons(polygons, 0, 0, width, height, downsample)
    image, _ = label_image_from_masks(truth_dir, stem, width, height)
    return image_to_array(image)[..., 0]


def slide_truth_points(truth_dir: Path, stem: str, downsample: float, class_map: dict) -> list[tuple[float, float, int]]:
    """Glomeruli marked by a point only (a reviewed slide's missed ones): (x, y, label) at analysis resolution."""
    geojson = Path(truth_dir) / f"{stem}.geojson"
    if not geojson.is_file():
        return []
    return [(p.x / downsample, p.y / downsample, p.label) for p in read_qupath_points(geojson, class_map)]


def evaluate_results(results_dir: Path, truth_dir: Path, class_map: dict | None = None) -> pd.DataFrame:
    """Compare analyze outputs (mask.tif, report.json per slide) with annotated slides: QuPath
    GeoJSON, label images, or the corrections files of the review page (glomeruli marked by a
    point count as true glomeruli, detected when a predicted one contains the point)."""
    class_map = class_map or DEFAULT_CLASS_MAP
    scores = _Scores()
    for folder in sorted(p for p in Path(results_dir).iterdir() if (p / "mask.tif").is_file()):
        report = json.loads((folder / "report.json").read_text())
        mask = pyvips.Image.tiffload(str(folder / "mask.tif"), page=0)
        pred = image_to_array(mask)[..., 0]
        stem = Path(report["path"]).stem
        truth = slide_truth(truth_dir, stem, mask.width, mask.height, report["analysis_downsample"], class_map)
        points = slide_truth_points(truth_dir, stem, report["analysis_downsample"], class_map)
        truth_pct = sclerosis_percent(truth, points)
        reported = report.get("percent_global_glomerulosclerosis")
        error = (reported - truth_pct) if reported is not None and not math.isnan(truth_pct) else None
        scores.add(folder.name, pred, truth, points, sclerosis_pct_true=truth_pct, sclerosis_pct_reported=reported,
                   sclerosis_pct_error=error)
    if not scores.rows:
        raise ValueError(f"no analyze outputs (mask.tif) under {results_dir}")
    overall = scores.overall()
    errors = [abs(r["sclerosis_pct_error"]) for r in scores.rows if r["sclerosis_pct_error"] is not None]
    overall["sclerosis_pct_mae"] = float(np.mean(errors)) if errors else None
    return pd.DataFrame([*scores.rows, overall])


def _fmt(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.3f}"


def markdown_table(table: pd.DataFrame) -> str:
    """The paper-style summary: precision / recall / F1 / Dice per class and mean, plus detection."""
    row = table[table["item"] == "ALL"].iloc[0]
    lines = ["| class | precision | recall | F1 | Dice |", "|---|---|---|---|---|"]
    for key in ("normal", "sclerosed", "mean"):
        lines.append(f"| {key} | " + " | ".join(_fmt(row[f'{m}_{key}']) for m in ("precision", "recall", "f1", "dice")) + " |")
    lines.append(f"| glomerulus (any class) | | | | {_fmt(row['dice_glomerulus'])} |")
    lines += ["", "| glomerulus detection (IoU >= 0.5) | precision | recall | F1 |", "|---|---|---|---|",
              f"| {int(row['matched'])} matched of {int(row['n_true'])} true, {int(row['n_predicted'])} predicted | "
              f"{row['detection_precision']:.3f} | {row['detection_recall']:.3f} | {row['detection_f1']:.3f} |"]
    if "sclerosis_pct_mae" in row and row["sclerosis_pct_mae"] is not None and not pd.isna(row["sclerosis_pct_mae"]):
        lines += ["", f"Per-slide sclerosis % mean absolute error: {row['sclerosis_pct_mae']:.2f} percentage points"]
    return "\n".join(lines) + "\n"



def write_evaluation(table: pd.DataFrame, out_prefix: Path) -> str:
    """``OUT.csv`` and ``OUT.md`` (the markdown table, returned) of a segmentation evaluation."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_prefix.with_suffix(".csv"), index=False)
    md = markdown_table(table)
    out_prefix.with_suffix(".md").write_text(md)
    return md
