"""Training the 2-class U-Net: loss 0.5 * BCE + Dice, Adam, cosine LR to 1e-5, flips and 90°
rotations, keep the checkpoint with the best validation Dice, resumable."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_torch_save
from ..model import ModelCard, build_model, save_checkpoint
from ..progress import Progress
from .data import load_patch
from .metrics import pixel_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 1e-5
    crop: int | None = None
    """Random crop side for training (None: whole patches, as the paper). Validation always
    uses whole patches."""
    encoder: str = "efficientnet-b3"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    encoder_weights: str | None = None
    """Local file with encoder weights (state dict); nothing is downloaded."""
    analysis_mpp: float = 1.0
    seed: int = 0
    workers: int = 0
    max_steps_per_epoch: int | None = None
    bn_recalibration_steps: int = 20
    """Before each validation, re-estimate BatchNorm statistics exactly over this many training
    batches (smp's EfficientNet uses momentum 0.01, so short runs otherwise validate with stale
    running statistics). 0 disables."""
    name: str = "glomscan-unet"
    trained_on: str = ""


def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) labels 0/1/2 -> (N, 2, H, W) float one-hot of normal, sclerosed."""
    return torch.stack([(labels == 1), (labels == 2)], dim=1).float()


class BceDiceLoss(nn.Module):
    """0.5 * BCE-with-logits + (1 - soft Dice), Dice averaged over the two class channels."""

    def __init__(self, bce_weight: float = 0.5, smooth: float = 1.0):
        super().__init__()
        self.bce_weight, self.smooth = bce_weight, smooth
        self.bce = nn.BCEWithLogitsLoss()

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        dims = (0, 2, 3)
        inter = (p * target).sum(dims)
        dice = (2 * inter + self.smooth) / (p.sum(dims) + target.sum(dims) + self.smooth)
        return 1 - dice.mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce_weight * self.bce(logits, target) + self.dice_loss(logits, target)


class PatchDataset(Dataset):
    def __init__(self, dataset_dir: Path, manifest: pd.DataFrame, card: ModelCard, augment: bool,
                 crop: int | None = None, seed: int = 0):
        self.dir = Path(dataset_dir)
        self.rows = manifest.to_dict("records")
        self.mean = np.asarray(card.mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(card.std, np.float32).reshape(3, 1, 1)
        self.augment, self.crop = augment, crop
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        image, labels = load_patch(self.dir, self.rows[i])
        if self.crop and self.crop < image.shape[0]:
            y = self.rng.integers(0, image.shape[0] - self.crop + 1)
            x = self.rng.integers(0, image.shape[1] - self.crop + 1)
            image, labels = image[y:y + self.crop, x:x + self.crop], labels[y:y + self.crop, x:x + self.crop]
        if self.augment:
            k = int(self.rng.integers(4))
            image, labels = np.rot90(image, k), np.rot90(labels, k)
            if self.rng.random() < 0.5:
                image, labels = image[:, ::-1], labels[:, ::-1]
            if self.rng.random() < 0.5:
                image, labels = image[::-1], labels[::-1]
        x = (image.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))


