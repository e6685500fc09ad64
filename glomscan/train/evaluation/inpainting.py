"""``evaluate inpaint``: the files of an inpainting evaluation (the scores themselves come from
the augmentation, which the training side does not import)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_inpaint_evaluation(table: pd.DataFrame, summary: pd.DataFrame, out_prefix: Path) -> Path:
    """``OUT.csv`` (one row per crop) and ``OUT.summary.csv`` of an inpainting evaluation;
    returns the per-crop file."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_prefix.with_suffix(".csv"), index=False)
    summary.to_csv(Path(f"{out_prefix}.summary.csv"), index=False)
    return out_prefix.with_suffix(".csv")
