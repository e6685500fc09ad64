"""Image helpers shared by analysis and training: PNG reading and writing, HSV saturation (what
tissue detection thresholds), optical density (stain transfer and jitter), and a region's
equivalent diameter. numpy and pyvips only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyvips

BLACK_MAX = 20
"""Pixels whose brightest channel is at most this are black (scanner borders), not tissue."""


def image_to_array(image: pyvips.Image) -> np.ndarray:
    """Materialise a (small) uint8 pyvips image as a numpy array (h, w, bands)."""
    data = image.write_to_memory()
    return np.frombuffer(data, dtype=np.uint8).reshape(image.height, image.width, image.bands)


def write_png(path: Path, array: np.ndarray, compression: int = 3) -> None:
    """uint8 (H, W) greyscale or (H, W, 3) RGB as a PNG (images, label masks, picture grids)."""
    interpretation = "srgb" if array.ndim == 3 else "b-w"
    pyvips.Image.new_from_array(np.ascontiguousarray(array), interpretation=interpretation).pngsave(
        str(path), compression=compression)


def read_png(path: Path) -> np.ndarray:
    """A PNG as uint8 (H, W, bands)."""
    return image_to_array(pyvips.Image.new_from_file(str(path)))


def saturation_and_brightness(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation (0-1) and value (the brightest channel, 0-255) of (H, W, 3) RGB: stained
    tissue is saturated, glass is not."""
    rgb = image.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0), mx


def saturated_pixels(image: np.ndarray, min_saturation: float) -> np.ndarray:
    """Pixels more saturated than ``min_saturation`` and not black: stained tissue, before any
    smoothing."""
    saturation, brightness = saturation_and_brightness(image)
    return (saturation > min_saturation) & (brightness > BLACK_MAX)


def optical_density(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> optical density per channel (float32): stains add up linearly in it."""
    return -np.log((image.astype(np.float32) + 1.0) / 256.0)


def from_optical_density(od: np.ndarray) -> np.ndarray:
    """Optical density -> float RGB in [0, 255]."""
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255)


def stain_ratio(source_od_mean: np.ndarray, target_od_mean: np.ndarray, limits: tuple[float, float] = (0.5, 2.0)
                ) -> np.ndarray:
    """Per-channel factor on optical density that moves a stain of mean ``source_od_mean`` to
    ``target_od_mean`` (optical-density stain transfer), clipped to ``limits``."""
    return np.clip((target_od_mean + 1e-3) / (source_od_mean + 1e-3), *limits)


def equivalent_diameter(area: float) -> float:
    """Diameter of the disc of this area (same unit as the area's square root)."""
    return math.sqrt(4 * area / math.pi)


def dihedral(x, k: int, flip: bool, dims: tuple[int, int] = (0, 1)):
    """``x`` turned by ``k`` quarter turns in the plane of ``dims`` (as ``numpy.rot90``), then
    mirrored along ``dims[1]`` when ``flip``: the eight symmetries of a square, for numpy arrays
    and torch tensors alike (the augmentation of every trainer)."""
    if isinstance(x, np.ndarray):
        x = np.rot90(x, k, axes=dims)
        return np.flip(x, axis=dims[1]) if flip else x
    x = x.rot90(k, dims) if k % 4 else x  # a torch tensor (not imported here)
    return x.flip(dims[1]) if flip else x
