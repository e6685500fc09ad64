"""Does the mask DCGAN learn real glomerulus shapes? (issue #15, item 4)

Trains ``train_mask_gan`` on every outline of ../shared/data/aidpath_glomeruli (757 real
glomerulus outlines, normal and sclerosed; resumable: rerun to continue, raise ``--epochs`` to
train longer), then compares shape distributions of real and generated masks:

- real: each outline cut to its bounding square (+ margin) and scaled to the GAN's side, as the
  GAN sees it (``normalise_mask``), thresholded at 0;
- generated: ``--samples`` draws from the generator, post-processed exactly as
  ``glomscan augment masks`` does (threshold 0.5, islands removed, largest component, holes
  filled) at the GAN's side;
- a reference that should fail: discs of the same normalisation (the synthetic masks the mask
  GAN saw before), and a noise floor: one random half of the real masks against the other.

Shape descriptors (``skimage.measure.regionprops``): area as a fraction of the square canvas
(the GAN learns shape, not size: absolute sizes are set afterwards by ``augment masks``),
eccentricity, solidity. For each: median and 10-90 % range, and the two-sample
Kolmogorov-Smirnov statistic against the real masks (0 = identical distributions).

    OMP_NUM_THREADS=2 .venv/bin/python research/maskgan_real_outlines.py --work /tmp/maskgan-real --epochs 100
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import ks_2samp
from skimage.measure import regionprops

from glomscan.augment.maskgan import (MaskGanSettings, load_mask_generator, normalise_mask, postprocess_sample,
                                    train_mask_gan)
from glomscan.train.dataset.sources import read_crop_set

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DESCRIPTORS = ("area_fraction", "eccentricity", "solidity")


def describe(masks: list[np.ndarray]) -> pd.DataFrame:
    rows = []
    for m in masks:
        props = max(regionprops(m.astype(np.uint8)), key=lambda p: p.area)
        rows.append({"area_fraction": props.area / m.size, "eccentricity": props.eccentricity,
                     "solidity": props.solidity})
    return pd.DataFrame(rows)


def discs(n: int, side: int) -> list[np.ndarray]:
    disc = np.zeros((side * 4, side * 4), bool)
    yy, xx = np.mgrid[:side * 4, :side * 4] + 0.5
    disc[(xx - side * 2) ** 2 + (yy - side * 2) ** 2 <= (side * 1.5) ** 2] = True
    return [normalise_mask(disc, side) > 0] * n


def compare(real: pd.DataFrame, others: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for name, table in {"real": real, **others}.items():
        row = {"masks": name, "n": len(table)}
        for d in DESCRIPTORS:
            q10, q50, q90 = np.percentile(table[d], [10, 50, 90])
            row[f"{d} median (10-90 %)"] = f"{q50:.3f} ({q10:.3f}-{q90:.3f})"
            row[f"KS {d}"] = "-" if name == "real" else f"{ks_2samp(real[d], table[d]).statistic:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--base-channels", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=757)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--report", type=Path, default=None, help="markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    crops = read_crop_set(SHARED / "aidpath_glomeruli")
    outlines = [c.outline for c in crops]
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "maskgan.pt"
    settings = MaskGanSettings(epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                               base_channels=args.base_channels, seed=0)
    t0 = time.perf_counter()
    rows = train_mask_gan(outlines, out, settings, quiet=True, info={"crops": "aidpath_glomeruli (all outlines)"})
    minutes = (time.perf_counter() - t0) / 60
    generator, _, _ = load_mask_generator(out)
    generator.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        samples = generator(torch.randn(args.samples, generator.latent)).numpy()[:, 0]
    generated = [m for m in (postprocess_sample(s, args.image_size, 0.5, 8) for s in samples) if m is not None]
    real_masks = [normalise_mask(o, args.image_size) > 0 for o in outlines]
    real = describe(real_masks)
    half = np.random.default_rng(0).permutation(len(real))
    table = compare(real.iloc[half[: len(half) // 2]], {
        "real, other half (noise floor)": real.iloc[half[len(half) // 2:]],
        f"generated (epoch {rows[-1]['epoch']})": describe(generated),
        "discs (reference)": describe(discs(len(real_masks), args.image_size))})
    table.loc[0, "masks"] = "real, one half"
    print(table.to_string(index=False))
    print(f"{len(outlines)} real outlines; {len(generated)} of {args.samples} samples gave a mask; "
          f"training {minutes:.1f} min this call; final D(real) {rows[-1]['d_real']:.3f}, D(fake) {rows[-1]['d_fake']:.3f}")
    table.to_csv(args.work / "shapes.csv", index=False)
    if args.report:
        cols = list(table.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
        lines += ["", f"{len(outlines)} real outlines at {args.image_size} px; {len(generated)} of {args.samples} "
                  f"generator samples gave a mask; {rows[-1]['epoch']} epochs, base channels {args.base_channels}."]
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
