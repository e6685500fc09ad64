"""Training data held on the training device and augmented there, by batch.

A loader that decodes and augments patches on CPU processes cannot feed a GPU that trains the
U-Net ten times faster than the processes cut patches (an H200 waited on 14 of them: about 90 s
per epoch for 35 s of GPU work). The prepared set is small (a few hundred 512 px patches, well
under a GiB as uint8), so it is read once, kept on the device as uint8, and every batch is cut
and augmented there: random crop, dihedral flips and rotations, stain variation in optical
density, and JPEG compression with 4:2:0 chroma through torchvision's codec (nvJPEG on CUDA).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ...imaging import dihedral
from .data import load_patch

log = logging.getLogger(__name__)


def jitter_stain_batch(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample stain variation of (N, 3, H, W) RGB in [0, 1]: optical density scaled per
    channel and overall by 1 +- ``amount``, shifted per channel by up to ``amount`` / 4, and
    saturation changed by up to ``amount`` (labs, stains and scanners differ)."""
    n = x.shape[0]

    def uniform(*shape, low, high):
        return low + (high - low) * torch.rand(*shape, generator=generator, device=x.device)

    od = -torch.log((x * 255 + 1) / 256)
    gain = uniform(n, 3, 1, 1, low=1 - amount, high=1 + amount) * uniform(n, 1, 1, 1, low=1 - amount, high=1 + amount)
    bias = uniform(n, 3, 1, 1, low=-amount / 4, high=amount / 4)
    y = ((256 * torch.exp(-(od * gain + bias).clamp(min=0)) - 1) / 255).clamp(0, 1)
    grey = y.mean(dim=1, keepdim=True)
    saturation = uniform(n, 1, 1, 1, low=1 - amount, high=1 + amount)
    return (grey + (y - grey) * saturation).clamp(0, 1)


def dihedral_batch(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample of square (N, C, S, S) images and their (N, S, S) labels rotated by a random
    multiple of 90° and flipped left-right with probability 1/2."""
    n, device = images.shape[0], images.device
    turns = torch.randint(0, 4, (n,), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    images, labels = images.clone(), labels.clone()
    images[flips], labels[flips] = (dihedral(t[flips], 0, True, dims=(-2, -1)) for t in (images, labels))
    for k in (1, 2, 3):
        chosen = turns == k
        images[chosen], labels[chosen] = (dihedral(t[chosen], k, False, dims=(-2, -1)) for t in (images, labels))
    return images, labels


def subsample_chroma(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB with its chroma (JPEG's YCbCr) averaged over 2 x 2 pixels and
    interpolated back: the 4:2:0 subsampling of most scanners' JPEG."""
    x = images_u8.float()
    rgb_to_ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                              device=x.device)
    ycc = torch.einsum("ij,njhw->nihw", rgb_to_ycc, x)
    h, w = x.shape[-2:]
    chroma = F.interpolate(F.avg_pool2d(ycc[:, 1:], 2, ceil_mode=True), size=(h, w), mode="bilinear",
                           align_corners=False)
    ycc = torch.cat([ycc[:, :1], chroma], dim=1)
    rgb = torch.einsum("ij,njhw->nihw", torch.linalg.inv(rgb_to_ycc), ycc)
    return rgb.round().clamp(0, 255).to(torch.uint8)


def jpeg_batch(images_u8: torch.Tensor, quality: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 through JPEG at ``quality`` with 4:2:0 chroma (as scanners store
    slides) and back, on the tensors' device. torchvision's codec is libjpeg on the CPU (4:2:0)
    and nvJPEG on CUDA (4:4:4 only), so the chroma is subsampled here first on every device."""
    from torchvision.io import decode_jpeg, encode_jpeg

    encoded = encode_jpeg(list(subsample_chroma(images_u8).contiguous()), quality=quality)
    decoded = decode_jpeg([data.cpu() for data in encoded], device=images_u8.device)  # nvJPEG decodes from host bytes
    return torch.stack(decoded)


class ResidentPatches:
    """The patches of a manifest on ``device`` as uint8 (N, H, W, 3) images and (N, H, W) labels;
    ``batch`` cuts and augments a training batch there."""

    def __init__(self, dataset_dir: Path, manifest: pd.DataFrame, device: str, mean, std, seed: int = 0):
        rows = manifest.to_dict("records")
        images, labels = [], []
        for row in rows:
            image, label = load_patch(Path(dataset_dir), row)
            images.append(image)
            labels.append(label)
        shapes = {image.shape[:2] for image in images}
        if len(shapes) != 1:
            raise ValueError(f"{dataset_dir}: patches of one size are needed to keep them on the training device "
                             f"(found {sorted(shapes)[:4]}); train without --data-on-device")
        self.device = device
        self.images = torch.from_numpy(np.stack(images)).to(device)
        self.labels = torch.from_numpy(np.stack(labels)).to(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        log.info("%d patches of %dx%d px held on %s (%.0f MiB)", len(rows), *next(iter(shapes)), device,
                 (self.images.numel() + self.labels.numel()) / 2 ** 20)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _uniform_int(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator, device=self.device)

    def batch(self, batch_size: int, crop: int | None = None, stain_jitter: float = 0.0,
              jpeg_min_quality: int | None = None, scale_jitter: float = 0.0, augment: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """A normalised (B, 3, crop, crop) float batch and its (B, crop, crop) int64 labels:
        patches drawn at random, cut at a random place, and (``augment``) magnified by a factor
        drawn from [1 / (1 + ``scale_jitter``), 1 + ``scale_jitter``] (one per batch: scanners'
        and labs' pixel sizes differ), flipped and rotated, JPEG-compressed (half the batch,
        quality drawn from [``jpeg_min_quality``, 95]) and stain-jittered."""
        n, height, width = self.labels.shape
        index = self._uniform_int(n, batch_size)
        out_side = side = min(crop or height, height, width)
        if augment and scale_jitter > 0:
            u = torch.rand(1, generator=self.generator, device=self.device).item()
            magnification = (1 + scale_jitter) ** (2 * u - 1)  # log-uniform in [1/(1+j), 1+j]
            side = min(height, width, max(8, round(out_side / magnification)))
        ys, xs = self._uniform_int(height - side + 1, batch_size), self._uniform_int(width - side + 1, batch_size)
        steps = torch.arange(side, device=self.device)
        rows, cols = (ys[:, None] + steps)[:, :, None], (xs[:, None] + steps)[:, None, :]
        images = self.images[index[:, None, None], rows, cols].permute(0, 3, 1, 2)  # (B, 3, side, side) uint8
        labels = self.labels[index[:, None, None], rows, cols]
        if side != out_side:
            images = F.interpolate(images.float(), size=(out_side, out_side), mode="bilinear", antialias=side > out_side,
                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)
            labels = F.interpolate(labels[:, None].float(), size=(out_side, out_side), mode="nearest")[:, 0].to(labels.dtype)
        if augment:
            images, labels = dihedral_batch(images, labels, self.generator)
            if jpeg_min_quality is not None:
                chosen = torch.rand(batch_size, generator=self.generator, device=self.device) < 0.5
                if chosen.any():
                    quality = int(torch.randint(jpeg_min_quality, 96, (1,), generator=self.generator,
                                                device=self.device).item())
                    images[chosen] = jpeg_batch(images[chosen], quality)
        x = images.float() / 255
        if augment and stain_jitter > 0:
            x = jitter_stain_batch(x, stain_jitter, self.generator)
        return (x - self.mean) / self.std, labels.long()
