"""Training and using the inpainting generator (issue #5, steps 4 and 7).

- :func:`train_inpainting`: Adam (lr 1e-4, betas 0.5/0.999; optionally decaying, see
  :func:`learning_rate_factor`), batch 16, LSGAN with a global and
  a local discriminator, losses of :mod:`.inpaint_losses`; AMP on CUDA only; resumable from
  ``<out>.last.pt``; writes ``<out>`` (the generator, every epoch), ``<out>.metrics.csv`` (one
  row per epoch: every loss term and MAE/PSNR/SSIM inside the mask on the held-out crops) and
  ``<out>.samples/epoch_NNN.png`` (rows: masked input | generated, composited | original).
  With ``ema_decay`` the saved and evaluated generator is the moving average of the trained
  one (:func:`generator_average`); the CSV then also has the trained one's ``raw_test_*``.
  Its parts: :class:`InpaintGanStep` (one discriminator and one generator update, owning the
  optimisers), :func:`train_one_epoch` and :func:`validate`.
- :func:`save_generator` / :func:`load_inpainter` / :class:`Inpainter`: the generator file and
  the callable that ``synthesize`` uses.
- :func:`inpainting_metrics`: MAE, PSNR, SSIM inside the generated region (scikit-image).

Conventions: images in [-1, 1] inside the networks; the hole of the generator input is 0 (mid
grey); masks are 1 on the glomerulus.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import read_checkpoint_file, save_checkpoint_file
from ..imaging import dihedral, write_png
from ..progress import Progress
from .inpaint_losses import (GeneratorLoss, InpaintLossWeights, load_segmentation_features, load_vgg19_features,
                             lsgan_discriminator_loss)
from ..train.fit.harness import TrainingDevice, TrainingRun, choose_training_device, seed_training
from .inpaint_models import InpaintGenerator, PatchDiscriminator, generator_input, local_view
from .settings import InpaintSettings

log = logging.getLogger(__name__)

PAPER_METRICS = {"mae": 0.0152, "psnr": 22.69, "ssim": 0.809}
"""He et al. 2024, inside the generated region."""


# --- conversions -----------------------------------------------------------------------------------

def images_to_tensor(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, size, size) float in [-1, 1] (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    return x


def masks_to_tensor(masks: np.ndarray, size: int | None = None) -> torch.Tensor:
    """(N, S, S) bool -> (N, 1, size, size) float {0, 1}. When resized, a pixel is in the mask
    if any part of it was (area > 0), so the hole never shrinks."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    if size is not None and size != m.shape[-1]:
        m = (F.interpolate(m, size=(size, size), mode="area") > 1e-6).float()
    return m


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The original with the generated pixels pasted inside the mask (any leading dims)."""
    return np.where(mask[..., None], generated, original)


def masked_input_view(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What the generator sees, for people: the hole painted mid-grey (0 in [-1, 1])."""
    return np.where(mask[..., None], np.uint8(128), image)


# --- the generator file and the inpainter ------------------------------------------------------------

def save_generator(path: Path, generator: InpaintGenerator, info: dict) -> None:
    """Write the generator (fp32 weights, architecture, ``info``; ``info["size"]`` is the crop
    side it was trained at) atomically to ``path``."""
    if "size" not in info:
        raise ValueError("save_generator: info must give the training crop 'size'")
    architecture = {"base_channels": generator.base_channels, "n_aot_blocks": generator.n_aot_blocks,
                    "upsampling": generator.upsampling}
    save_checkpoint_file(path, "inpaint-generator", {"architecture": architecture, "info": dict(info)},
                         {k: v.detach().float().cpu() for k, v in generator.state_dict().items()})


