"""A DCGAN that learns sclerosed-glomerulus mask shapes, and turning its samples into masks for
synthesis (issue #5, step 5).

Training masks are the crops' binary masks, each cut to its bounding square (plus a margin)
and scaled to ``image_size`` (64 or 128), so the GAN learns shape, not size; size comes back
in :func:`postprocess_sample` + :func:`rescale_to_diameter`, which spread the equivalent
diameters evenly over a range (more small glomeruli than the real distribution).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.transform import resize
from torch import nn

from ..checkpoint import cpu_state, read_checkpoint_file, save_checkpoint_file
from ..imaging import dihedral, equivalent_diameter, read_png, write_png
from ..train.fit.harness import TrainingRun, choose_training_device, seed_training
from .settings import MaskGanSettings, MaskGenerationSettings

log = logging.getLogger(__name__)


# --- models ---------------------------------------------------------------------------------------

class MaskGenerator(nn.Module):
    """DCGAN generator: latent (N, latent) -> (N, 1, S, S) in [-1, 1], S = 64 or 128."""

    def __init__(self, latent: int = 100, image_size: int = 64, base_channels: int = 64):
        super().__init__()
        if image_size not in (32, 64, 128):
            raise ValueError(f"image size must be 32, 64 or 128, got {image_size}")
        self.latent = latent
        n_up = int(math.log2(image_size)) - 2  # 4x4 -> image_size
        channels = [base_channels * 2 ** (n_up - 1 - i) for i in range(n_up)]
        layers = [nn.ConvTranspose2d(latent, channels[0], 4, 1, 0, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(True)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(channels[-1], 1, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent, 1, 1))


class MaskDiscriminator(nn.Module):
    """DCGAN discriminator: (N, 1, S, S) -> (N,) logits."""

    def __init__(self, image_size: int = 64, base_channels: int = 64):
        super().__init__()
        n_down = int(math.log2(image_size)) - 2
        channels = [base_channels * 2 ** i for i in range(n_down)]
        layers = [nn.Conv2d(1, channels[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(channels[-1], 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def _dcgan_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# --- training data ---------------------------------------------------------------------------------

def normalise_mask(mask: np.ndarray, image_size: int, margin: float = 0.0625) -> np.ndarray:
    """A binary mask cut to the square around its bounding box (plus ``margin`` of the side on
    each side), scaled to image_size: float32 in [-1, 1]."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty mask")
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(r1 - r0, c1 - c0)
    pad = int(math.ceil(side * margin / (1 - 2 * margin)))
    full = side + 2 * pad
    canvas = np.zeros((full, full), np.float32)
    oy, ox = pad + (side - (r1 - r0)) // 2, pad + (side - (c1 - c0)) // 2
    canvas[oy:oy + r1 - r0, ox:ox + c1 - c0] = mask[r0:r1, c0:c1]
    small = resize(canvas, (image_size, image_size), order=1, anti_aliasing=full > image_size)
    return (small * 2 - 1).astype(np.float32)


