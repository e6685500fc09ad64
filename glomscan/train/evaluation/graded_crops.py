"""``evaluate graded-crops``: grading through analyze on graded single-glomerulus crops (e.g.
another lab's): per crop the class of its glomerulus against labels.csv, with the verifier's
decisions and for the segmentation model alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from ...config import AnalysisSettings, analysis_settings_for
from ...labels import CLASS_NAMES, SCLEROSED
from ...model import LoadedModel
from ...postprocess import EIGHT_CONNECTED
from ...report import REJECTED_FILE
from ..dataset.sources import crop_label, read_labels_csv
from .analyze_outputs import analyse_folder, candidate_labels, component_classes, read_mask, read_rejected, read_report


CROP_OUTCOMES = ("sclerosed", "normal", "rejected", "not found", "failed")
"""Per crop: the class of its glomerulus; "rejected": analyze accepted nothing but the verifier
rejected a candidate; "not found": no candidate at all; "failed": analyze refused the image."""


def read_crop_labels(crops_dir: Path) -> pd.DataFrame:
    """``labels.csv`` of a graded crop folder: columns image and globally_sclerosed (0/1; other
    columns are ignored), every image present."""
    crops_dir = Path(crops_dir)
    path = crops_dir / "labels.csv"
    labels = read_labels_csv(crops_dir, ("image",), ("globally_sclerosed",), error=ValueError)
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
    classes = component_classes(labels, components, n_all)
    row: dict = {"n_accepted": n_accepted, "n_rejected": len(rejected)}
    for prefix, ids in (("", present[present <= n_accepted]), ("segmentation_only_", present)):
        picked, how = _pick_candidate(components, ids, centre)
        if picked:
            outcome = CLASS_NAMES[int(classes[picked]) - 1]  # label value = channel + 1
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
                     "true_class": "sclerosed" if crop_label(record) == SCLEROSED else "normal",
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
