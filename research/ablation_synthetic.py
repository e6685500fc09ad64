"""Does the paper's synthetic data help? The ablation of issue #15 (item 6; the paper's Table 4).

One segmentation training, repeated with +0 %, +30 %, +60 %, +100 % synthetic sclerosed
glomeruli (relative to the real sclerosed glomeruli of the training split), for each seed:
same settings, same number of steps, same seeds, same validation slides. Every model is scored
on the same validation patches of the base set (no synthetic glomerulus is ever in validation):
sclerosed sensitivity, specificity and balanced accuracy per graded glomerulus (the class
``analyze`` gives the detection matching each pasted validation crop) and sclerosed pixel Dice,
through ``glomscan.train.evaluation.prepared_set.evaluate_prepared_set`` (``glomscan evaluate real``).

Steps (each skipped when its output exists, so a rerun resumes; trainings resume per epoch):
1. ``prepare``: the shared tile set (aidpath_tiles) with the shared crop set (aidpath_glomeruli)
   composited into it, split by slide (``--base`` reuses a prepared set instead);
2. masks: as many masks from the mask GAN (``--maskgan``) as the largest amount needs, their
   diameters drawn from the real sclerosed glomeruli of the training split (or spread over
   ``--diameter-range``; analysis px = µm at 1 µm/px);
3. ``synthesize`` into the base set's training patches (tissue away from every labelled
   glomerulus) at each amount with the inpainting generator (``--generator``);
4. ``train segment`` on each set for each seed (``--epochs`` x ``--steps`` steps of
   ``--batch-size`` random ``--crop`` px crops, ``--init`` to fine-tune a model instead of a
   random start);
5. ``evaluate real`` on the base set's validation patches; the table goes to ``--report``.

    OMP_NUM_THREADS=2 .venv/bin/python research/ablation_synthetic.py --work /tmp/ablation \\
        --generator GEN.pt --maskgan MASKGAN.pt --seeds 0 1 --epochs 4 --steps 50 --crop 256 \\
        --init glomscan/models/default.onnx --report /tmp/ablation/table.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AMOUNTS = (0.0, 0.3, 0.6, 1.0)
COLUMNS = ("sclerosed_sensitivity", "sclerosed_specificity", "balanced_accuracy", "composite_dice_sclerosed",
           "composite_dice_normal", "composite_detection_recall")


def prepare_base(work: Path, tiles: Path, crops: Path) -> Path:
    from glomscan.train.dataset.data import PrepareSettings, prepare_dataset

    base = work / "base"
    if not (base / "manifest.csv").is_file():
        prepare_dataset(None, None, base, PrepareSettings(), tiles_dir=tiles, crops_dir=crops)
    return base


def real_sclerosed_diameters_px(base: Path) -> np.ndarray:
    """Equivalent diameters (analysis px) of the real sclerosed glomeruli of the training split."""
    placed = pd.read_csv(base / "glomeruli.csv")
    mpp = json.loads((base / "dataset.json").read_text()).get("target_mpp", 1.0) if (
        base / "dataset.json").is_file() else 1.0
    return placed[(placed.split == "train") & (placed.label == 2)].diameter_um.to_numpy(np.float64) / mpp


def make_masks(work: Path, maskgan: Path, count: int, diameters: tuple[float, float] | np.ndarray, seed: int,
               size: int = 256) -> list[np.ndarray]:
    """``count`` generated masks, with equivalent diameters spread over a (low, high) range or
    drawn (with replacement) from the given real diameters."""
    from glomscan.augment.maskgan import (MaskGenerationSettings, generate_masks, load_mask_generator, read_masks,
                                       write_masks)

    folder = work / "masks"
    if not (folder / "masks.csv").is_file():
        generator, _, info = load_mask_generator(maskgan)
        drawn = None
        if isinstance(diameters, np.ndarray):
            drawn = np.clip(np.random.default_rng(seed).choice(diameters, count), 8.0, 0.9 * size)
            diameters = None
        masks, records = generate_masks(generator, count, MaskGenerationSettings(size=size, diameter_range=diameters,
                                                                                  seed=seed),
                                        (info["diameter_min_px"], info["diameter_max_px"]), diameters_px=drawn)
        write_masks(folder, masks, records)
    return read_masks(folder)


def synthetic_set(work: Path, base: Path, amount: float, generator: Path, masks, seed: int) -> Path:
    from glomscan.augment.inpaint import load_inpainter
    from glomscan.augment.synthesize import SynthesisSettings, synthesize

    if amount == 0:
        return base
    out = work / f"plus{round(amount * 100):03d}"
    if not (out / "manifest.csv").is_file():
        synthesize(base, out, load_inpainter(generator), masks, SynthesisSettings(amount=amount, feather_px=2, seed=seed))
    return out


def train_and_score(work: Path, base: Path, data: Path, amount: float, seed: int, args) -> dict:
    from glomscan.model import load_model
    from glomscan.train.evaluation.prepared_set import evaluate_prepared_set
    from glomscan.train.fit.segment import SegmentSettings, train_segmentation

    run = work / "runs" / f"plus{round(amount * 100):03d}_seed{seed}"
    ckpt = run / "model.pt"
    settings = SegmentSettings(epochs=args.epochs, batch_size=args.batch_size, crop=args.crop, seed=seed,
                               max_steps_per_epoch=args.steps, init=args.init, lr=args.lr, min_lr=args.lr / 10,
                               bn_recalibration_steps=args.bn_steps, encoder=args.encoder,
                               trained_on=f"ablation +{round(amount * 100)} % synthetic sclerosed, seed {seed}")
    t0 = time.perf_counter()
    train_segmentation(data, ckpt, settings, quiet=True)
    minutes = (time.perf_counter() - t0) / 60
    metrics_path = run / "evaluation" / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
    else:
        metrics = evaluate_prepared_set(load_model(ckpt), base, run / "evaluation", backend=args.backend, split="val")
    manifest = pd.read_csv(data / "manifest.csv")
    synthetic = pd.read_csv(data / "synthesis.csv") if (data / "synthesis.csv").is_file() else pd.DataFrame()
    return {"amount_pct": round(amount * 100), "seed": seed, "synthetic_glomeruli": len(synthetic),
            "train_patches": int((manifest.split == "train").sum()), "train_minutes": round(minutes, 1),
            **{k: metrics.get(k, math.nan) for k in COLUMNS}}


def table_markdown(rows: pd.DataFrame) -> str:
    lines = ["| synthetic sclerosed | seeds | sclerosed sensitivity | specificity | balanced accuracy | "
             "sclerosed Dice | normal Dice |", "|---|---|---|---|---|---|---|"]
    for amount, g in rows.groupby("amount_pct"):
        def cell(k):
            v = g[k].astype(float)
            return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")
        lines.append(f"| +{amount} % ({int(g.synthetic_glomeruli.iloc[0])}) | {len(g)} | {cell('sclerosed_sensitivity')} | "
                     f"{cell('sclerosed_specificity')} | {cell('balanced_accuracy')} | {cell('composite_dice_sclerosed')} | "
                     f"{cell('composite_dice_normal')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--generator", type=Path, required=True, help="inpainting generator (train inpaint)")
    ap.add_argument("--maskgan", type=Path, required=True, help="mask generator (train masks)")
    ap.add_argument("--tiles", type=Path, default=SHARED / "aidpath_tiles")
    ap.add_argument("--crops", type=Path, default=SHARED / "aidpath_glomeruli")
    ap.add_argument("--amounts", type=float, nargs="+", default=list(AMOUNTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bn-steps", type=int, default=20)
    ap.add_argument("--encoder", default="efficientnet-b3", help="U-Net encoder (as train segment)")
    ap.add_argument("--init", default=None, help="start every run from this model (fine-tuning)")
    ap.add_argument("--mask-size", type=int, default=256, help="mask canvas (the inpainting crop), px")
    ap.add_argument("--diameter-range", type=float, nargs=2, default=None,
                    help="spread mask diameters evenly over this range (px); default: drawn from the real "
                         "sclerosed glomeruli of the training split")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    base = prepare_base(args.work, args.tiles, args.crops)
    from glomscan.augment.crops import sclerosed_census

    census = sclerosed_census(base, pd.read_csv(base / "manifest.csv", dtype={"patch_id": str, "slide": str}), "train")
    count = max(1, round(max(args.amounts) * census.total))
    diameters = real_sclerosed_diameters_px(base) if args.diameter_range is None else tuple(args.diameter_range)
    masks = make_masks(args.work, args.maskgan, count, diameters, 0, args.mask_size) if max(args.amounts) > 0 else []
    rows = []
    for amount in args.amounts:
        data = synthetic_set(args.work, base, amount, args.generator, masks, 0)
        for seed in args.seeds:
            rows.append(train_and_score(args.work, base, data, amount, seed, args))
            pd.DataFrame(rows).to_csv(args.work / "ablation.csv", index=False)
    table = pd.DataFrame(rows)
    text = table_markdown(table)
    print(table.to_string(index=False))
    print(text)
    header = (f"Real sclerosed glomeruli in the training split: {census.total}. Each run: {args.epochs} epochs x "
              f"{args.steps} steps, batch {args.batch_size}, {args.crop} px crops, lr {args.lr}"
              f"{', from ' + str(args.init) if args.init else ', random init'}; seeds {args.seeds}.\n\n")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(header + text)


if __name__ == "__main__":
    main()