def augment_dihedral(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations, per sample."""
    out = []
    for x in batch:
        k = int(torch.randint(4, (1,), generator=generator))
        out.append(dihedral(x, k, bool(torch.rand(1, generator=generator) < 0.5), dims=(1, 2)))
    return torch.stack(out)


# --- training ----------------------------------------------------------------------------------

def _noisy(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` plus Gaussian noise of std ``sigma`` (drawn on the CPU from ``generator``, so that a
    resumed run draws what an uninterrupted one would)."""
    if sigma <= 0:
        return x
    return x + sigma * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


def discriminator_step(generator: MaskGenerator, discriminator: MaskDiscriminator, optimiser: torch.optim.Optimizer,
                       real: torch.Tensor, z: torch.Tensor, real_label: float = 1.0,
                       noise: float = 0.0, rng: torch.Generator | None = None) -> tuple[float, float, float]:
    """One discriminator update (BCE, real ``real_label`` / fake 0, inputs with Gaussian noise
    of std ``noise``): (loss, mean D(real), mean D(fake))."""
    bce = nn.BCEWithLogitsLoss()
    optimiser.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = generator(z)
    out_real, out_fake = discriminator(_noisy(real, noise, rng)), discriminator(_noisy(fake, noise, rng))
    loss = bce(out_real, torch.full_like(out_real, real_label)) + bce(out_fake, torch.zeros_like(out_fake))
    loss.backward()
    optimiser.step()
    return loss.item(), torch.sigmoid(out_real).mean().item(), torch.sigmoid(out_fake).mean().item()


def generator_step(generator: MaskGenerator, discriminator: MaskDiscriminator, optimiser: torch.optim.Optimizer,
                   z: torch.Tensor, noise: float = 0.0, rng: torch.Generator | None = None) -> float:
    """One generator update (non-saturating BCE against the real label 1)."""
    bce = nn.BCEWithLogitsLoss()
    optimiser.zero_grad(set_to_none=True)
    out = discriminator(_noisy(generator(z), noise, rng))
    loss = bce(out, torch.ones_like(out))
    loss.backward()
    optimiser.step()
    return loss.item()


class MaskGanStep:
    """One step of the mask DCGAN: a batch of real masks drawn with replacement (flipped and
    turned), one discriminator update, one generator update, every draw from one CPU generator
    (so that a resumed run draws what an uninterrupted one would). Owns the two Adam optimisers,
    which the resume state keeps (:meth:`stateful`)."""

    def __init__(self, generator: MaskGenerator, discriminator: MaskDiscriminator, settings: MaskGanSettings,
                 device: str):
        self.generator, self.discriminator, self.settings, self.device = generator, discriminator, settings, device
        betas = (settings.beta1, settings.beta2)
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=betas)
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=settings.lr, betas=betas)

    def stateful(self) -> dict:
        return {"generator": self.generator, "discriminator": self.discriminator, "opt_g": self.opt_g,
                "opt_d": self.opt_d}

    def __call__(self, data: torch.Tensor, remaining: float, rng: torch.Generator) -> tuple[float, float, float, float]:
        """Train on ``data`` (N, 1, S, S) in [-1, 1]; ``remaining``: the share of the run still to
        come, which scales the instance noise down to 0. Returns (loss D, loss G, D(real), D(fake))."""
        s = self.settings
        noise = s.instance_noise * max(0.0, remaining)
        idx = torch.randint(len(data), (max(s.batch_size, 2),), generator=rng)  # with replacement
        real = augment_dihedral(data[idx], rng).to(self.device)
        z = torch.randn(len(real), s.latent, generator=rng).to(self.device)
        loss_d, d_real, d_fake = discriminator_step(self.generator, self.discriminator, self.opt_d, real, z,
                                                    s.real_label, noise, rng)
        z = torch.randn(len(real), s.latent, generator=rng).to(self.device)
        loss_g = generator_step(self.generator, self.discriminator, self.opt_g, z, noise, rng)
        return loss_d, loss_g, d_real, d_fake


def train_mask_gan(masks: list[np.ndarray], out_path: Path, settings: MaskGanSettings = MaskGanSettings(),
                   quiet: bool = False, info: dict | None = None) -> list[dict]:
    """Train on binary masks; writes ``out_path`` (generator + settings + the real masks'
    diameter range), ``<out>.last.pt`` (resume state: rerun with more epochs),
    ``<out>.metrics.csv`` (per epoch) and ``<out>.samples.png`` (a grid of samples). Returns
    the rows of the CSV."""
    if not masks:
        raise ValueError("no masks to train on")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seed_training(settings.seed)
    device = choose_training_device("fp32", device=settings.device).device
    data = torch.from_numpy(np.stack([normalise_mask(m, settings.image_size) for m in masks]))[:, None]
    diameters = [equivalent_diameter(m.sum()) for m in masks]
    info = {"n_masks": len(masks), "diameter_min_px": min(diameters), "diameter_max_px": max(diameters),
            "mask_size_px": int(masks[0].shape[0]), **(info or {})}
    step = MaskGanStep(MaskGenerator(settings.latent, settings.image_size, settings.base_channels).to(device),
                       MaskDiscriminator(settings.image_size, settings.base_channels).to(device), settings, device)
    rng = torch.Generator().manual_seed(settings.seed)
    fixed_z = torch.randn(64, settings.latent, generator=torch.Generator().manual_seed(settings.seed + 1))
    run = TrainingRun(out_path, step.stateful(), _architecture(settings), earlier_metrics_suffix=".losses.csv")
    resumed = run.resume()
    if resumed:
        rng.set_state(resumed["rng"])
    steps = settings.steps_per_epoch or max(1, math.ceil(len(data) / settings.batch_size))
    for epoch in range(run.start_epoch, settings.epochs):
        t0 = time.perf_counter()
        step.generator.train()
        step.discriminator.train()
        sums = np.zeros(4)
        for i in range(steps):
            sums += step(data, 1 - (epoch * steps + i) / (settings.epochs * steps), rng)
        row = dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), map(float, sums / steps)))
        row["seconds"] = time.perf_counter() - t0
        if not quiet:
            log.info("epoch %d/%d: loss D %.4f, G %.4f, D(real) %.3f, D(fake) %.3f", epoch + 1, settings.epochs,
                     row["loss_d"], row["loss_g"], row["d_real"], row["d_fake"])
        save_mask_generator(out_path, step.generator, settings, info)
        run.end_epoch(epoch, row, rng=rng.get_state())
        step.generator.eval()
        with torch.no_grad():
            samples = step.generator(fixed_z.to(device)).cpu().numpy()[:, 0]
        write_grid(out_path.with_suffix(".samples.png"), samples)
    return run.rows


