"""Training the 2-class U-Net: loss 0.5 * BCE + Dice, Adam, cosine LR to 1e-5, flips and 90°
rotations, keep the checkpoint with the best validation Dice, resumable."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ...imaging import dihedral, from_optical_density, optical_density
from ...labels import NORMAL, SCLEROSED, UNKNOWN_CLASS
from ...model import ModelCard, build_model, load_model, save_checkpoint
from ...progress import Progress
from ..dataset.data import load_patch
from .harness import TrainingDevice, TrainingRun, choose_training_device, seed_training
from ..dataset.resident import ResidentPatches
from ..evaluation.metrics import dice, glomerulus_counts, known_class_counts, pixel_metrics
from ..settings import SegmentSettings

log = logging.getLogger(__name__)


def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) labels 0/1/2 -> (N, 2, H, W) float one-hot of normal, sclerosed (label 3,
    glomerulus of unknown class, is in neither channel: see ``PartialLabelLoss``)."""
    return torch.stack([(labels == NORMAL), (labels == SCLEROSED)], dim=1).float()


def glomerulus_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(glomerulus) = 1 - (1 - p_normal)(1 - p_sclerosed) from (N, 2, H, W) logits, the union of
    the two class probabilities, computed stably (never exactly 0)."""
    log_background = F.logsigmoid(-logits[:, 0]) + F.logsigmoid(-logits[:, 1])
    return -torch.expm1(log_background.clamp(max=-1e-7))


class PartialLabelLoss(nn.Module):
    """The paper's 0.5 * BCE + Dice where the class is known, glomerulus-vs-background where not.

    Labels: 0 background, 1 normal, 2 sclerosed, 3 glomerulus of unknown class. Known pixels
    (0/1/2) get per-channel BCE and enter the per-class soft Dice. An unknown pixel gets BCE on
    the union P(glomerulus) = 1 - (1 - p_normal)(1 - p_sclerosed) against 1 (counted for both
    channels) and is left out of the class Dice; when a batch has unknown pixels, a soft Dice of
    the union over all pixels joins the class Dice terms. The loss on an unknown pixel depends on
    the two class probabilities only through their union, so it never pushes the class split.
    With no unknown pixels this is exactly 0.5 * BCEWithLogits + (1 - mean class Dice).
    """

    def __init__(self, bce_weight: float = 0.5, smooth: float = 1.0):
        super().__init__()
        self.bce_weight, self.smooth = bce_weight, smooth

    def _dice(self, p: torch.Tensor, target: torch.Tensor, dims) -> torch.Tensor:
        inter = (p * target).sum(dims)
        return (2 * inter + self.smooth) / (p.sum(dims) + target.sum(dims) + self.smooth)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = targets_from_labels(labels)
        unknown = (labels == UNKNOWN_CLASS)
        known = (~unknown).unsqueeze(1).float()
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce_sum = (per_pixel * known).sum()
        p = torch.sigmoid(logits)
        dices = self._dice(p * known, target, (0, 2, 3))
        if unknown.any():
            union = glomerulus_probability(logits)
            bce_sum = bce_sum - 2 * torch.log(union[unknown]).sum()
            dices = torch.cat([dices, self._dice(union, (labels > 0).float(), (0, 1, 2)).reshape(1)])
        bce = bce_sum / per_pixel.numel()
        return self.bce_weight * bce + (1 - dices.mean())




class PatchDataset(Dataset):
    def __init__(self, dataset_dir: Path, manifest: pd.DataFrame, card: ModelCard, augment: bool,
                 crop: int | None = None, seed: int = 0, stain_jitter: float = 0.0,
                 jpeg_min_quality: int | None = None):
        self.dir = Path(dataset_dir)
        self.rows = manifest.to_dict("records")
        self.mean = np.asarray(card.mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(card.std, np.float32).reshape(3, 1, 1)
        self.augment, self.crop, self.stain_jitter = augment, crop, stain_jitter
        self.jpeg_min_quality = jpeg_min_quality
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
            flip = self.rng.random() < 0.5
            image, labels = dihedral(image, k, flip), dihedral(labels, k, flip)
            if self.rng.random() < 0.5:
                image, labels = image[::-1], labels[::-1]
            if self.stain_jitter > 0:
                image = jitter_stain(image, self.stain_jitter, self.rng)
            if self.jpeg_min_quality is not None and self.rng.random() < 0.5:
                image = jpeg_roundtrip(image, int(self.rng.integers(self.jpeg_min_quality, 96)))
        x = (image.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))


def seed_worker(worker_id: int) -> None:
    """Give each loader process its own augmentation stream, derived from the loader's seed
    (otherwise every process would repeat the same random crops, flips and stain gains)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng(info.seed)


