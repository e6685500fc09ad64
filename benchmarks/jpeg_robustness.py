"""How much of each AIDPATH tile a model calls glomerulus when the tile is stored losslessly and
as scanners store slides (JPEG, with and without 4:2:0 chroma subsampling), against the
outlined share. A model that has not seen subsampled chroma paints tissue as glomerulus.

    python benchmarks/jpeg_robustness.py [CKPT ...] [--data ../shared/data/aidpath_tiles]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from glomscan.engines.torch_engine import TorchEngine
from glomscan.model import load_model
from glomscan.shipped import default_model_path
from glomscan.train.fit.segment import jpeg_roundtrip
from glomscan.train.dataset.sources import read_tile_set

CASES = [("lossless", None, None), ("Q95 4:4:4", 95, False), ("Q85 4:4:4", 85, False), ("Q85 4:2:0", 85, True),
         ("Q70 4:2:0", 70, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/aidpath_tiles"))
    args = ap.parse_args()
    tiles = read_tile_set(args.data, tile_mpp=0.5, analysis_mpp=1.0)[::2]
    print(f"{len(tiles)} AIDPATH tiles at 1 µm/px; outlined share of pixels: {np.mean([(t.labels > 0).mean() for t in tiles]):.3f}")
    print("model".ljust(28) + "".join(name.rjust(12) for name, _, _ in CASES) + "   (mean share called glomerulus)")
    for path in args.models or [default_model_path()]:
        engine = TorchEngine(load_model(path), "cpu")
        shares = []
        for t in tiles:
            row = []
            for _, quality, subsample in CASES:
                image = t.image if quality is None else jpeg_roundtrip(t.image, quality, subsample)
                row.append((engine.predict(image[None])[0].max(axis=0) >= 0.5).mean())
            shares.append(row)
        print(str(path)[-28:].ljust(28) + "".join(f"{v:12.3f}" for v in np.mean(shares, axis=0)))


if __name__ == "__main__":
    main()
