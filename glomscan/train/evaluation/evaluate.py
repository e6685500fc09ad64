"""`glomscan evaluate`: a model on a patch set, or analyze outputs against annotated slides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips
from scipy import ndimage

from ...config import AnalysisSettings, analysis_settings_for
from ...labels import NORMAL, SCLEROSED
from ...model import LoadedModel
from ...postprocess import EIGHT_CONNECTED, glomeruli_in_image
from ...report import REJECTED_FILE, polygon_mask
from ...engines.torch_engine import TorchEngine
from ...imaging import image_to_array
from ...qupath import read_qupath_geojson, read_qupath_points
from ..dataset.data import DEFAULT_CLASS_MAP, label_image_from_masks, load_patch, rasterise_polygons
from .metrics import (dice, glomerulus_counts, instance_matches, known_class_counts, match_components,
                      pixel_metrics, sclerosis_percent)


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
    (d) normal and sclerosed pixel Dice on the composites (pixels of known class);
    (e) on the real outlined tiles (glomeruli of unknown class), for the accepted glomeruli
        ("with verifier", keys ``tile_...``) and for every candidate of the segmentation model
        (the accepted plus the verifier's rejected ones of ``rejected.geojson`` with their
        candidate class, keys ``tile_segmentation_only_...``): detections, matched outlines,
        precision and recall (IoU >= 0.5), false detections (matching no outline), their number
        per mm² of tissue (report.json's tissue_area_mm2 summed over the tiles) and how many of
        them are called sclerosed (majority label). Without a verifier both are the same.

    A model with a verifier attached (``model.verifier``) runs it unless ``settings`` turn it
    off. Writes ``OUT/analysis`` (analyze's outputs), ``OUT/glomeruli.csv`` (one row per pasted
    glomerulus), ``OUT/slides.csv``, ``OUT/metrics.json`` and ``OUT/metrics.md``; returns the metrics."""
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
    settings = settings or analysis_settings_for(model.card, mpp_override=info["target_mpp"],
                                                 target_mpp=info["target_mpp"])
    analyse_folder(model, images, out_dir, backend, settings, quiet)
    return score_prepared_set(dataset_dir, manifest, out_dir)


def analyse_folder(model: LoadedModel, images: Path, out_dir: Path, backend: str, settings: AnalysisSettings,
                   quiet: bool) -> None:
    """``analyze`` of the images in ``images`` into ``out_dir/analysis`` (engines cached in
    ``out_dir/engines``): what every evaluation through analyze scores."""
    from ...batch import run_batch
    from ...engines import EngineOptions, create_engine

    engine, choice = create_engine(backend, model, EngineOptions(engine_dir=out_dir / "engines"))
    try:
        run_batch(images, out_dir / "analysis", model, engine, choice, settings, quiet=quiet)
    finally:
        engine.close()