class Inpainter:
    """Callable: (images (N, S, S, 3) uint8 RGB, masks (N, S, S) bool) -> the RAW generator
    output (N, S, S, 3) uint8 (the whole reconstructed crop; the caller composites). The image
    pixels inside the mask are ignored (the hole is made here), so the original crop or X_gap may
    be passed. Crops of another side than :attr:`size` are resized to it (images bilinear and
    antialiased, masks so that the hole never shrinks) and the output resized back (bilinear)."""

    def __init__(self, generator: InpaintGenerator, size: int, device: str = "cpu", info: dict | None = None,
                 batch_size: int = 8):
        self.generator = generator.to(device).eval()
        self.size, self.device, self.info, self.batch_size = int(size), device, dict(info or {}), batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        images, masks = np.asarray(images), np.asarray(masks).astype(bool)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, S, S, 3) uint8, got {images.shape} {images.dtype}")
        if masks.shape != images.shape[:3]:
            raise ValueError(f"masks {masks.shape} do not match images {images.shape}")
        side = images.shape[1]
        if images.shape[2] != side:
            raise ValueError(f"crops must be square, got {images.shape[1]} x {images.shape[2]}")
        out = np.empty_like(images)
        for i in range(0, len(images), self.batch_size):
            x = images_to_tensor(images[i:i + self.batch_size], self.size).to(self.device)
            m = masks_to_tensor(masks[i:i + self.batch_size], self.size).to(self.device)
            y = self.generator(generator_input(x, m)).float()
            if side != self.size:
                y = F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False)
            out[i:i + self.batch_size] = tensor_to_images(y)
        return out


def load_inpainter(path: Path, device: str = "cpu") -> Inpainter:
    """The generator written by :func:`save_generator` (or by ``train inpaint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such generator file")
    saved = read_checkpoint_file(path, "inpaint-generator")
    # files written before the upsampling choice existed have transposed convolutions
    generator = InpaintGenerator(**{"upsampling": "transposed", **saved.card["architecture"]})
    generator.load_state_dict(saved.state_dict)
    return Inpainter(generator, saved.card["info"]["size"], device, saved.card["info"])


# --- metrics -------------------------------------------------------------------------------------------

def inpainting_metrics(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE, PSNR and SSIM inside ``mask`` between two (H, W, 3) uint8 images.

    - MAE: mean |original - generated| / 255 over the mask pixels and the 3 channels ([0, 1] scale).
    - PSNR: ``skimage.metrics.peak_signal_noise_ratio`` of the mask pixels only (data range
      255), i.e. 10 log10(255^2 / MSE) with the MSE over mask pixels and channels (inf if equal).
    - SSIM: the full SSIM map of ``skimage.metrics.structural_similarity`` (7 x 7 uniform
      window, channel_axis=2, data range 255) averaged over the mask pixels and channels. The
      windows at the mask edge see outside pixels too, so pass ``generated`` composited (outside
      the mask equal to the original), as :func:`evaluate_inpainter` does.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    mask = np.asarray(mask, bool)
    if original.shape != generated.shape or original.shape[:2] != mask.shape:
        raise ValueError(f"shapes differ: {original.shape}, {generated.shape}, mask {mask.shape}")
    if not mask.any():
        raise ValueError("empty mask: nothing was generated")
    o, g = original[mask].astype(np.float64), generated[mask].astype(np.float64)
    mae = float(np.abs(o - g).mean() / 255)
    if np.array_equal(o, g):
        psnr = math.inf
    else:
        psnr = float(peak_signal_noise_ratio(original[mask], generated[mask], data_range=255))
    _, ssim_map = structural_similarity(original, generated, channel_axis=2, data_range=255, full=True)
    return {"mae": mae, "psnr": psnr, "ssim": float(ssim_map[mask].mean())}


def evaluate_inpainter(inpainter, crops: list[tuple[np.ndarray, np.ndarray]], ids: list[str] | None = None
                       ) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-crop MAE/PSNR/SSIM of the composited inpainting; also returns the composited crops."""
    if not crops:
        raise ValueError("no crops to evaluate")
    images = np.stack([c[0] for c in crops])
    masks = np.stack([c[1] for c in crops])
    generated = composite(images, inpainter(images, masks), masks)
    rows = []
    for i, (image, mask) in enumerate(crops):
        rows.append({"crop_id": ids[i] if ids else i, "mask_px": int(mask.sum()),
                     **inpainting_metrics(image, generated[i], mask)})
    return pd.DataFrame(rows), generated


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Means over crops (PSNR: mean of the per-crop dB values)."""
    return {k: float(table[k].mean()) for k in ("mae", "psnr", "ssim")}


def evaluate_crops_dir(generator_path: Path, crops_dir: Path, split: str | None = "test", device: str = "cpu"
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``evaluate inpaint``: per-crop table and a summary (metric, value, paper)."""
    from .crops import crop_ids, read_crops

    inpainter = load_inpainter(generator_path, device)
    crops = read_crops(Path(crops_dir), split)
    if not crops:
        raise ValueError(f"{crops_dir}: no crops in split {split or 'all'!r}")
    table, _ = evaluate_inpainter(inpainter, crops, crop_ids(crops_dir, split))
    means = summarise(table)
    summary = pd.DataFrame([{"metric": k, "value": means[k], "paper": PAPER_METRICS[k]} for k in ("mae", "psnr", "ssim")])
    return table, summary


