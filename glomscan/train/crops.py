"""Crops of sclerosed glomeruli for the inpainting model (issue #5, step 1).

Folder format (read by ``train inpaint`` / ``evaluate inpaint``)::

    CROPS/images/<crop_id>.png   RGB uint8, size x size
    CROPS/masks/<crop_id>.png    uint8 0/255, the glomerulus of this crop only
    CROPS/manifest.csv           crop_id, split, source, x0, y0, cx, cy, radius, mask_px, ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyvips

from ..slides import image_to_array

CROP_COLUMNS = ["crop_id", "split", "source", "x0", "y0", "cx", "cy", "radius", "mask_px"]


def read_crops(crops_dir: Path, split: str | None = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    """(image uint8 HxWx3, mask bool HxW) of every crop in ``split`` ("train", "test", or None
    for all), in manifest order."""
    crops_dir = Path(crops_dir)
    manifest_path = crops_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{crops_dir}: no manifest.csv (make it with 'glomscan crops')")
    manifest = pd.read_csv(manifest_path, dtype={"crop_id": str})
    if split is not None:
        manifest = manifest[manifest.split == split]
    out = []
    for crop_id in manifest.crop_id:
        image = image_to_array(pyvips.Image.new_from_file(str(crops_dir / "images" / f"{crop_id}.png")))[..., :3]
        mask = image_to_array(pyvips.Image.new_from_file(str(crops_dir / "masks" / f"{crop_id}.png")))[..., 0] > 127
        out.append((np.ascontiguousarray(image), mask))
    return out
