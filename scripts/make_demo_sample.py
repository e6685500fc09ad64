"""Build the real-tissue demo sample shipped in glomscan/sample/ from the public AIDPATH tiles.

The validation tiles of the shipped model (the tile groups ``prepare --seed 0`` holds out, so the
model never trained on them) are joined side by side into one pyramidal JPEG TIFF at their
native 0.5 µm/px, and their glomerulus outlines are written as a QuPath GeoJSON (class unknown:
the tiles' masks do not grade glomeruli). Usage:

    python scripts/make_demo_sample.py [../shared/data/aidpath_tiles] [glomscan/sample]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyvips
from scipy import ndimage

from glomscan.postprocess import EIGHT_CONNECTED, outer_contour
from glomscan.slides import image_to_array
from glomscan.train.data import split_slides
from glomscan.train.sources import glomerulus_mask, tile_groups

TILE_MPP = 0.5
GAP_PX = 128
"""White glass between the tiles: they are not neighbours on their slides."""
NAME = "aidpath_validation_tiles"


def main(tiles_dir: Path, out_dir: Path) -> None:
    names = sorted(p.stem for p in (tiles_dir / "images").glob("*.png"))
    groups = tile_groups(names)
    split = split_slides(list(groups.values()), 0.2, 0)
    chosen = [n for n in names if split[groups[n]] == "val"]
    images = [pyvips.Image.new_from_file(str(tiles_dir / "images" / f"{n}.png"))[:3] for n in chosen]
    masks = [glomerulus_mask(image_to_array(pyvips.Image.new_from_file(str(tiles_dir / "masks" / f"{n}.png"))))
             for n in chosen]
    mosaic = pyvips.Image.arrayjoin(images, across=len(images), shim=GAP_PX, background=[255, 255, 255])
    mosaic = mosaic.copy(interpretation="srgb")
    out_dir.mkdir(parents=True, exist_ok=True)
    mosaic.tiffsave(str(out_dir / f"{NAME}.tif"), tile=True, tile_width=256, tile_height=256, pyramid=True,
                    compression="jpeg", Q=85, xres=1000.0 / TILE_MPP, yres=1000.0 / TILE_MPP, resunit="cm")
    features, x_offset = [], 0
    for name, mask in zip(chosen, masks):
        labels, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            contour = outer_contour(labels[sl] == i, sl[1].start + x_offset, sl[0].start)
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [contour]},
                             "properties": {"objectType": "annotation", "source_tile": name,
                                            "classification": {"name": "Glomerulus (class unknown)"}}})
        x_offset += mask.shape[1] + GAP_PX
    (out_dir / f"{NAME}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    print(f"{out_dir / NAME}.tif: tiles {', '.join(chosen)}, {mosaic.width}x{mosaic.height} px at {TILE_MPP} µm/px, "
          f"{len(features)} outlined glomeruli")


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    main(args[0] if args else Path("../shared/data/aidpath_tiles"), args[1] if len(args) > 1 else Path("glomscan/sample"))