def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, device: str, steps: int) -> None:
    """Replace BatchNorm running statistics by their exact average over ``steps`` batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or steps <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for step, (x, _) in enumerate(loader):
            if step >= steps:
                break
            model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def evaluate_model(model: nn.Module, loader: DataLoader, device: str) -> dict:
    """Pixel metrics over a loader (thresholded sigmoid at 0.5)."""
    model.eval()
    tp = np.zeros(2)
    fp = np.zeros(2)
    fn = np.zeros(2)
    with torch.inference_mode():
        for x, labels in loader:
            pred = torch.sigmoid(model(x.to(device))).cpu() >= 0.5
            target = targets_from_labels(labels).bool()
            for c in range(2):
                tp[c] += (pred[:, c] & target[:, c]).sum().item()
                fp[c] += (pred[:, c] & ~target[:, c]).sum().item()
                fn[c] += (~pred[:, c] & target[:, c]).sum().item()
    return pixel_metrics(tp, fp, fn)


def train_segmentation(dataset_dir: Path, out_path: Path, config: TrainConfig, quiet: bool = False) -> dict:
    """Train; writes ``out_path`` (best validation Dice, fp32, glomscan checkpoint),
    ``<out>.last.pt`` (resume state) and ``<out>.metrics.csv``. Returns the best metrics."""
    dataset_dir, out_path = Path(dataset_dir), Path(out_path)
    manifest = pd.read_csv(dataset_dir / "manifest.csv")
    train_rows, val_rows = manifest[manifest.split == "train"], manifest[manifest.split == "val"]
    if train_rows.empty or val_rows.empty:
        raise ValueError(f"{dataset_dir}: need patches in both splits (train {len(train_rows)}, val {len(val_rows)})")
    torch.manual_seed(config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tile = int(manifest.tile.iloc[0])
    card = ModelCard(name=config.name, encoder=config.encoder, encoder_depth=config.encoder_depth,
                     decoder_channels=tuple(config.decoder_channels), analysis_mpp=config.analysis_mpp, tile=tile,
                     trained_on=config.trained_on or f"{dataset_dir.name}: {manifest.slide.nunique()} slides, "
                                                     f"{len(train_rows)} train / {len(val_rows)} val patches")
    model = build_model(card)
    if config.encoder_weights:
        state = torch.load(config.encoder_weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        log.info("encoder weights from %s (%d missing, %d unexpected keys)", config.encoder_weights, len(missing), len(unexpected))
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs, eta_min=config.min_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device == "cuda")
    loss_fn = BceDiceLoss()
    last_path = out_path.with_suffix(".last.pt")
    metrics_path = out_path.with_suffix(".metrics.csv")
    start_epoch, best_dice, history = 0, -1.0, []
    if last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_dice = state["epoch"] + 1, state["best_dice"]
        history = pd.read_csv(metrics_path).to_dict("records") if metrics_path.is_file() else []
        log.info("resuming from %s at epoch %d (best val Dice %.4f)", last_path, start_epoch, best_dice)
    train_loader = DataLoader(PatchDataset(dataset_dir, train_rows, card, True, config.crop, config.seed),
                              batch_size=config.batch_size, shuffle=True, num_workers=config.workers, drop_last=False,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(PatchDataset(dataset_dir, val_rows, card, False), batch_size=config.batch_size,
                            num_workers=config.workers)
    best = {}
    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        steps = len(train_loader) if config.max_steps_per_epoch is None else min(len(train_loader), config.max_steps_per_epoch)
        with Progress(steps, f"epoch {epoch + 1}/{config.epochs}", quiet=quiet, unit="step") as progress:
            for step, (x, labels) in enumerate(train_loader):
                if step >= steps:
                    break
                x, target = x.to(device), targets_from_labels(labels).to(device)
                optimiser.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=device == "cuda"):
                    loss = loss_fn(model(x).float(), target)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                losses.append(loss.item())
                progress.update()
        scheduler.step()
        recalibrate_batchnorm(model, train_loader, device, config.bn_recalibration_steps)
        val = evaluate_model(model, val_loader, device)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t0, 1), **{f"val_{k}": v for k, v in val.items()}}
        history.append(row)
        pd.DataFrame(history).to_csv(metrics_path, index=False)
        log.info("epoch %d: loss %.4f, val Dice normal %.4f sclerosed %.4f mean %.4f", epoch + 1, row["train_loss"],
                 val["dice_normal"], val["dice_sclerosed"], val["dice_mean"])
        if val["dice_mean"] > best_dice:
            best_dice, best = val["dice_mean"], val
            save_checkpoint(out_path, model.cpu(), replace(card, metrics={"epoch": epoch + 1, **val}))
            model.to(device)
        atomic_torch_save(last_path, {"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                                      "scheduler": scheduler.state_dict(), "epoch": epoch, "best_dice": best_dice,
                                      "config": asdict(config)})
    return best