def dataset_info(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {"target_mpp": 1.0}


def score_prepared_set(dataset_dir: Path, manifest: pd.DataFrame, out_dir: Path) -> dict:
    """Score analyze's outputs under ``OUT/analysis`` against the prepared set (see
    ``evaluate_prepared_set``); writes and returns the metrics."""
    placements_path = Path(dataset_dir) / "glomeruli.csv"
    placements = pd.read_csv(placements_path) if placements_path.is_file() else pd.DataFrame()
    detection: dict[str, dict] = {}
    real = _RealTileScores()
    tp, fp, fn = np.zeros(2), np.zeros(2), np.zeros(2)
    rows = []
    for row in manifest.to_dict("records"):
        result = Path(out_dir) / "analysis" / row["patch_id"]
        if not (result / "mask.tif").is_file():
            raise ValueError(f"analyze produced no mask for {row['patch_id']}: see {result}/report.json")
        pred = read_mask(result)
        truth = load_patch(dataset_dir, row)[1]
        pred = pred[: truth.shape[0], : truth.shape[1]]
        d = detection.setdefault(row["kind"], {"n_predicted": 0, "n_true": 0, "matched": 0,
                                               "glomerulus": np.zeros(3)})
        inst = instance_matches(pred, truth)
        for k in ("n_predicted", "n_true", "matched"):
            d[k] += inst[k]
        d["glomerulus"] += glomerulus_counts(pred, truth)
        if row["kind"] == "tile":
            real.add(result, pred, truth)
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
    if real.patches:
        metrics.update(real.metrics())
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


# --- real outlined tissue: false detections, with and without the verifier ---------------------

CLASS_LABELS = {"normal": 1, "sclerosed": 2}


def read_mask(result_dir: Path) -> np.ndarray:
    """analyze's label image (0 background, 1 normal, 2 sclerosed) at analysis resolution."""
    return image_to_array(pyvips.Image.tiffload(str(Path(result_dir) / "mask.tif"), page=0))[..., 0]


def read_report(result_dir: Path) -> dict:
    """analyze's report.json of one image ({} when there is none)."""
    path = Path(result_dir) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_rejected(result_dir: Path) -> list[tuple[np.ndarray, int]]:
    """The verifier's rejected candidates of one image: (ring as (x, y) level-0 pixels, label of
    the class the segmentation model gave it: 1 normal, 2 sclerosed); [] without rejected.geojson."""
    path = Path(result_dir) / REJECTED_FILE
    if not path.is_file():
        return []
    out = []
    for feature in json.loads(path.read_text()).get("features", []):
        geometry = feature.get("geometry") or {}
        if geometry.get("type") != "Polygon" or not geometry.get("coordinates"):
            continue
        properties = feature.get("properties") or {}
        candidate = (properties.get("glomscan") or {}).get("candidate_class")
        if candidate not in CLASS_LABELS:  # older or hand-made file: the class probabilities decide
            m = properties.get("measurements") or {}
            candidate = "sclerosed" if m.get("p_sclerosed", 0.0) > m.get("p_normal", 0.0) else "normal"
        out.append((np.asarray(geometry["coordinates"][0], np.float64).reshape(-1, 2), CLASS_LABELS[candidate]))
    return out


def candidate_labels(pred: np.ndarray, rejected: list[tuple[np.ndarray, int]],
                     downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """What the segmentation stage alone found: analyze's labels with the rejected candidates
    painted back (their candidate class) on background pixels, and an instance image that keeps
    every candidate its own object (a repainted outline touching an accepted glomerulus does not
    merge with it). Rings are level-0 pixel-edge coordinates; ``downsample`` = level-0 pixels per
    analysis pixel."""
    components, n = ndimage.label(pred > 0, structure=EIGHT_CONNECTED)
    labels = pred.copy()
    h, w = pred.shape
    for ring, label in rejected:
        x, y = ring[:, 0] / downsample, ring[:, 1] / downsample
        inside = polygon_mask(y - 0.5, x - 0.5, (h, w)) & (labels == 0)
        if not inside.any():  # smaller than a pixel at this resolution: its centre pixel
            cx, cy = int(np.floor(x.mean())), int(np.floor(y.mean()))
            if not (0 <= cx < w and 0 <= cy < h) or labels[cy, cx]:
                continue
            inside[cy, cx] = True
        n += 1
        components[inside] = n
        labels[inside] = label
    return labels, components


def _component_classes(pred: np.ndarray, components: np.ndarray, n: int) -> np.ndarray:
    """Per component 1..n (index 0 unused): the majority label (1 normal, 2 sclerosed; ties normal)."""
    counts = np.bincount(components.ravel().astype(np.int64) * 3 + np.minimum(pred, 2).ravel(),
                         minlength=(n + 1) * 3).reshape(n + 1, 3)
    return counts[:, 1:].argmax(axis=1) + 1


def false_detections(pred_labels: np.ndarray, true_labels: np.ndarray, iou_threshold: float = 0.5,
                     components: np.ndarray | None = None) -> dict:
    """Predicted glomeruli that match no true glomerulus, and how many of them are called sclerosed.

    Predicted glomeruli are the 8-connected components of ``pred_labels > 0`` (or the objects
    1..n of ``components``), true ones those of ``true_labels > 0``; they match one-to-one,
    greedily by IoU >= ``iou_threshold``, as in ``metrics.instance_matches``. A component's class
    is its majority label (1 normal, 2 sclerosed). Returns n_predicted, n_true, matched, false
    (predicted, matched to nothing) and false_sclerosed."""
    if components is None:
        components, n_pred = ndimage.label(pred_labels > 0, structure=EIGHT_CONNECTED)
    else:
        n_pred = int(components.max(initial=0))
    true_cc, n_true = ndimage.label(true_labels > 0, structure=EIGHT_CONNECTED)
    matched = {i for i, _ in match_components(components, n_pred, true_cc, n_true, iou_threshold)}
    present = np.zeros(n_pred + 1, bool)
    present[np.unique(components)] = True  # ids with no pixel left (cropped away) are no detection
    present[0] = False
    false = present.copy()
    false[list(matched)] = False
    classes = _component_classes(pred_labels, components, n_pred)
    return {"n_predicted": int(present.sum()), "n_true": int(n_true), "matched": len(matched),
            "false": int(false.sum()), "false_sclerosed": int((false & (classes == SCLEROSED)).sum())}


class _RealTileScores:
    """Detection and false-detection counts on the real outlined tiles, of analyze's accepted
    glomeruli ("with verifier") and of every candidate the segmentation model found
    ("segmentation only": the accepted plus the verifier's rejected ones)."""

    STAGES = ("with_verifier", "segmentation_only")

    def __init__(self):
        self.counts = {s: {"n_predicted": 0, "n_true": 0, "matched": 0, "false": 0, "false_sclerosed": 0}
                       for s in self.STAGES}
        self.patches = 0
        self.tissue_mm2 = 0.0
        self.tissue_unknown = 0
        self.rejected = 0
        self.verifier_ran = 0

    def add(self, result_dir: Path, pred: np.ndarray, truth: np.ndarray) -> None:
        report = read_report(result_dir)
        rejected = read_rejected(result_dir)
        self.patches += 1
        self.rejected += len(rejected)
        self.verifier_ran += int(report.get("n_rejected") is not None or bool(rejected))
        if report.get("tissue_area_mm2") is None:
            self.tissue_unknown += 1
        else:
            self.tissue_mm2 += float(report["tissue_area_mm2"])
        seg_labels, seg_components = candidate_labels(pred, rejected, float(report.get("analysis_downsample") or 1.0))
        for stage, counts in (("with_verifier", false_detections(pred, truth)),
                              ("segmentation_only", false_detections(seg_labels, truth,
                                                                     components=seg_components))):
            for k, v in counts.items():
                self.counts[stage][k] += v

    def metrics(self) -> dict:
        area = self.tissue_mm2 if self.tissue_mm2 > 0 and not self.tissue_unknown else None
        out = {"tile_patches": self.patches, "tile_tissue_mm2": round(self.tissue_mm2, 4) if area else None,
               "tile_verifier_ran": self.verifier_ran, "tile_rejected_candidates": self.rejected}
        for stage in self.STAGES:
            c = self.counts[stage]
            prefix = "tile_" if stage == "with_verifier" else "tile_segmentation_only_"
            if stage == "segmentation_only":
                out[f"{prefix}glomeruli_predicted"] = c["n_predicted"]
                out[f"{prefix}detection_precision"] = c["matched"] / max(c["n_predicted"], 1)
                out[f"{prefix}detection_recall"] = c["matched"] / max(c["n_true"], 1)
            out[f"{prefix}glomeruli_matched"] = c["matched"]
            out[f"{prefix}false_detections"] = c["false"]
            out[f"{prefix}false_detections_sclerosed"] = c["false_sclerosed"]
            out[f"{prefix}false_detections_per_mm2"] = c["false"] / area if area else None
        return out


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
    sclerosed, normal = found[found.label == SCLEROSED], found[found.label == NORMAL]
    sensitivity = float((sclerosed.predicted_label == SCLEROSED).mean()) if len(sclerosed) else float("nan")
    specificity = float((normal.predicted_label == NORMAL).mean()) if len(normal) else float("nan")
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
        truth = 100.0 * float((g.label == SCLEROSED).mean())
        predicted = 100.0 * float((found.predicted_label == SCLEROSED).mean()) if len(found) else float("nan")
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
    if "tile_false_detections" in metrics:
        lines += ["", *real_tiles_markdown(metrics)]
    return "\n".join(lines) + "\n"


def real_tiles_markdown(metrics: dict) -> list[str]:
    """The real outlined tiles: detection and false detections of the segmentation model alone
    and of the accepted glomeruli (after the verifier)."""
    def f(value, digits=3):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    n_true, area = metrics.get("tile_glomeruli_true", 0), metrics.get("tile_tissue_mm2")
    lines = [f"Real outlined tiles: {metrics.get('tile_patches', 0)} tiles, {n_true} outlined glomeruli "
             f"(class unknown), {f(area, 2)} mm² of tissue. A detection is true when it overlaps an "
             "outline with IoU >= 0.5; a false detection matches no outline.", "",
             "| real outlined tiles | outlined glomeruli | detections | matched | precision | recall "
             "| false detections per mm² (number) | false called sclerosed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, prefix in (("segmentation alone", "tile_segmentation_only_"), ("with verifier", "tile_")):
        false = metrics.get(f"{prefix}false_detections", 0)
        lines.append(
            f"| {name} | {n_true} | {metrics.get(f'{prefix}glomeruli_predicted', 0)} "
            f"| {metrics.get(f'{prefix}glomeruli_matched', 0)} | {f(metrics.get(f'{prefix}detection_precision'))} "
            f"| {f(metrics.get(f'{prefix}detection_recall'))} "
            f"| {f(metrics.get(f'{prefix}false_detections_per_mm2'), 2)} ({false}) "
            f"| {metrics.get(f'{prefix}false_detections_sclerosed', 0)} of {false} |")
    if metrics.get("tile_verifier_ran"):
        lines += ["", f"The verifier ran on {metrics['tile_verifier_ran']} of {metrics.get('tile_patches', 0)} tiles "
                      f"and rejected {metrics.get('tile_rejected_candidates', 0)} candidates."]
    else:
        lines += ["", "No verifier ran (no rejected.geojson, no n_rejected in report.json): both rows are the "
                      "segmentation model's."]
    return lines


# --- grading on graded single-glomerulus crops (another lab's) ----------------------------------

CROP_OUTCOMES = ("sclerosed", "normal", "rejected", "not found", "failed")
"""Per crop: the class of its glomerulus; "rejected": analyze accepted nothing but the verifier
rejected a candidate; "not found": no candidate at all; "failed": analyze refused the image."""


def read_crop_labels(crops_dir: Path) -> pd.DataFrame:
    """``labels.csv`` of a graded crop folder: columns image and globally_sclerosed (0/1; other
    columns are ignored), every image present."""
    crops_dir = Path(crops_dir)
    path = crops_dir / "labels.csv"
    if not path.is_file():
        raise ValueError(f"no labels.csv in {crops_dir}")
    labels = pd.read_csv(path)
    missing = {"image", "globally_sclerosed"} - set(labels.columns)
    if missing:
        raise ValueError(f"{path}: no column {', '.join(sorted(missing))} (needs image, globally_sclerosed)")
    labels = labels[["image", "globally_sclerosed"]].copy()
    if labels.empty:
        raise ValueError(f"{path} lists no crops")
    values = pd.to_numeric(labels.globally_sclerosed, errors="coerce")
    if not values.isin([0, 1]).all():
        raise ValueError(f"{path}: globally_sclerosed must be 0 or 1 on every row")
    labels["globally_sclerosed"] = values.astype(int)
    absent = [name for name in labels.image if not (crops_dir / name).is_file()]
    if absent:
        raise ValueError(f"{len(absent)} image(s) of {path} not in {crops_dir}, e.g. {absent[0]}")
    stems = labels.image.map(lambda name: Path(name).stem)
    if stems.duplicated().any():
        raise ValueError(f"{path}: two images share the name {stems[stems.duplicated()].iloc[0]!r} "
                         "(analyze names its outputs after the file name without its extension)")
    return labels.reset_index(drop=True)


def evaluate_graded_crops(model: LoadedModel, crops_dir: Path, out_dir: Path, mpp: float, backend: str = "auto",
                          settings: AnalysisSettings | None = None, quiet: bool = True) -> dict:
    """Grading on graded single-glomerulus crops (e.g. another lab's): run ``analyze`` on each
    crop (copied to ``OUT/images``, ``mpp`` µm/px, each analysed whole) and score the class of
    the crop's glomerulus against labels.csv's globally_sclerosed (``score_graded_crops``).
    A model with a verifier attached runs it unless ``settings`` turn it off.

    Writes ``OUT/analysis``, ``OUT/crops.csv`` (one row per crop), ``OUT/metrics.json`` and
    ``OUT/metrics.md``; returns the metrics."""
    import dataclasses

    crops_dir, out_dir = Path(crops_dir), Path(out_dir)
    if not mpp or mpp <= 0:
        raise ValueError("the crops' resolution (µm per pixel) must be positive")
    labels = read_crop_labels(crops_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in labels.image:
        target = images / Path(name).name
        if not target.exists():
            target.write_bytes((crops_dir / name).read_bytes())
    settings = (dataclasses.replace(settings, mpp_override=mpp) if settings is not None
                else analysis_settings_for(model.card, mpp_override=mpp, viewer=False))
    analyse_folder(model, images, out_dir, backend, settings, quiet)
    return score_graded_crops(out_dir, labels, mpp)


def _pick_candidate(components: np.ndarray, ids: np.ndarray, centre: tuple[int, int]) -> tuple[int, str]:
    """Among the objects ``ids`` of ``components``: the one containing ``centre`` (row, col),
    else the largest; (0, "") when there is none."""
    if ids.size == 0:
        return 0, ""
    at_centre = int(components[centre])
    if at_centre in set(ids.tolist()):
        return at_centre, "centre"
    areas = np.bincount(components.ravel(), minlength=int(ids.max()) + 1)[ids]
    return int(ids[int(areas.argmax())]), "largest"


def score_crop(result_dir: Path) -> dict:
    """The glomerulus analyze found in one crop: the accepted detection containing the crop's
    centre, else the largest accepted one; and likewise among every candidate of the
    segmentation model (accepted + rejected, ``segmentation_only_...``)."""
    result_dir = Path(result_dir)
    report = read_report(result_dir)
    if not (result_dir / "mask.tif").is_file() or report.get("status", "ok") != "ok":
        reason = report.get("reason") or f"no analyze output in {result_dir}"
        return {"outcome": "failed", "chosen_by": "", "segmentation_only_outcome": "failed",
                "segmentation_only_chosen_by": "", "n_accepted": 0, "n_rejected": 0, "area_um2": None,
                "reason": reason}
    pred = read_mask(result_dir)
    h, w = pred.shape
    ds = float(report.get("analysis_downsample") or 1.0)
    width0, height0 = report.get("width") or w * ds, report.get("height") or h * ds
    centre = (min(max(int(height0 / 2 / ds), 0), h - 1), min(max(int(width0 / 2 / ds), 0), w - 1))
    rejected = read_rejected(result_dir)
    labels, components = candidate_labels(pred, rejected, ds)
    n_accepted = int(ndimage.label(pred > 0, structure=EIGHT_CONNECTED)[1])  # ids 1..n of components
    n_all = int(components.max(initial=0))
    present = np.unique(components)
    present = present[present > 0]
    classes = _component_classes(labels, components, n_all)
    names = {1: "normal", 2: "sclerosed"}
    row: dict = {"n_accepted": n_accepted, "n_rejected": len(rejected)}
    for prefix, ids in (("", present[present <= n_accepted]), ("segmentation_only_", present)):
        picked, how = _pick_candidate(components, ids, centre)
        if picked:
            outcome = names[int(classes[picked])]
        else:
            outcome = "rejected" if (prefix == "" and rejected) else "not found"
        row[f"{prefix}outcome"], row[f"{prefix}chosen_by"] = outcome, how
        if prefix == "":
            mpp = report.get("analysis_mpp")
            area = int((components == picked).sum()) if picked else 0
            row["area_um2"] = round(area * mpp * mpp, 1) if picked and mpp else None
    row["reason"] = ""
    return row


def _rate(k: int, n: int) -> float:
    return k / n if n else float("nan")


def crop_grading_metrics(table: pd.DataFrame, prefix: str = "") -> dict:
    """Sclerosed sensitivity and specificity over all crops (a crop whose glomerulus was not
    found, was rejected or whose analysis failed is a miss) and over the found ones, balanced
    accuracies, and the outcome counts per true class, of the ``{prefix}outcome`` column."""
    outcome = table[f"{prefix}outcome"]
    out: dict = {}
    count = {}
    for cls in ("sclerosed", "normal"):
        mine = outcome[table.true_class == cls]
        count[cls] = {o: int((mine == o).sum()) for o in CROP_OUTCOMES}
        count[cls]["all"] = int(len(mine))
    s, n = count["sclerosed"], count["normal"]
    sens, spec = _rate(s["sclerosed"], s["all"]), _rate(n["normal"], n["all"])
    sens_found = _rate(s["sclerosed"], s["sclerosed"] + s["normal"])
    spec_found = _rate(n["normal"], n["normal"] + n["sclerosed"])

    def mean(a, b):
        return float(np.nanmean([a, b])) if not (math.isnan(a) and math.isnan(b)) else float("nan")

    out[f"{prefix}sclerosed_sensitivity"] = sens
    out[f"{prefix}specificity"] = spec
    out[f"{prefix}balanced_accuracy"] = mean(sens, spec)
    out[f"{prefix}sclerosed_sensitivity_found"] = sens_found
    out[f"{prefix}specificity_found"] = spec_found
    out[f"{prefix}balanced_accuracy_found"] = mean(sens_found, spec_found)
    for cls, c in count.items():
        other = "normal" if cls == "sclerosed" else "sclerosed"
        out[f"{prefix}{cls}_found"] = c["sclerosed"] + c["normal"]
        out[f"{prefix}{cls}_called_{cls}"] = c[cls]
        out[f"{prefix}{cls}_called_{other}"] = c[other]
        if not prefix:  # the segmentation model alone rejects nothing
            out[f"{cls}_rejected"] = c["rejected"]
        out[f"{prefix}{cls}_not_found"] = c["not found"]
        out[f"{prefix}{cls}_failed"] = c["failed"]
    return out


def score_graded_crops(out_dir: Path, labels: pd.DataFrame, mpp: float | None = None) -> dict:
    """Score analyze's outputs of graded crops (``OUT/analysis/<image stem>/``) against
    ``labels`` (columns image, globally_sclerosed 0/1; ``mpp``, the crops' resolution, is only
    recorded): per crop the outcome of its glomerulus
    (``score_crop``), then ``crop_grading_metrics`` with the verifier's decisions (keys without
    prefix) and for the segmentation model alone (``segmentation_only_...``). Writes
    ``OUT/crops.csv``, ``OUT/metrics.json`` and ``OUT/metrics.md``; returns the metrics."""
    out_dir = Path(out_dir)
    rows = []
    verifier_ran = 0
    for record in labels[["image", "globally_sclerosed"]].to_dict("records"):
        result = out_dir / "analysis" / Path(record["image"]).stem
        report = read_report(result)
        verifier_ran += int(report.get("n_rejected") is not None or (result / REJECTED_FILE).is_file())
        rows.append({"image": record["image"],
                     "true_class": "sclerosed" if int(record["globally_sclerosed"]) == 1 else "normal",
                     **score_crop(result)})
    columns = ["image", "true_class", "outcome", "chosen_by", "area_um2", "n_accepted", "n_rejected",
               "segmentation_only_outcome", "segmentation_only_chosen_by", "reason"]
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(out_dir / "crops.csv", index=False)
    metrics: dict = {"crops": int(len(table)), "sclerosed_crops": int((table.true_class == "sclerosed").sum()),
                     "normal_crops": int((table.true_class == "normal").sum()), "mpp": mpp,
                     "verifier_ran": verifier_ran}
    metrics.update(crop_grading_metrics(table))
    metrics["chosen_by_centre"] = int((table.chosen_by == "centre").sum())
    metrics["chosen_by_largest"] = int((table.chosen_by == "largest").sum())
    metrics.update(crop_grading_metrics(table, "segmentation_only_"))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "metrics.md").write_text(graded_crops_markdown(metrics))
    return metrics


def graded_crops_markdown(metrics: dict) -> str:
    """The scores of ``score_graded_crops`` as two tables: rates per stage, outcomes per class."""
    def f(key):
        value = metrics.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    n_s, n_n = metrics.get("sclerosed_crops", 0), metrics.get("normal_crops", 0)
    at = f" at {metrics['mpp']:g} µm/px" if metrics.get("mpp") else ""
    lines = [f"Grading on {metrics.get('crops', 0)} graded crops{at}: {n_s} globally sclerosed, {n_n} not. "
             "A crop's glomerulus is the detection containing its centre, else the largest "
             f"({metrics.get('chosen_by_centre', 0)} by centre, {metrics.get('chosen_by_largest', 0)} largest, "
             "with the verifier). Over all crops a glomerulus not found, rejected or not analysed is a miss.", "",
             "| stage | sclerosed sensitivity | specificity | balanced accuracy | sensitivity, found only "
             "| specificity, found only | balanced accuracy, found only |",
             "|---|---|---|---|---|---|---|"]
    stages = (("segmentation alone", "segmentation_only_"), ("with verifier", ""))
    for name, p in stages:
        lines.append(
            f"| {name} | {f(p + 'sclerosed_sensitivity')} ({metrics.get(p + 'sclerosed_called_sclerosed', 0)}/{n_s}) "
            f"| {f(p + 'specificity')} ({metrics.get(p + 'normal_called_normal', 0)}/{n_n}) "
            f"| {f(p + 'balanced_accuracy')} "
            f"| {f(p + 'sclerosed_sensitivity_found')} ({metrics.get(p + 'sclerosed_called_sclerosed', 0)}/"
            f"{metrics.get(p + 'sclerosed_found', 0)}) "
            f"| {f(p + 'specificity_found')} ({metrics.get(p + 'normal_called_normal', 0)}/"
            f"{metrics.get(p + 'normal_found', 0)}) | {f(p + 'balanced_accuracy_found')} |")
    lines += ["", "| stage | true class | crops | called sclerosed | called normal | rejected | not found "
                  "| analysis failed |", "|---|---|---|---|---|---|---|---|"]
    for name, p in stages:
        for cls, n in (("sclerosed", n_s), ("normal", n_n)):
            rejected = metrics.get(f"{cls}_rejected", 0) if not p else "–"
            lines.append(f"| {name} | {cls} | {n} | {metrics.get(f'{p}{cls}_called_sclerosed', 0)} "
                         f"| {metrics.get(f'{p}{cls}_called_normal', 0)} | {rejected} "
                         f"| {metrics.get(f'{p}{cls}_not_found', 0)} | {metrics.get(f'{p}{cls}_failed', 0)} |")
    lines += ["", (f"The verifier ran on {metrics['verifier_ran']} of {metrics.get('crops', 0)} crops. The "
                   "\"segmentation alone\" rows keep every candidate (none rejected) with the classes analyze "
                   "wrote, which the verifier graded where it kept a candidate; the segmentation model's own "
                   "grading is that of a run with --no-verifier."
                   if metrics.get("verifier_ran") else
                   "No verifier ran: both stages are the segmentation model's.")]
    return "\n".join(lines) + "\n"
