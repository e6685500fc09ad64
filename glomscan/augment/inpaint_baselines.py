"""Trivial fills of a glomerulus-shaped hole, the yardsticks an inpainting model must beat.

- :func:`ring_mean_fill`: the hole filled with the mean colour of the ``width`` px ring around it.
- :func:`biharmonic_fill`: ``skimage.restoration.inpaint_biharmonic`` (classical PDE inpainting).

Both take and return (H, W, 3) uint8 images and a bool mask; pixels outside the mask are
returned unchanged (so :func:`glomscan.augment.inpaint.inpainting_metrics` applies directly).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .inpaint import composite, inpainting_metrics


def ring_mean_fill(image: np.ndarray, mask: np.ndarray, width: int = 8) -> np.ndarray:
    ring = ndimage.binary_dilation(mask, iterations=width) & ~mask
    if not ring.any():
        raise ValueError("the mask covers the whole image: no ring around it")
    return np.where(mask[..., None], image[ring].mean(0).round().astype(np.uint8), image)


def biharmonic_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from skimage.restoration import inpaint_biharmonic

    out = inpaint_biharmonic(image.astype(np.float64) / 255, mask, channel_axis=-1)
    return composite(image, (out.clip(0, 1) * 255).round().astype(np.uint8), mask)


FILLS = {"ring mean": ring_mean_fill, "biharmonic": biharmonic_fill}


def fill_metrics(crops, fill) -> list[dict[str, float]]:
    """Per-crop MAE/PSNR/SSIM inside the mask of ``fill`` on (image, mask) crops."""
    return [inpainting_metrics(image, composite(image, fill(image, mask), mask), mask) for image, mask in crops]
