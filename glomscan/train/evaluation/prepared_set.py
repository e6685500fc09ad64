"""``evaluate real``: a model scored through analyze on a prepared tile + crop set (real outlined
tiles and composites): detection, glomerulus Dice, grading of the pasted glomeruli, per-slide
%GS error, and the real tiles' false detections with and without the verifier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from ...config import AnalysisSettings, analysis_settings_for
from ...labels import NORMAL, SCLEROSED
from ...model import LoadedModel
from ...postprocess import EIGHT_CONNECTED
from ..dataset.data import load_patch
from .analyze_outputs import analyse_folder, candidate_labels, component_classes, read_mask, read_rejected, read_report
from .metrics import dice, glomerulus_counts, instance_matches, known_class_counts, match_components, pixel_metrics


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
    classes = component_classes(pred_labels, components, n_pred)
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