def sample_grid(images: np.ndarray, masks: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """One row per crop: masked input (hole mid-grey) | generated, composited | original, with
    4 px white gaps."""
    rows = []
    gap_v = np.full((images.shape[1], 4, 3), 255, np.uint8)
    for image, mask, gen in zip(images, masks, generated):
        rows.append(np.concatenate([masked_input_view(image, mask), gap_v, composite(image, gen, mask), gap_v, image], 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], 0)


# --- training ---------------------------------------------------------------------------------------

def _augment(x: torch.Tensor, m: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ms = [], []
    for xi, mi in zip(x, m):
        k, flip = int(rng.integers(4)), rng.random() < 0.5
        xi, mi = dihedral(xi, k, flip, dims=(1, 2)), dihedral(mi, k, flip, dims=(1, 2))
        xs.append(xi)
        ms.append(mi)
    return torch.stack(xs), torch.stack(ms)


def generator_average(generator: InpaintGenerator, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``generator``'s weights and buffers (BatchNorm running
    statistics): ``update_parameters(generator)`` after each step; the first update copies."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"the generator average's decay (--ema-decay) must be in (0, 1), or 0 for none; got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def learning_rate_factor(epoch: int, step: int, steps_per_epoch: int, epochs: int,
                         decay_after_epoch: int | None) -> float:
    """The factor on ``lr`` for ``step`` (0-based) of ``epoch`` (0-based): 1 without a decay and
    up to epoch ``decay_after_epoch``, then a half cosine falling to 0 at the end of ``epochs``
    (the factor of a step is taken at its start, so the first decaying step still has 1)."""
    if decay_after_epoch is None or epoch < decay_after_epoch:
        return 1.0
    decay_steps = (epochs - decay_after_epoch) * steps_per_epoch
    done = (epoch - decay_after_epoch) * steps_per_epoch + step
    return 0.5 * (1.0 + math.cos(math.pi * min(done / decay_steps, 1.0)))


@dataclass
class InpaintModels:
    generator: InpaintGenerator
    global_discriminator: PatchDiscriminator
    local_discriminator: PatchDiscriminator

    def modules(self) -> tuple[nn.Module, ...]:
        return self.generator, self.global_discriminator, self.local_discriminator


class InpaintGanStep:
    """One step of the inpainting GAN on a batch: one update of both discriminators (LSGAN, real
    crops against the detached generator output), then one of the generator (the losses of
    :class:`GeneratorLoss`), with ``device``'s autocast and one gradient scaler. Owns the two Adam
    optimisers and the scaler, which the resume state keeps (:meth:`stateful`)."""

    def __init__(self, models: InpaintModels, loss_fn: GeneratorLoss, settings: InpaintSettings,
                 device: TrainingDevice):
        self.models, self.loss_fn, self.device = models, loss_fn, device
        betas = tuple(settings.betas)
        self.g_optimiser = torch.optim.Adam(models.generator.parameters(), lr=settings.lr, betas=betas)
        self.d_optimiser = torch.optim.Adam(list(models.global_discriminator.parameters())
                                            + list(models.local_discriminator.parameters()), lr=settings.lr,
                                            betas=betas)
        self.scaler = device.grad_scaler()

    def stateful(self) -> dict:
        m = self.models
        return {"generator": m.generator, "global_discriminator": m.global_discriminator,
                "local_discriminator": m.local_discriminator, "g_optimiser": self.g_optimiser,
                "d_optimiser": self.d_optimiser, "scaler": self.scaler}

    def set_learning_rate(self, lr: float) -> None:
        for group in self.g_optimiser.param_groups + self.d_optimiser.param_groups:
            group["lr"] = lr

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """The losses of the step (``d_loss`` and the generator's terms) as floats."""
        g, dg, dl = self.models.modules()
        device, scaler = self.device, self.scaler
        with device.autocast():
            rec = g(generator_input(image, mask))
        # discriminators: real crops vs detached generator output
        self.d_optimiser.zero_grad(set_to_none=True)
        with device.autocast():
            fake = rec.detach()
            d_loss = (lsgan_discriminator_loss(dg(image), dg(fake))
                      + lsgan_discriminator_loss(dl(local_view(image, mask)), dl(local_view(fake, mask))))
        scaler.scale(d_loss).backward()
        scaler.step(self.d_optimiser)
        # generator, the discriminators frozen
        self.g_optimiser.zero_grad(set_to_none=True)
        self._discriminators_trainable(False)
        with device.autocast():
            terms = self.loss_fn(rec, image, mask, dg(rec), dl(local_view(rec, mask)))
        scaler.scale(terms["total"]).backward()
        scaler.step(self.g_optimiser)
        scaler.update()
        self._discriminators_trainable(True)
        return {"d_loss": float(d_loss.item()), **{k: float(v.item()) for k, v in terms.items()}}

    def _discriminators_trainable(self, trainable: bool) -> None:
        for p in list(self.models.global_discriminator.parameters()) + list(self.models.local_discriminator.parameters()):
            p.requires_grad_(trainable)


LOSS_COLUMNS = ["d_loss", "adv_global", "adv_local", "l1_global", "l1_local", "perceptual", "style", "ssim", "total"]


def training_crops(crops_dir: Path, settings: InpaintSettings) -> tuple[list, list, list[str], int]:
    """The training and held-out crops of ``crops_dir``, the held-out ids and the training side
    in px; ValueError for crops or settings that cannot train."""
    from .crops import crop_ids, read_crops

    train_crops, test_crops = read_crops(crops_dir, "train"), read_crops(crops_dir, "test")
    if not train_crops:
        raise ValueError(f"{crops_dir}: no training crops (split 'train' in manifest.csv)")
    sides = {c[0].shape[0] for c in train_crops + test_crops} | {c[0].shape[1] for c in train_crops + test_crops}
    if len(sides) != 1:
        raise ValueError(f"{crops_dir}: crops must all be square and of one size, found sides {sorted(sides)}")
    size = settings.size or sides.pop()
    if size % 4 or size < 64:
        raise ValueError(f"training size must be a multiple of 4 and at least 64, got {size}")
    if settings.epochs < 1 or settings.batch_size < 1:
        raise ValueError("epochs and batch size must be at least 1")
    if settings.lr_decay_after_epoch is not None and not 0 <= settings.lr_decay_after_epoch < settings.epochs:
        raise ValueError(f"the learning rate's decay must start after an epoch in [0, {settings.epochs - 1}] "
                         f"(--lr-decay-after-epoch), got {settings.lr_decay_after_epoch}")
    if settings.vgg_weights and settings.feature_model:
        raise ValueError("give one feature network: VGG19 weights or a segmentation model, not both")
    if not test_crops:
        log.warning("%s: no held-out crops (split 'test'): the CSV will have no MAE/PSNR/SSIM", crops_dir)
    return train_crops, test_crops, crop_ids(crops_dir, "test"), size


def feature_network(settings: InpaintSettings) -> nn.Module | None:
    """The perceptual and style losses' feature network: VGG19 weights, a segmentation model's
    encoder, or none."""
    if settings.vgg_weights:
        return load_vgg19_features(Path(settings.vgg_weights))
    if settings.feature_model:
        return load_segmentation_features(Path(settings.feature_model))
    return None


def train_one_epoch(step: InpaintGanStep, images: torch.Tensor, masks: torch.Tensor, epoch: int,
                    steps_per_epoch: int, settings: InpaintSettings, average=None, quiet: bool = False) -> dict:
    """The steps of ``epoch`` over a permutation drawn for it (flips and quarter turns from the
    same draw when ``settings.augment``), the learning rate set per step, the generator average
    updated after each; returns the mean of each loss and the last step's rate."""
    for m in step.models.modules():
        m.train()
    rng = np.random.default_rng([settings.seed, epoch])
    order = torch.from_numpy(rng.permutation(len(images)))
    sums, lr = {k: 0.0 for k in LOSS_COLUMNS}, settings.lr
    with Progress(steps_per_epoch, f"epoch {epoch + 1}/{settings.epochs}", quiet=quiet, unit="step") as progress:
        for i in range(steps_per_epoch):
            index = order[i * settings.batch_size:(i + 1) * settings.batch_size]
            x, m = images[index], masks[index]
            if settings.augment:
                x, m = _augment(x, m, rng)
            lr = settings.lr * learning_rate_factor(epoch, i, steps_per_epoch, settings.epochs,
                                                    settings.lr_decay_after_epoch)
            step.set_learning_rate(lr)
            losses = step(x.to(step.device.device), m.to(step.device.device))
            if average is not None:
                average.update_parameters(step.models.generator)
            for k in LOSS_COLUMNS:
                sums[k] += losses[k]
            progress.update()
    return {**{k: sums[k] / steps_per_epoch for k in LOSS_COLUMNS}, "lr": lr}


def validate(generator: InpaintGenerator, size: int, device: str, train_crops: list, test_crops: list,
             test_ids: list[str], samples: int, trained: InpaintGenerator | None = None) -> tuple[dict, np.ndarray]:
    """MAE, PSNR and SSIM inside the mask on the held-out crops (NaN without any), and the
    sample grid (held-out crops, else training crops). ``trained``: the trained generator when
    ``generator`` is its average, scored as ``raw_test_*``."""
    inpainter = Inpainter(generator, size, device)
    row: dict = {}
    if not test_crops:
        row.update(test_mae=float("nan"), test_psnr=float("nan"), test_ssim=float("nan"), test_crops=0)
        k = min(samples, len(train_crops))
        ims, mks = np.stack([c[0] for c in train_crops[:k]]), np.stack([c[1] for c in train_crops[:k]])
        return row, sample_grid(ims, mks, inpainter(ims, mks))
    if trained is not None:
        raw, _ = evaluate_inpainter(Inpainter(trained, size, device), test_crops, test_ids)
        row.update({f"raw_test_{k}": v for k, v in summarise(raw).items()})
    table, generated = evaluate_inpainter(inpainter, test_crops, test_ids)
    row.update({f"test_{k}": v for k, v in summarise(table).items()}, test_crops=len(test_crops))
    k = min(samples, len(test_crops))
    return row, sample_grid(np.stack([c[0] for c in test_crops[:k]]), np.stack([c[1] for c in test_crops[:k]]),
                            generated[:k])


def train_inpainting(crops_dir: Path, out_path: Path, settings: InpaintSettings = InpaintSettings(),
                     quiet: bool = False) -> dict:
    """Train (or resume) the inpainting GAN on ``crops_dir`` (the ``glomscan augment crops`` folder);
    returns the last epoch's CSV row."""
    crops_dir, out_path = Path(crops_dir), Path(out_path)
    train_crops, test_crops, test_ids, size = training_crops(crops_dir, settings)
    cuda = settings.device is not None and settings.device.startswith("cuda") or (
        settings.device is None and torch.cuda.is_available())
    device = choose_training_device("auto" if cuda else settings.precision, device=settings.device,
                                    cpu_bf16=settings.precision == "auto")
    seed_training(settings.seed)
    weights = InpaintLossWeights(l1_local=settings.lambda_local_l1, perceptual=settings.perceptual_weight,
                                 style=settings.style_weight, ssim=settings.ssim_weight)
    loss_fn = GeneratorLoss(weights, feature_network(settings)).to(device.device)
    models = InpaintModels(InpaintGenerator(settings.base_channels, settings.n_aot_blocks,
                                            upsampling=settings.upsampling).to(device.device),
                           PatchDiscriminator(settings.base_channels).to(device.device),
                           PatchDiscriminator(settings.base_channels).to(device.device))
    step = InpaintGanStep(models, loss_fn, settings, device)
    average = generator_average(models.generator, settings.ema_decay) if settings.ema_decay else None

    samples_dir = out_path.with_suffix(".samples")
    architecture = {"size": size, "base_channels": settings.base_channels, "n_aot_blocks": settings.n_aot_blocks,
                    "upsampling": settings.upsampling}
    run = TrainingRun(out_path, {**step.stateful(), **({"generator_average": average} if average is not None else {})},
                      architecture, optional=("scaler", "generator_average"))
    resumed = run.resume()
    if average is None and "generator_average" in resumed:
        log.warning("%s was trained with a generator average (--ema-decay); without it this run saves and "
                    "evaluates the trained generator from here on", run.last_path)
    if run.start_epoch >= settings.epochs:
        log.info("%s: already trained for %d epochs (ask for more with --epochs)", out_path, run.start_epoch)
        return run.rows[-1] if run.rows else {}

    images = images_to_tensor(np.stack([c[0] for c in train_crops]), size)
    masks = masks_to_tensor(np.stack([c[1] for c in train_crops]), size)
    n = len(images)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
    log.info("inpainting GAN: %d train / %d held-out crops at %d px, batch %d, %d steps/epoch, %s%s; VGG losses %s",
             n, len(test_crops), size, settings.batch_size, steps_per_epoch, device.device,
             " (AMP)" if device.dtype else "",
             loss_fn.vgg_status)
    row: dict = {}
    for epoch in range(run.start_epoch, settings.epochs):
        t0 = time.perf_counter()
        losses = train_one_epoch(step, images, masks, epoch, steps_per_epoch, settings, average, quiet)
        saved_generator = average.module if average is not None else models.generator
        metrics, grid = validate(saved_generator, size, device.device, train_crops, test_crops, test_ids,
                                 settings.samples, trained=models.generator if average is not None else None)
        row = {"steps": steps_per_epoch, "size": size, **{k: losses[k] for k in LOSS_COLUMNS}, "lr": losses["lr"],
               "vgg": loss_fn.vgg_status, **metrics, "seconds": round(time.perf_counter() - t0, 1)}
        samples_dir.mkdir(parents=True, exist_ok=True)
        write_png(samples_dir / f"epoch_{epoch + 1:03d}.png", grid)
        info = {**architecture, "epoch": epoch + 1, "vgg": loss_fn.vgg_status, "crops": str(crops_dir),
                "train_crops": n, "test_crops": len(test_crops), "settings": _plain(asdict(settings)),
                "test_metrics": {k: row[f"test_{k}"] for k in ("mae", "psnr", "ssim")}}
        save_generator(out_path, saved_generator, info)
        row = run.end_epoch(epoch, row, vgg=loss_fn.vgg_status)
        log.info("epoch %d: G total %.4f (L1 %.4f), D %.4f; held-out MAE %.4f PSNR %.2f dB SSIM %.3f (%.0f s)",
                 epoch + 1, row["total"], row["l1_global"], row["d_loss"], row["test_mae"], row["test_psnr"],
                 row["test_ssim"], row["seconds"])
    return row


def _plain(d: dict) -> dict:
    """Settings as plain values (tuples -> lists) for a weights_only checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