def _architecture(settings: MaskGanSettings) -> dict:
    """The settings a resume state must share with the run that continues it."""
    return {k: asdict(settings)[k] for k in ("image_size", "latent", "base_channels")}


def write_grid(path: Path, samples: np.ndarray, columns: int = 8) -> None:
    """(N, S, S) samples in [-1, 1] as a greyscale grid PNG (2 px gaps)."""
    n, s = len(samples), samples.shape[-1]
    rows = math.ceil(n / columns)
    grid = np.full((rows * (s + 2), columns * (s + 2)), 128, np.uint8)
    for i, x in enumerate(samples):
        r, c = divmod(i, columns)
        grid[r * (s + 2):r * (s + 2) + s, c * (s + 2):c * (s + 2) + s] = np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)
    write_png(path, grid)


def save_mask_generator(path: Path, generator: MaskGenerator, settings: MaskGanSettings, info: dict) -> None:
    save_checkpoint_file(path, "mask-generator", {"config": asdict(settings), "info": dict(info)},
                         cpu_state(generator.state_dict()))


def load_mask_generator(path: Path) -> tuple[MaskGenerator, MaskGanSettings, dict]:
    saved = read_checkpoint_file(path, "mask-generator")
    settings = MaskGanSettings(**saved.card["config"])
    generator = MaskGenerator(settings.latent, settings.image_size, settings.base_channels)
    generator.load_state_dict(saved.state_dict)
    return generator.eval(), settings, dict(saved.card["info"])


# --- samples -> masks -------------------------------------------------------------------------------

def postprocess_sample(sample: np.ndarray, size: int, threshold: float = 0.5, min_island_px: int = 64) -> np.ndarray | None:
    """A generator sample (S x S in [-1, 1], or an RGB/greyscale image in [0, 255]) -> one
    glomerulus mask (size x size bool) or None when nothing is left: greyscale, upscale
    (bilinear), threshold, remove islands below ``min_island_px``, keep the largest component,
    fill its holes."""
    x = np.asarray(sample, np.float32)
    if x.ndim == 3:
        x = x.mean(axis=2)  # greyscale
    if x.max() > 1.0 + 1e-6:  # 0..255 image
        x = x / 255.0
    elif x.min() < 0:  # tanh output
        x = (x + 1) / 2
    if x.shape != (size, size):
        x = resize(x, (size, size), order=1, anti_aliasing=False)
    mask = x >= threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return None
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    if areas.max() < max(min_island_px, 1):
        return None
    # islands below the minimum go; of the rest, one main contour: the largest component
    largest = labels == int(np.argmax(areas))
    return ndimage.binary_fill_holes(largest)


def rescale_to_diameter(mask: np.ndarray, diameter: float, size: int) -> np.ndarray:
    """The mask scaled so its equivalent diameter is ``diameter`` px, centred (by its centroid)
    in a size x size canvas. Raises ValueError if it does not fit."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty mask")
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    part = mask[r0:r1, c0:c1].astype(np.float32)
    scale = diameter / equivalent_diameter(mask.sum())
    h, w = max(1, round(part.shape[0] * scale)), max(1, round(part.shape[1] * scale))
    if h > size or w > size:
        raise ValueError(f"a mask of equivalent diameter {diameter:.0f} px ({w} x {h}) does not fit in {size} px")
    scaled = resize(part, (h, w), order=1, anti_aliasing=scale < 1) >= 0.5
    scaled = ndimage.binary_fill_holes(scaled)
    cy, cx = ndimage.center_of_mass(scaled)
    oy = int(round(size / 2 - cy - 0.5))
    ox = int(round(size / 2 - cx - 0.5))
    oy, ox = min(max(oy, 0), size - h), min(max(ox, 0), size - w)
    out = np.zeros((size, size), bool)
    out[oy:oy + h, ox:ox + w] = scaled
    return out


def even_diameters(count: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` diameters spread evenly over [low, high]: one uniform draw in each of
    ``count`` equal strata, in random order."""
    if not 0 < low <= high:
        raise ValueError(f"diameter range must satisfy 0 < min <= max, got {low}..{high}")
    u = (np.arange(count) + rng.uniform(size=count)) / count
    return rng.permutation(low + u * (high - low))


