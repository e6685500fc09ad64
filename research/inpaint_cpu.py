"""Brief CPU training of the inpainting GAN on real PAS glomeruli, with baselines.

Data: the crops of ../shared/data/pas_glomeruli labelled globally sclerosed (labels.csv == 1;
that project's model predictions, not pathologist labels). They have no masks, and each crop is
tight around its glomerulus (the glomerulus fills most of the picture, so a stain/tissue
threshold does not separate it from the surrounding tissue). The approximate glomerulus mask
is therefore geometric: each crop is centre-cropped to a square (its shorter side), resized to
``--crop-size`` (256, like ``glomscan augment crops``), and the mask is the centred disk of radius
``--mask-radius`` x side (default 0.3: 28 % of the crop). Train/test split 8:2 by
``glomscan.augment.crops.split_crops`` (seed 0).

The crops folder is written to a temporary folder (never into the repository), in the format
of ``glomscan augment crops``. Training runs at ``--size`` (default 128) with ``--base-channels``
(default 32) and OMP/torch threads limited to 1. Evaluation is on the held-out crops at 256 px
(the generator output is resized back up), composited inside the mask, with the same
MAE/PSNR/SSIM as ``glomscan evaluate inpaint``; baselines on the same crops and masks:
- ring mean: the hole filled with the mean colour of the 8 px ring around it;
- biharmonic: ``skimage.restoration.inpaint_biharmonic`` (classical PDE inpainting).

    OMP_NUM_THREADS=1 .venv/bin/python research/inpaint_cpu.py --epochs 22 --keep /tmp/inpaint-bench
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyvips  # noqa: E402
import torch  # noqa: E402

from glomscan.slides import image_to_array  # noqa: E402
from glomscan.augment.crops import read_crops, split_crops  # noqa: E402
from glomscan.imaging import write_png  # noqa: E402
from glomscan.augment.inpaint_baselines import biharmonic_fill, fill_metrics, ring_mean_fill  # noqa: E402
from glomscan.augment.inpaint import PAPER_METRICS, InpaintSettings, evaluate_crops_dir, train_inpainting  # noqa: E402
from glomscan.augment.settings import GENERATOR_UPSAMPLING  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pas_glomeruli"


def build_crops(out: Path, crop_size: int, mask_radius: float) -> int:
    labels = pd.read_csv(DATA / "labels.csv")
    files = list(labels[labels.predicted_globally_sclerosed == 1].image)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:crop_size, :crop_size] + 0.5
    c = crop_size / 2
    mask = (xx - c) ** 2 + (yy - c) ** 2 <= (mask_radius * crop_size) ** 2
    splits = split_crops(len(files), 0.2, 0)
    rows = []
    for name, split in zip(files, splits):
        image = pyvips.Image.new_from_file(str(DATA / name))[:3]
        side = min(image.width, image.height)
        x0, y0 = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop(x0, y0, side, side).resize(crop_size / side, kernel="lanczos3")
        array = image_to_array(image)[:crop_size, :crop_size, :3]
        crop_id = Path(name).stem
        write_png(out / "images" / f"{crop_id}.png", np.ascontiguousarray(array))
        write_png(out / "masks" / f"{crop_id}.png", mask.astype(np.uint8) * 255)
        rows.append({"crop_id": crop_id, "split": split, "source": name, "x0": x0, "y0": y0, "cx": x0 + side / 2,
                     "cy": y0 + side / 2, "radius": mask_radius * side, "mask_px": int(mask.sum())})
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    return len(rows)


def baseline(crops, fill) -> dict[str, float]:
    rows = fill_metrics(crops, fill)
    return {k: float(np.mean([r[k] for r in rows])) for k in ("mae", "psnr", "ssim")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=22)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--upsampling", choices=GENERATOR_UPSAMPLING, default="transposed",
                        help="decoder x2 upsampling (transposed: as the measured run in research/experiments-log.md)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--mask-radius", type=float, default=0.3)
    parser.add_argument("--keep", type=Path, default=None, help="Keep crops, generator, CSV and sample grids here.")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found (the shared sample data)")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    work = args.keep or Path(tempfile.mkdtemp(prefix="inpaint-bench-"))
    crops_dir, gen = work / "crops", work / "generator.pt"
    n = build_crops(crops_dir, args.crop_size, args.mask_radius)
    settings = InpaintSettings(epochs=args.epochs, batch_size=args.batch_size, size=args.size,
                               base_channels=args.base_channels, upsampling=args.upsampling, seed=0)
    t0 = time.perf_counter()
    train_inpainting(crops_dir, gen, settings, quiet=True)
    minutes = (time.perf_counter() - t0) / 60
    table, summary = evaluate_crops_dir(gen, crops_dir, "test")
    test = read_crops(crops_dir, "test")
    results = {"generator": dict(zip(summary.metric, summary.value)),
               "ring mean": baseline(test, ring_mean_fill),
               "biharmonic": baseline(test, biharmonic_fill),
               "paper (256 px, 100 epochs, GPU)": PAPER_METRICS}
    print(f"\n{n} sclerosed PAS crops ({n - len(test)} train / {len(test)} held out), {args.crop_size} px, "
          f"disk mask r = {args.mask_radius} x side; trained {args.epochs} epochs at {args.size} px, "
          f"base channels {args.base_channels}, batch {args.batch_size}, 1 CPU thread: {minutes:.1f} min")
    print(f"{'':34s} {'MAE':>8s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for name, r in results.items():
        print(f"{name:34s} {r['mae']:8.4f} {r['psnr']:8.2f} {r['ssim']:7.3f}")
    print(f"outputs: {work}")


if __name__ == "__main__":
    main()
