"""Real and synthetic sclerosed glomeruli side by side (issue #15, item 5).

Top row: real sclerosed glomeruli of the base set's training patches (the graded crops that
``prepare`` composited into the tile set, listed in ``glomeruli.csv``); bottom row: synthetic
ones painted by ``synthesize`` (``synthesis.csv``), each a ``--window`` px window around the
glomerulus at the analysis resolution, scaled to ``--cell`` px, its outline drawn in green.

    .venv/bin/python research/synthesis_picture.py --base /tmp/ablation/base \\
        --synthetic /tmp/ablation/plus030 --out docs/images/real-vs-synthetic.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.transform import resize

from glomscan.imaging import read_png, write_png


def window(image: np.ndarray, labels: np.ndarray, cx: float, cy: float, side: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = labels.shape
    x0 = int(min(max(round(cx - side / 2), 0), w - side))
    y0 = int(min(max(round(cy - side / 2), 0), h - side))
    return image[y0:y0 + side, x0:x0 + side, :3], labels[y0:y0 + side, x0:x0 + side]


def tile(image: np.ndarray, mask: np.ndarray, cell: int) -> np.ndarray:
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    out = image.copy()
    out[edge] = (0, 200, 0)
    return (resize(out, (cell, cell), order=1, anti_aliasing=True, preserve_range=True)).round().astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--synthetic", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--cell", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    real = pd.read_csv(args.base / "glomeruli.csv")
    real = real[(real.split == "train") & (real.label == 2)]
    real = real.iloc[rng.choice(len(real), args.n, replace=False)]
    top = []
    for g in real.itertuples():
        image, labels = read_png(args.base / "images" / f"{g.patch_id}.png"), read_png(args.base / "masks" / f"{g.patch_id}.png")
        labels = labels[..., 0] if labels.ndim == 3 else labels
        im, lab = window(image, labels, (g.x0 + g.x1) / 2, (g.y0 + g.y1) / 2, args.window)
        comps, _ = ndimage.label(lab == 2)
        centre = comps[lab.shape[0] // 2, lab.shape[1] // 2]
        top.append(tile(im, comps == centre if centre else lab == 2, args.cell))
    synthetic = pd.read_csv(args.synthetic / "synthesis.csv")
    synthetic = synthetic.iloc[rng.choice(len(synthetic), args.n, replace=False)]
    bottom = []
    for g in synthetic.itertuples():
        image = read_png(args.synthetic / "images" / f"{g.patch_id}.png")
        labels = read_png(args.synthetic / "masks" / f"{g.patch_id}.png")
        labels = labels[..., 0] if labels.ndim == 3 else labels
        side = args.window
        im = image[g.crop_y0:g.crop_y0 + side, g.crop_x0:g.crop_x0 + side, :3]
        lab = labels[g.crop_y0:g.crop_y0 + side, g.crop_x0:g.crop_x0 + side] == 2
        comps, _ = ndimage.label(lab)
        centre = comps[side // 2, side // 2]
        bottom.append(tile(im, comps == centre if centre else lab, args.cell))
    gap = np.full((args.cell, 4, 3), 255, np.uint8)
    rows = [np.concatenate(sum(([t, gap] for t in row), [])[:-1], 1) for row in (top, bottom)]
    picture = np.concatenate([rows[0], np.full((6, rows[0].shape[1], 3), 255, np.uint8), rows[1]], 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_png(args.out, picture)
    print(f"{args.out}: top {args.n} real sclerosed glomeruli, bottom {args.n} synthetic ({args.window} px windows)")


if __name__ == "__main__":
    main()
