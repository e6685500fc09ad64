"""Sclerosed glomeruli of tiles and composites are counted once each (issue #15: the amount of
synthetic glomeruli is relative to this count)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from glomscan.augment.crops import sclerosed_census
from glomscan.train.dataset.data import MANIFEST_COLUMNS, _patch_row, _write_patch


def disc_labels(side=96, cx=40, cy=40, r=12, label=2):
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.uint8)
    labels[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = label
    return labels


def test_composites_of_one_tile_group_at_the_same_place_are_distinct_glomeruli(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rows = []
    image = np.full((96, 96, 3), 200, np.uint8)
    # three composites on backgrounds of one tile group, the glomerulus pasted at the same place
    for i in range(3):
        patch_id = f"composite_train_{i:05d}_100"
        _write_patch(tmp_path, patch_id, image, disc_labels())
        rows.append(_patch_row(patch_id, "tiles-100", "train", "composite", disc_labels()))
    # slide patches overlapping on one glomerulus still count it once
    for i, x in enumerate((0, 8)):
        patch_id = f"slide_{i}"
        labels = disc_labels(cx=40 - x)
        _write_patch(tmp_path, patch_id, image, labels)
        rows.append({**_patch_row(patch_id, "S1", "train", "slide", labels), "x": x})
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    census = sclerosed_census(tmp_path, manifest, "train")
    assert census.total == 3 + 1
    # without a kind column every patch is a slide patch, as before
    census = sclerosed_census(tmp_path, manifest.drop(columns="kind"), "train")
    assert census.total == 1 + 1
