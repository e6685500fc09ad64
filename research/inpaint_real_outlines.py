"""The inpainting GAN trained on real sclerosed glomeruli with their true outlines (issue #15).

Data: the globally sclerosed crops of ../shared/data/aidpath_glomeruli (pathologist labels,
real outlines), put on a 256 px canvas of real tissue from ../shared/data/aidpath_tiles by
``glomscan.augment.outline_crops.make_outline_crops`` (split by slide exactly as ``prepare``
splits the crop set: the held-out "test" crops are those of the segmentation model's
validation slides). Training: ``train_inpainting`` (resumable: run the same command again to
continue, raise ``--epochs`` to train longer). Evaluation on the held-out crops at the canvas
size, inside the outline, against the ring-mean and biharmonic fills and the paper.

Phases: ``--phase crops`` (build the crops folder), ``train``, ``evaluate`` or ``all`` (default).
Everything goes to ``--work`` (outside the repository); ``--report FILE.md`` also writes the
result table (markdown) there.

    OMP_NUM_THREADS=2 .venv/bin/python research/inpaint_real_outlines.py --work /tmp/inpaint-real \\
        --size 128 --base-channels 32 --epochs 60 --feature-model glomscan/models/default.onnx
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from glomscan.checkpoint import read_checkpoint_file
from glomscan.augment.crops import crop_ids, read_crops
from glomscan.augment.inpaint import PAPER_METRICS, InpaintSettings, evaluate_crops_dir, train_inpainting
from glomscan.augment.inpaint_baselines import FILLS, fill_metrics
from glomscan.augment.outline_crops import OutlineCropSettings, make_outline_crops
from glomscan.augment.settings import GENERATOR_UPSAMPLING

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build(work: Path, args) -> Path:
    crops_dir = work / "crops"
    if not (crops_dir / "manifest.csv").is_file():
        manifest = make_outline_crops(SHARED / "aidpath_glomeruli", crops_dir,
                                      OutlineCropSettings(size=args.canvas, classes="sclerosed"),
                                      tiles_dir=SHARED / "aidpath_tiles")
        print(f"crops: {len(manifest)} sclerosed ({(manifest.split == 'train').sum()} train / "
              f"{(manifest.split == 'test').sum()} held out, slides {sorted(manifest[manifest.split == 'test'].slide.unique())})")
    return crops_dir


def last_epochs_beating_fills(metrics_csv: Path, result: pd.DataFrame, last: int = 10) -> str:
    """How many of the last ``last`` epochs' held-out means (the training CSV, same crops and
    metrics) beat every fill on all three metrics, with their ranges: the GAN's epoch-to-epoch
    spread around the evaluated final epoch. With a generator average, the same for the
    trained generator (the CSV's ``raw_test_*``) where those epochs have it."""
    if not metrics_csv.is_file():
        return ""
    rows = pd.read_csv(metrics_csv).tail(last)
    fills = result[result.method.isin(list(FILLS))]
    epochs = f"Epochs {int(rows.epoch.min())}-{int(rows.epoch.max())}"

    def beating(prefix: str) -> str:
        mae, psnr, ssim = rows[f"{prefix}mae"], rows[f"{prefix}psnr"], rows[f"{prefix}ssim"]
        beats = (mae < fills.mae.min()) & (psnr > fills.psnr.max()) & (ssim > fills.ssim.max())
        return (f"{int(beats.sum())} of {len(rows)} beat both fills on all three metrics (held-out MAE "
                f"{mae.min():.4f}-{mae.max():.4f}, PSNR {psnr.min():.2f}-{psnr.max():.2f} dB, "
                f"SSIM {ssim.min():.3f}-{ssim.max():.3f})")

    text = f"{epochs}: {beating('test_')}."
    if "raw_test_mae" in rows and rows.raw_test_mae.notna().all():
        text += f" The trained generator behind the average, same epochs: {beating('raw_test_')}."
    return text


def bootstrap_differences(generator: pd.DataFrame, fill: pd.DataFrame, draws: int = 10_000) -> dict[str, tuple]:
    """Per metric: the mean over crops of generator minus fill and its 95 % interval from
    resampling the crops (``draws`` bootstrap draws, seed 0)."""
    rng = np.random.default_rng(0)
    out = {}
    for k in ("mae", "psnr", "ssim"):
        d = generator[k].to_numpy() - fill[k].to_numpy()
        means = d[rng.integers(0, len(d), (draws, len(d)))].mean(axis=1)
        out[k] = (float(d.mean()), *(float(v) for v in np.percentile(means, [2.5, 97.5])))
    return out


def evaluate(work: Path, crops_dir: Path, generator: Path, report: Path | None) -> pd.DataFrame:
    test = read_crops(crops_dir, "test")
    table, summary = evaluate_crops_dir(generator, crops_dir, "test")
    info = read_checkpoint_file(generator, "inpaint-generator").card["info"]
    decay = info["settings"].get("ema_decay", 0.0)
    name = f"generator average (decay {decay})" if decay else "generator"
    decay_after = info["settings"].get("lr_decay_after_epoch")
    if decay_after is not None:
        name += f", lr falling to 0 after epoch {decay_after}"
    rows = [{"method": f"{name} (epoch {info['epoch']}, {info['size']} px, c = {info['settings']['base_channels']})",
             **dict(zip(summary.metric, summary.value))}]
    per_crop = {"generator": table}
    for name, fill in FILLS.items():
        metrics = pd.DataFrame(fill_metrics(test, fill))
        per_crop[name] = metrics
        rows.append({"method": name, **metrics[["mae", "psnr", "ssim"]].mean().to_dict()})
    rows.append({"method": "paper (256 px, 100 epochs, GPU, their data)", **PAPER_METRICS})
    result = pd.DataFrame(rows)
    ids = crop_ids(crops_dir, "test")
    wins = {f"{k}_wins_vs_{n}": int(sum((per_crop["generator"][k].values < per_crop[n][k].values) if k == "mae"
                                        else (per_crop["generator"][k].values > per_crop[n][k].values)))
            for n in FILLS for k in ("mae", "psnr", "ssim")}
    ring = bootstrap_differences(per_crop["generator"], per_crop["ring mean"])
    intervals = ("Generator minus ring mean over the crops, mean (95 % bootstrap interval): "
                 + ", ".join(f"{k.upper()} {m:+.4f} ({lo:+.4f} to {hi:+.4f})" for k, (m, lo, hi) in ring.items()))
    print(result.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"{len(ids)} held-out crops; per-crop wins of the generator: {wins}")
    print(intervals)
    stability = last_epochs_beating_fills(generator.with_suffix(".metrics.csv"), result)
    if stability:
        print(stability)
    result.to_csv(work / "evaluation.csv", index=False)
    if report:
        lines = [f"| held-out {len(ids)} crops, inside the outline | MAE | PSNR (dB) | SSIM |", "|---|---|---|---|"]
        lines += [f"| {r.method} | {r.mae:.4f} | {r.psnr:.2f} | {r.ssim:.3f} |" for r in result.itertuples()]
        lines += ["", f"Per-crop wins of the generator (of {len(ids)}): "
                  + ", ".join(f"{k.replace('_wins_vs_', ' vs ')} {v}" for k, v in wins.items()), "", intervals,
                  *(["", stability] if stability else []),
                  "", f"Measured on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
                  f"generator info: vgg = {info['vgg']!r}, train crops {info['train_crops']}."]
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("\n".join(lines) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="crops, generator, CSVs, samples (not the repo)")
    ap.add_argument("--phase", choices=["crops", "train", "evaluate", "all"], default="all")
    ap.add_argument("--canvas", type=int, default=256, help="crop canvas side (the paper: 256)")
    ap.add_argument("--size", type=int, default=None, help="training side (default: the canvas)")
    ap.add_argument("--base-channels", type=int, default=64)
    ap.add_argument("--upsampling", choices=GENERATOR_UPSAMPLING, default="resize",
                    help="decoder x2 upsampling (transposed: the generators trained before)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--feature-model", default=None, help="glomscan model file: its encoder is the feature network")
    ap.add_argument("--vgg-weights", default=None, help="or a local torchvision VGG19 state dict")
    ap.add_argument("--style-weight", type=float, default=150.0, help="weight of the style loss (paper: 150, for VGG19)")
    ap.add_argument("--perceptual-weight", type=float, default=0.1)
    ap.add_argument("--ssim-weight", type=float, default=0.0, help="weight of 1 - SSIM inside the mask (not in the paper)")
    ap.add_argument("--ema-decay", type=float, default=0.0,
                    help="save and evaluate a moving average of the generator with this per-step decay (0: off)")
    ap.add_argument("--lr-decay-after-epoch", type=int, default=None,
                    help="keep the learning rate up to this epoch, then a half cosine to 0 at the last (default: constant)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--report", type=Path, default=None, help="markdown table of the evaluation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    if not (SHARED / "aidpath_glomeruli").is_dir():
        raise SystemExit(f"{SHARED / 'aidpath_glomeruli'} not found (the shared data)")
    args.work.mkdir(parents=True, exist_ok=True)
    crops_dir = build(args.work, args)
    generator = args.work / "generator.pt"
    if args.phase in ("train", "all"):
        settings = InpaintSettings(epochs=args.epochs, batch_size=args.batch_size, size=args.size,
                                   base_channels=args.base_channels, upsampling=args.upsampling,
                                   precision=args.precision,
                                   feature_model=args.feature_model, vgg_weights=args.vgg_weights, seed=0,
                                   style_weight=args.style_weight, perceptual_weight=args.perceptual_weight,
                                   ssim_weight=args.ssim_weight, ema_decay=args.ema_decay,
                                   lr_decay_after_epoch=args.lr_decay_after_epoch)
        t0 = time.perf_counter()
        train_inpainting(crops_dir, generator, settings, quiet=True)
        print(f"training: {(time.perf_counter() - t0) / 60:.1f} min this call")
    if args.phase in ("evaluate", "all"):
        evaluate(args.work, crops_dir, generator, args.report)


if __name__ == "__main__":
    main()
