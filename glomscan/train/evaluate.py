"""`glomscan evaluate`: a model on a patch set, or analyze outputs against annotated slides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips
from scipy import ndimage

from ..config import AnalysisSettings
from ..model import LoadedModel
from ..postprocess import EIGHT_CONNECTED, glomeruli_in_image
from ..engines.torch_engine import TorchEngine
from ..slides import image_to_array
from .data import (DEFAULT_CLASS_MAP, label_image_from_masks, load_patch, rasterise_polygons, read_qupath_geojson,
                   read_qupath_points)
from .metrics import (dice, glomerulus_counts, instance_matches, known_class_counts, pixel_metrics,
                      sclerosis_percent)


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


# --- a prepared tile + crop set, scored through analyze -----------------------------------------

def write_evaluation(table: pd.DataFrame, out_prefix: Path) -> str:
    """``OUT.csv`` and ``OUT.md`` (the markdown table, returned) of a segmentation evaluation."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_prefix.with_suffix(".csv"), index=False)
    md = markdown_table(table)
    out_prefix.with_suffix(".md").write_text(md)
    return md


def write_inpaint_evaluation(table: pd.DataFrame, summary: pd.DataFrame, out_prefix: Path) -> Path:
    """``OUT.csv`` (one row per crop) and ``OUT.summary.csv`` of an inpainting evaluation;
    returns the per-crop file."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_prefix.with_suffix(".csv"), index=False)
    summary.to_csv(Path(f"{out_prefix}.summary.csv"), index=False)
    return out_prefix.with_suffix(".csv")


def evaluate_prepared_set(model: LoadedModel, dataset_dir: Path, out_dir: Path, backend: str = "auto",
                          split: str = "val", settings: AnalysisSettings | None = None,
                          quiet: bool = True) -> dict:
    """Run ``analyze`` on the split's patches (tiles and composites) and score its outputs:

    (a) detection (IoU >= 0.5) and glomerulus pixel Dice, on the real tiles and on the composites;
    (b) per pasted glomerulus (a graded crop of a validation slide): sclerosed sensitivity,
        specificity and balanced accuracy of the class analyze gave the detection matching it;
    (c) per crop slide: percent global glomerulosclerosis, analyze's (over its detected
        glomeruli) against the pathologists' (over all its crops), and the mean absolute error;
    (d) normal and sclerosed pixel Dice on the composites (pixels of known class).

    Writes ``OUT/analysis`` (analyze's outputs), ``OUT/glomeruli.csv`` (one row per pasted
    glomerulus), ``OUT/slides.csv``, ``OUT/metrics.json`` and ``OUT/metrics.md``; returns the metrics."""
    from ..batch import run_batch
    from ..engines import EngineOptions, create_engine

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    manifest = pd.read_csv(dataset_dir / "manifest.csv")
    manifest = manifest[manifest.split == split] if split != "all" else manifest
    if manifest.empty:
        raise ValueError(f"no patches in split {split!r} of {dataset_dir}")
    info = dataset_info(dataset_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for row in manifest.itertuples():
        target = images / f"{row.patch_id}.png"
        if not target.exists():
            target.write_bytes((dataset_dir / row.image).read_bytes())
    settings = settings or AnalysisSettings(mpp_override=info["target_mpp"], target_mpp=info["target_mpp"])
    engine, choice = create_engine(backend, model, EngineOptions(engine_dir=out_dir / "engines"))
    try:
        run_batch(images, out_dir / "analysis", model, engine, choice, settings, quiet=quiet)
    finally:
        engine.close()
    return score_prepared_set(dataset_dir, manifest, out_dir)


def dataset_info(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {"target_mpp": 1.0}


def score_prepared_set(dataset_dir: Path, manifest: pd.DataFrame, out_dir: Path) -> dict:
    placements_path = Path(dataset_dir) / "glomeruli.csv"
    placements = pd.read_csv(placements_path) if placements_path.is_file() else pd.DataFrame()
    detection: dict[str, dict] = {}
    tp, fp, fn = np.zeros(2), np.zeros(2), np.zeros(2)
    rows = []
    for row in manifest.to_dict("records"):
        result = Path(out_dir) / "analysis" / row["patch_id"]
        if not (result / "mask.tif").is_file():
            raise ValueError(f"analyze produced no mask for {row['patch_id']}: see {result}/report.json")
        pred = image_to_array(pyvips.Image.tiffload(str(result / "mask.tif"), page=0))[..., 0]
        truth = load_patch(dataset_dir, row)[1]
        pred = pred[: truth.shape[0], : truth.shape[1]]
        d = detection.setdefault(row["kind"], {"n_predicted": 0, "n_true": 0, "matched": 0,
                                               "glomerulus": np.zeros(3)})
        inst = instance_matches(pred, truth)
        for k in ("n_predicted", "n_true", "matched"):
            d[k] += inst[k]
        d["glomerulus"] += glomerulus_counts(pred, truth)
        if row["kind"] == "composite":
            t_, f_, n_ = known_class_counts(pred, truth)
            tp, fp, fn = tp + t_, fp + f_, fn + n_
            pred_cc, _ = ndimage.label(pred > 0, structure=EIGHT_CONNECTED)
            for g in placements[placements.patch_id == row["patch_id"]].to_dict("records"):
                box = (slice(g["y0"], g["y1"]), slice(g["x0"], g["x1"]))
                outline = truth[box] == g["label"]
                rows.append({**g, **_match_glomerulus(pred, pred_cc, box, outline)})
    metrics: dict = {}
    for kind, d in detection.items():
        metrics[f"{kind}_detection_recall"] = d["matched"] / max(d["n_true"], 1)
        metrics[f"{kind}_detection_precision"] = d["matched"] / max(d["n_predicted"], 1)
        metrics[f"{kind}_glomeruli_true"] = d["n_true"]
        metrics[f"{kind}_glomeruli_predicted"] = d["n_predicted"]
        metrics[f"{kind}_glomerulus_dice"] = dice(*d["glomerulus"], empty=0.0)
    metrics.update({f"composite_{k}": v for k, v in pixel_metrics(tp, fp, fn).items() if k.startswith("dice")})
    glomeruli = pd.DataFrame(rows)
    if not glomeruli.empty:
        metrics.update(classification_metrics(glomeruli))
        slides = per_slide_sclerosis(glomeruli)
        slides.to_csv(Path(out_dir) / "slides.csv", index=False)
        metrics["slides"] = int(len(slides))
        metrics["sclerosis_pct_mae"] = float(slides.error_points.abs().mean())
        glomeruli.to_csv(Path(out_dir) / "glomeruli.csv", index=False)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (Path(out_dir) / "metrics.md").write_text(real_metrics_markdown(metrics))
    return metrics


def _match_glomerulus(pred: np.ndarray, pred_cc: np.ndarray, box, outline: np.ndarray) -> dict:
    """The predicted glomerulus with the largest overlap with a true outline, its IoU and class."""
    ids = pred_cc[box][outline]
    ids = ids[ids > 0]
    if ids.size == 0:
        return {"detected": False, "iou": 0.0, "predicted_label": 0}
    best = int(np.bincount(ids).argmax())
    component = pred_cc == best
    true_full = np.zeros_like(component)
    true_full[box] = outline
    iou = float((component & true_full).sum() / (component | true_full).sum())
    predicted = int(np.bincount(pred[component], minlength=3)[1:].argmax() + 1)
    return {"detected": iou >= 0.5, "iou": round(iou, 4), "predicted_label": predicted}


def classification_metrics(glomeruli: pd.DataFrame) -> dict:
    """Sclerosed sensitivity / specificity / balanced accuracy over the detected glomeruli, and
    the share of true glomeruli detected."""
    found = glomeruli[glomeruli.detected]
    sclerosed, normal = found[found.label == 2], found[found.label == 1]
    sensitivity = float((sclerosed.predicted_label == 2).mean()) if len(sclerosed) else float("nan")
    specificity = float((normal.predicted_label == 1).mean()) if len(normal) else float("nan")
    return {"glomeruli_graded": int(len(glomeruli)), "glomeruli_detected": int(len(found)),
            "sclerosed_detected": int(len(sclerosed)), "normal_detected": int(len(normal)),
            "sclerosed_sensitivity": sensitivity, "sclerosed_specificity": specificity,
            "balanced_accuracy": (float(np.nanmean([sensitivity, specificity]))
                                  if not (math.isnan(sensitivity) and math.isnan(specificity)) else float("nan"))}


def per_slide_sclerosis(glomeruli: pd.DataFrame) -> pd.DataFrame:
    """Per crop slide: pathologist %GS over the slide's pasted crops, analyze's over those it detected."""
    rows = []
    for slide, g in glomeruli.groupby("slide"):
        found = g[g.detected]
        truth = 100.0 * float((g.label == 2).mean())
        predicted = 100.0 * float((found.predicted_label == 2).mean()) if len(found) else float("nan")
        rows.append({"slide": slide, "glomeruli": len(g), "detected": len(found),
                     "pathologist_percent": round(truth, 2), "predicted_percent": round(predicted, 2),
                     "error_points": round(predicted - truth, 2)})
    return pd.DataFrame(rows)


def real_metrics_markdown(metrics: dict) -> str:
    """The scores of ``evaluate_prepared_set`` as tables next to the targets and the paper."""
    def f(key, digits=3):
        value = metrics.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    lines = [
        "| measure | held-out value | target | paper (EfficientNet-B3 U-Net, AIDPATH Test1) |",
        "|---|---|---|---|",
        f"| detection recall, IoU >= 0.5 (composites: {metrics.get('composite_glomeruli_true', 0)} glomeruli) "
        f"| {f('composite_detection_recall')} | >= 0.90 | – |",
        f"| detection precision, IoU >= 0.5 (composites) | {f('composite_detection_precision')} | >= 0.85 | – |",
        f"| graded (pasted) glomeruli detected | {metrics.get('glomeruli_detected', 0)} of "
        f"{metrics.get('glomeruli_graded', 0)} | – | – |",
        f"| detection recall / precision on the real tiles ({metrics.get('tile_glomeruli_true', 0)} outlined glomeruli) "
        f"| {f('tile_detection_recall')} / {f('tile_detection_precision')} | – | – |",
        f"| glomerulus pixel Dice, composites / real tiles | {f('composite_glomerulus_dice')} / "
        f"{f('tile_glomerulus_dice')} | – | – |",
        f"| sclerosed sensitivity ({metrics.get('sclerosed_detected', 0)} detected sclerosed) "
        f"| {f('sclerosed_sensitivity')} | – | – |",
        f"| sclerosed specificity ({metrics.get('normal_detected', 0)} detected normal) "
        f"| {f('sclerosed_specificity')} | – | – |",
        f"| balanced accuracy | {f('balanced_accuracy')} | >= 0.90 | – |",
        f"| per-slide %GS mean absolute error ({metrics.get('slides', 0)} slides), points "
        f"| {f('sclerosis_pct_mae', 1)} | <= 8 | – |",
        f"| normal pixel Dice (composites, pixels of known class) | {f('composite_dice_normal')} | – | 0.913 |",
        f"| sclerosed pixel Dice | {f('composite_dice_sclerosed')} | – | 0.622 (0.749 with inpainting) |",
        f"| mean pixel Dice | {f('composite_dice_mean')} | – | 0.833 |",
    ]
    return "\n".join(lines) + "\n"