def jpeg_roundtrip(image: np.ndarray, quality: int, chroma_subsampling: bool = True) -> np.ndarray:
    """``image`` after JPEG compression, by default with 4:2:0 chroma subsampling as scanners
    store slides."""
    import pyvips

    from ...imaging import image_to_array

    height, width = image.shape[:2]
    vips = pyvips.Image.new_from_memory(np.ascontiguousarray(image).tobytes(), width, height, 3, "uchar")
    encoded = vips.jpegsave_buffer(Q=quality, subsample_mode="on" if chroma_subsampling else "off")
    return image_to_array(pyvips.Image.new_from_buffer(encoded, ""))[..., :3]


def jitter_stain(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Whole-patch stain variation: optical density scaled per channel by 1 +- ``amount`` and
    overall by 1 +- ``amount`` (staining intensity), as between labs and scanners."""
    od = optical_density(image)
    gain = rng.uniform(1 - amount, 1 + amount, size=3) * rng.uniform(1 - amount, 1 + amount)
    return from_optical_density(od * gain.astype(np.float32)).astype(np.uint8)


def recalibrate_batchnorm(model: nn.Module, loader, device: TrainingDevice, steps: int) -> None:
    """Replace BatchNorm running statistics by their exact average over ``steps`` batches of
    ``loader`` (any iterable of (images, labels) batches)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or steps <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad(), device.autocast():
        for step, (x, _) in enumerate(loader):
            if step >= steps:
                break
            model(device.prepare(x))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def validate(model: nn.Module, loader: DataLoader, device: TrainingDevice, min_area_px: float = 0.0) -> dict:
    """Pixel metrics of the labels analyze would paint (glomeruli classified by the one decision
    rule, ``postprocess.glomerulus_class``): per class over the pixels of known class
    (glomeruli of unknown class left out), and glomerulus-vs-background (``dice_glomerulus``)
    over all pixels."""
    from ..evaluation.evaluate import predicted_labels

    model.eval()
    tp, fp, fn = np.zeros(2), np.zeros(2), np.zeros(2)
    glomerulus = np.zeros(3)
    with torch.inference_mode(), device.autocast():
        for x, labels in loader:
            probabilities = torch.sigmoid(model(device.prepare(x)).float()).cpu().numpy()
            for prob, truth in zip(probabilities, labels.numpy()):
                pred = predicted_labels(prob, min_area_px=min_area_px)
                t, f, n = known_class_counts(pred, truth)
                tp, fp, fn = tp + t, fp + f, fn + n
                glomerulus += glomerulus_counts(pred, truth)
    metrics = pixel_metrics(tp, fp, fn)
    metrics["dice_glomerulus"] = dice(*glomerulus, empty=0.0)
    metrics["selection_score"] = float(np.nanmean([metrics["dice_mean"], metrics["dice_glomerulus"]]))
    return metrics


class ResidentBatches:
    """Training batches cut and augmented on the training device (``--data-on-device``): an
    endless iterable with a loader's length (patches // batch size), as the loop expects."""

    def __init__(self, patches: ResidentPatches, settings: SegmentSettings):
        self.patches, self.settings = patches, settings

    def __len__(self) -> int:
        return max(1, len(self.patches) // self.settings.batch_size)

    def __iter__(self):
        s = self.settings
        while True:
            yield self.patches.batch(s.batch_size, s.crop, s.stain_jitter, s.jpeg_min_quality, s.scale_jitter)


class Batches:
    """Batches drawn from a loader without end: an epoch of a fixed number of steps takes up
    where the last one stopped, and the loader starts over when it runs out."""

    def __init__(self, loader):
        self.loader, self._iterator = loader, iter(())

    def next(self):
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.loader)
            return next(self._iterator)


def train_one_epoch(model: nn.Module, batches: Batches, steps: int, loss_fn: nn.Module, optimiser, scaler,
                    device: TrainingDevice, on_step=None) -> float:
    """``steps`` optimiser steps on ``batches`` (images, labels) in training mode, under the
    device's autocast and gradient scaler; returns the mean loss (after torchvision's reference
    scripts: ``train_one_epoch``, with :func:`validate` after it)."""
    model.train()
    losses = []
    for _ in range(steps):
        x, labels = batches.next()
        x, labels = device.prepare(x), labels.to(device.device)
        optimiser.zero_grad(set_to_none=True)
        with device.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    return float(np.mean(losses))


def segmentation_card(settings: SegmentSettings, manifest: pd.DataFrame, dataset_name: str) -> ModelCard:
    """The card of the network ``settings`` ask for, trained on the prepared set ``manifest``."""
    n_train, n_val = int((manifest.split == "train").sum()), int((manifest.split == "val").sum())
    return ModelCard(name=settings.name, encoder=settings.encoder, encoder_depth=settings.encoder_depth,
                     decoder_channels=tuple(settings.decoder_channels), analysis_mpp=settings.analysis_mpp,
                     tile=settings.tile or int(manifest.tile.iloc[0]),
                     trained_on=settings.trained_on or f"{dataset_name}: {manifest.slide.nunique()} slides, "
                                                     f"{n_train} train / {n_val} val patches",
                     **{k: v for k, v in (("intended_use", settings.intended_use), ("licence", settings.licence)) if v})


def initial_network(card: ModelCard, settings: SegmentSettings) -> nn.Module:
    """The network of ``card``: random weights, or a glomscan model's (``--init``, same
    architecture), or an encoder state dict's (``--encoder-weights``)."""
    model = build_model(card)
    if settings.init:
        init = load_model(settings.init)
        architecture = ("encoder", "encoder_depth", "decoder_channels", "classes")
        if any(getattr(init.card, k) != getattr(card, k) for k in architecture):
            raise ValueError(f"--init {settings.init}: its architecture ({', '.join(f'{k} {getattr(init.card, k)}' for k in architecture)}) "
                             "differs from the one asked for")
        model.load_state_dict(init.torch_module().state_dict())
        log.info("weights from %s (%s)", settings.init, init.model_id)
    if settings.encoder_weights:
        state = torch.load(settings.encoder_weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        log.info("encoder weights from %s (%d missing, %d unexpected keys)", settings.encoder_weights, len(missing), len(unexpected))
    return model


def segmentation_loaders(dataset_dir: Path, manifest: pd.DataFrame, card: ModelCard, settings: SegmentSettings,
                         device: TrainingDevice, start_epoch: int):
    """(training batches, validation loader): the training patches cut and augmented by loader
    processes, or on the training device (``--data-on-device``), seeded for ``start_epoch`` so
    that a resumed run draws afresh from where it starts."""
    train_rows, val_rows = manifest[manifest.split == "train"], manifest[manifest.split == "val"]
    pin_memory = device.device.startswith("cuda")
    # loader processes start from a clean server process, not forked from this one: a fork
    # taken while libvips threads hold locks (e.g. after `prepare` in the same process) hangs
    context = "forkserver" if settings.workers > 0 else None
    if settings.data_on_device:
        train_loader = ResidentBatches(ResidentPatches(dataset_dir, train_rows, device.device, card.mean, card.std,
                                                       seed=settings.seed * 1000 + start_epoch), settings)
    else:
        sampler_generator = torch.Generator().manual_seed(settings.seed + start_epoch)
        train_loader = DataLoader(PatchDataset(dataset_dir, train_rows, card, True, settings.crop,
                                               settings.seed + start_epoch, settings.stain_jitter,
                                               settings.jpeg_min_quality),
                                  batch_size=settings.batch_size, shuffle=True, num_workers=settings.workers,
                                  drop_last=True, generator=sampler_generator, worker_init_fn=seed_worker,
                                  pin_memory=pin_memory, multiprocessing_context=context)
    val_loader = DataLoader(PatchDataset(dataset_dir, val_rows, card, False), batch_size=settings.batch_size,
                            num_workers=settings.workers, pin_memory=pin_memory, multiprocessing_context=context)
    return train_loader, val_loader


def train_segmentation(dataset_dir: Path, out_path: Path, settings: SegmentSettings, quiet: bool = False) -> dict:
    """Train; writes ``out_path`` (best validation selection score, fp32, glomscan checkpoint),
    ``<out>.last.pt`` (resume state) and ``<out>.metrics.csv``. Returns the best metrics.
    The selection score is the mean of the class Dice (known-class pixels) and the glomerulus
    Dice (all pixels), so that tiles with unknown-class glomeruli count too."""
    dataset_dir, out_path = Path(dataset_dir), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_csv(dataset_dir / "manifest.csv")
    n_train, n_val = int((manifest.split == "train").sum()), int((manifest.split == "val").sum())
    if not n_train or not n_val:
        raise ValueError(f"{dataset_dir}: need patches in both splits (train {n_train}, val {n_val})")
    if settings.scale_jitter and not settings.data_on_device:
        raise ValueError("scale augmentation (--scale-jitter) runs on the training device: add --data-on-device")
    seed_training(settings.seed)
    device = choose_training_device(settings.precision, device=settings.device)
    log.info("training on %s", device.reason)
    card = segmentation_card(settings, manifest, dataset_dir.name)
    model = initial_network(card, settings).to(device.device)
    if device.channels_last:
        model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.epochs, eta_min=settings.min_lr)
    scaler = device.grad_scaler()
    loss_fn = PartialLabelLoss()
    run = TrainingRun(out_path, {"model": model, "optimiser": optimiser, "scheduler": scheduler, "scaler": scaler},
                      optional=("scaler",))
    resumed = run.resume()
    best_score, best = resumed.get("best_score", -1.0), resumed.get("best", {})
    if run.start_epoch:
        log.info("best validation score so far %.4f", best_score)
    if device.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    train_loader, val_loader = segmentation_loaders(dataset_dir, manifest, card, settings, device, run.start_epoch)
    batches = Batches(train_loader)
    for epoch in range(run.start_epoch, settings.epochs):
        t0 = time.perf_counter()
        steps = len(train_loader) if settings.max_steps_per_epoch is None else settings.max_steps_per_epoch
        with Progress(steps, f"epoch {epoch + 1}/{settings.epochs}", quiet=quiet, unit="step") as progress:
            train_loss = train_one_epoch(model, batches, steps, loss_fn, optimiser, scaler, device, progress.update)
        scheduler.step()
        recalibrate_batchnorm(model, train_loader, device, settings.bn_recalibration_steps)
        val = validate(model, val_loader, device)
        metrics = {"train_loss": train_loss, "lr": optimiser.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 1), **{f"val_{k}": v for k, v in val.items()}}
        log.info("epoch %d: loss %.4f, val Dice normal %.4f sclerosed %.4f glomerulus %.4f", epoch + 1,
                 metrics["train_loss"], val["dice_normal"], val["dice_sclerosed"], val["dice_glomerulus"])
        score = val["selection_score"]
        if score > best_score:
            best_score, best = score, val
            save_checkpoint(out_path, model, replace(card, metrics={"epoch": epoch + 1, **val}))
        run.end_epoch(epoch, metrics, best_score=best_score, best=best, config=asdict(settings))
    return best
