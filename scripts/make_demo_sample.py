"""Build the real-tissue demo sample shipped in glomscan/sample/ from the public AIDPATH tiles.

Each validation tile of the shipped model (the tile groups ``prepare --seed 0`` holds out, so the
model never trained on them) becomes a pyramidal JPEG TIFF at its native 0.5 µm/px, with its
glomerulus outlines as a QuPath GeoJSON (class unknown: the tiles' masks do not grade glomeruli). Usage:

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
from glomscan.train.dataset.data import split_slides
from glomscan.train.dataset.sources import glomerulus_mask, tile_groups

TILE_MPP = 0.5
PREFIX = "aidpath_"


def main(tiles_dir: Path, out_dir: Path) -> None:
    names = sorted(p.stem for p in (tiles_dir / "images").glob("*.png"))
    groups = tile_groups(names)
    split = split_slides(list(groups.values()), 0.2, 0)
    chosen = [n for n in names if split[groups[n]] == "val"]
    out_dir.mkdir(parents=True, exist_ok=True)
    n_outlines = 0
    for name in chosen:
        image = pyvips.Image.new_from_file(str(tiles_dir / "images" / f"{name}.png"))[:3].copy(interpretation="srgb")
        mask = glomerulus_mask(image_to_array(pyvips.Image.new_from_file(str(tiles_dir / "masks" / f"{name}.png"))))
        image.tiffsave(str(out_dir / f"{PREFIX}{name}.tif"), tile=True, tile_width=256, tile_height=256, pyramid=True,
                       compression="jpeg", Q=85, xres=1000.0 / TILE_MPP, yres=1000.0 / TILE_MPP, resunit="cm")
        labels, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
        features = []
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            contour = outer_contour(labels[sl] == i, sl[1].start, sl[0].start)
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [contour]},
                             "properties": {"objectType": "annotation",
                                            "classification": {"name": "Glomerulus (class unknown)"}}})
        (out_dir / f"{PREFIX}{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        n_outlines += len(features)
    print(f"{out_dir}: tiles {', '.join(chosen)} as {PREFIX}<id>.tif ({TILE_MPP} µm/px) with {n_outlines} outlined "
          "glomeruli in <same>.geojson")


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    main(args[0] if args else Path("../shared/data/aidpath_tiles"), args[1] if len(args) > 1 else Path("glomscan/sample"))