def generate_masks(generator: MaskGenerator, count: int, settings: MaskGenerationSettings,
                   default_range: tuple[float, float], batch: int = 64,
                   diameters_px: np.ndarray | None = None) -> tuple[list[np.ndarray], list[dict]]:
    """Sample, post-process and rescale ``count`` masks: (masks, one record per mask). Their
    equivalent diameters are spread evenly over the settings' range (or ``default_range``), or
    are ``diameters_px`` (``count`` of them) when given, e.g. drawn from real glomeruli."""
    if count < 1:
        raise ValueError("count must be at least 1")
    if diameters_px is not None:
        targets = np.asarray(diameters_px, np.float64)
        if targets.shape != (count,) or not (targets > 0).all():
            raise ValueError(f"diameters_px must be {count} positive diameters")
        high = float(targets.max())
    else:
        low, high = settings.diameter_range or default_range
        targets = even_diameters(count, low, high, np.random.default_rng(settings.seed))
    if high > settings.size:
        raise ValueError(f"diameters up to {high:.0f} px do not fit in {settings.size} px masks")
    torch.manual_seed(settings.seed)
    masks, records, tries = [], [], 0
    generator.eval()
    while len(masks) < count:
        if tries >= settings.max_tries_per_mask * count:
            raise ValueError(f"only {len(masks)} of {count} samples gave a mask after {tries} tries "
                             f"(lower --min-island-px or --threshold, or train the mask GAN longer)")
        with torch.no_grad():
            samples = generator(torch.randn(batch, generator.latent)).numpy()[:, 0]
        for sample in samples:
            tries += 1
            shape = postprocess_sample(sample, settings.size, settings.threshold, settings.min_island_px)
            if shape is None:
                continue
            target = float(targets[len(masks)])
            try:
                mask = rescale_to_diameter(shape, target, settings.size)
            except ValueError:  # an elongated shape too long for the canvas at this diameter
                continue
            masks.append(mask)
            records.append({"target_diameter_px": round(target, 2), "area_px": int(mask.sum()),
                            "equivalent_diameter_px": round(equivalent_diameter(mask.sum()), 2)})
            if len(masks) == count:
                break
    return masks, records


def write_masks(out_dir: Path, masks: list[np.ndarray], records: list[dict]) -> Path:
    """``mask_00000.png ...`` (0/255), ``masks.csv`` (file, target diameter, area, equivalent
    diameter) and ``masks.png`` (a grid of up to 64). Returns the CSV path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (mask, record) in enumerate(zip(masks, records)):
        name = f"mask_{i:05d}.png"
        write_png(out_dir / name, mask.astype(np.uint8) * 255)
        rows.append({"mask": name, **record})
    with open(out_dir / "masks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    step = max(1, masks[0].shape[0] // 64)
    write_grid(out_dir / "masks.png", np.stack([m[::step, ::step].astype(np.float32) * 2 - 1 for m in masks[:64]]))
    return out_dir / "masks.csv"


def read_masks(mask_dir: Path) -> list[np.ndarray]:
    """The masks of a folder written by :func:`write_masks` (``masks.csv`` order; without a CSV
    every ``*.png`` except the grid, sorted by name). Raises ValueError when there are none."""
    import pandas as pd

    mask_dir = Path(mask_dir)
    if (mask_dir / "masks.csv").is_file():
        files = [mask_dir / f for f in pd.read_csv(mask_dir / "masks.csv")["mask"]]
    else:
        files = sorted(p for p in mask_dir.glob("*.png") if p.name != "masks.png")
    masks = [read_png(p)[..., 0] > 127 for p in files]
    empty = sum(not m.any() for m in masks)
    if empty:
        log.warning("%s: %d empty mask(s) skipped", mask_dir, empty)
    masks = [m for m in masks if m.any()]
    if not masks:
        raise ValueError(f"{mask_dir}: no glomerulus masks (make them with 'glomscan augment masks')")
    return masks
