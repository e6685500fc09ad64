"""Cross-validation of the candidate verifier by tile group: how the pair (segmentation model +
verifier) does on real outlined tiles that the verifier never saw.

The tile groups of the training split are cut into folds; for each fold a verifier is trained
without the fold's patches (its tiles and the composites made on them), and ``evaluate real``
scores the pair through ``analyze`` on the fold's real tiles. The validation groups are scored
by a verifier trained on every training group (they never enter training). The segmentation
model is not retrained per fold: it has seen the training tiles, so its own false detections
there are fewer than on unseen tissue; what the folds measure is what the verifier keeps and
rejects of its candidates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from ...atomic import atomic_write_text
from ...verify import VerifierCard, load_verifier
from ..settings import VerifierSettings

log = logging.getLogger(__name__)


def tile_folds(manifest: pd.DataFrame, n_folds: int) -> list[list[str]]:
    """The training split's tile groups dealt into ``n_folds`` folds (sorted groups, round robin)."""
    groups = sorted(manifest[(manifest.kind == "tile") & (manifest.split == "train")].slide.unique())
    if n_folds < 2 or n_folds > len(groups):
        raise ValueError(f"{n_folds} folds over {len(groups)} training tile groups: use 2..{len(groups)}")
    return [groups[i::n_folds] for i in range(n_folds)]


def fold_dataset(dataset_dir: Path, manifest: pd.DataFrame, groups: list[str], out_dir: Path) -> Path:
    """A set whose validation split is the real tiles of ``groups`` (images and masks linked from
    ``dataset_dir``), for ``evaluate real``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("images", "masks"):
        link = out_dir / name
        if not link.exists():
            link.symlink_to(Path(dataset_dir).resolve() / name)
    for name in ("dataset.json", "glomeruli.csv"):
        if (Path(dataset_dir) / name).is_file() and not (out_dir / name).exists():
            (out_dir / name).write_bytes((Path(dataset_dir) / name).read_bytes())
    rows = manifest[(manifest.kind == "tile") & manifest.slide.isin(groups)].copy()
    rows["split"] = "val"
    atomic_write_text(out_dir / "manifest.csv", rows.to_csv(index=False))
    return out_dir


def cross_validate(dataset_dir: Path, out_dir: Path, segmentation_model, settings: VerifierSettings,
                   n_folds: int = 3, backend: str = "auto", validation_verifier: Path | None = None,
                   quiet: bool = True) -> pd.DataFrame:
    """One row per fold (and the validation groups) with the real-tile figures of ``evaluate
    real`` for the segmentation model alone and with the fold's verifier, plus a pooled ALL row
    (counts summed, rates recomputed from them). Writes ``OUT/crossval.csv`` and ``.md``."""
    from .prepared_set import evaluate_prepared_set
    from ..fit.verifier import make_verifier

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    manifest = pd.read_csv(dataset_dir / "manifest.csv")
    folds = tile_folds(manifest, n_folds)
    runs = [(f"fold{i + 1}", groups) for i, groups in enumerate(folds)]
    val_groups = sorted(manifest[(manifest.kind == "tile") & (manifest.split == "val")].slide.unique())
    if val_groups:
        runs.append(("validation", val_groups))
    rows = []
    for name, groups in runs:
        fold_dir = out_dir / name
        if name == "validation" and validation_verifier is not None:
            verifier_path = Path(validation_verifier)
        else:
            verifier_path, _ = make_verifier(dataset_dir, fold_dir / "verifier", segmentation_model, settings,
                                             VerifierCard(name=f"glomscan-verifier-{name}"), backend,
                                             tuple(groups) if name != "validation" else (), quiet,
                                             samples_dir=out_dir / "samples")
        segmentation_model.verifier = load_verifier(verifier_path)
        data = fold_dataset(dataset_dir, manifest, groups, fold_dir / "data")
        metrics = evaluate_prepared_set(segmentation_model, data, fold_dir / "evaluation", backend, "val", quiet=quiet)
        rows.append({"fold": name, "groups": " ".join(groups), "verifier": str(verifier_path),
                     **{k: v for k, v in metrics.items() if k.startswith("tile_") and not isinstance(v, (dict, list))}})
        log.info("%s (%s): %s", name, ", ".join(groups), {k: v for k, v in rows[-1].items() if k.startswith("tile_")})
    segmentation_model.verifier = None
    table = pd.DataFrame(rows)
    table = pd.concat([table, pd.DataFrame([pooled(table)])], ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "crossval.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / "crossval.json", json.dumps(table.to_dict("records"), indent=2, default=float))
    return table


POOLED_COUNTS = ("glomeruli_predicted", "glomeruli_matched", "false_detections", "false_detections_sclerosed")
"""Per stage (prefix ``tile_`` with the verifier, ``tile_segmentation_only_`` without it)."""


def pooled(table: pd.DataFrame) -> dict:
    """The folds pooled: counts summed, precision, recall and false detections per mm² of tissue
    recomputed from them."""
    def total(column: str):
        return table[column].sum() if column in table and table[column].notna().all() else None

    row: dict = {"fold": "ALL", "groups": " ".join(table.groups)}
    true, tissue = total("tile_glomeruli_true"), total("tile_tissue_mm2")
    row.update({"tile_glomeruli_true": true, "tile_tissue_mm2": tissue, "tile_patches": total("tile_patches")})
    for prefix in ("tile_", "tile_segmentation_only_"):
        counts = {name: total(prefix + name) for name in POOLED_COUNTS}
        row.update({prefix + name: value for name, value in counts.items()})
        matched, predicted = counts["glomeruli_matched"], counts["glomeruli_predicted"]
        if matched is not None and predicted is not None and true is not None:
            row[prefix + "detection_precision"] = matched / max(predicted, 1)
            row[prefix + "detection_recall"] = matched / max(true, 1)
        if counts["false_detections"] is not None and tissue:
            row[prefix + "false_detections_per_mm2"] = counts["false_detections"] / tissue
    return row
