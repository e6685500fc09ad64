"""Copy-paste augmentation of real glomeruli: graded glomerulus crops composited into real tissue.

A crop set gives each glomerulus's class but almost no context and no scale (crops are tight
and resized); a tile set gives real context at a known scale but no class. Compositing puts the
graded glomeruli into the tiles' tissue:

1. **Scale.** Each crop is rescaled so that its outline's equivalent diameter, at the analysis
   resolution, is drawn uniformly from ``diameter_range_um`` (default 100-250 µm: the range of
   glomerular profile diameters in sections of adult human kidney; a section cuts each
   glomerulus at a random height, so profiles are smaller than the ~200 µm tuft, and sclerosed
   glomeruli shrink. The four whole glomeruli of the outlined AIDPATH tiles measure 178-212 µm,
   inside the range). Both classes use the same range so that size alone never tells the class.
2. **Stain.** The crop's colours are moved part of the way (``stain_match``) towards the
   background tissue's mean optical density, then jittered per channel in optical density
   (``stain_jitter``), so that a pasted glomerulus is not told apart by its colour alone.
3. **Cut and paste.** The crop is cut along its outline with a soft edge (Gaussian,
   ``edge_sigma_px``) and pasted where the outline lies on tissue (at least
   ``min_tissue_fraction`` of it) and nowhere within ``clearance_px`` of a labelled glomerulus
   (a tile's own, or one pasted before). Labels inside the outline become the crop's class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ...imaging import from_optical_density, optical_density, saturated_pixels, stain_ratio
from .sources import GlomerulusCrop, resize_mask, resize_rgb
from ..settings import CompositeSettings


@dataclass(frozen=True)
class Placement:
    crop: str
    slide: str
    label: int
    x0: int
    y0: int
    x1: int
    y1: int
    diameter_um: float


def tissue_map(image: np.ndarray) -> np.ndarray:
    """Tissue at full resolution: HSV saturation above 0.07 and not black, smoothed."""
    tissue = saturated_pixels(image, 0.07)
    tissue = ndimage.binary_closing(tissue, iterations=3)
    return ndimage.binary_opening(tissue, iterations=2)


def stain_adjust(crop: np.ndarray, outline: np.ndarray, background_od_mean: np.ndarray | None,
                 settings: CompositeSettings, rng: np.random.Generator) -> np.ndarray:
    """Crop colours moved towards the background slide's stain, then jittered (float RGB).

    The stain difference is estimated on tissue of both slides: the background's tissue against
    the crop's own tissue around the outline (glomeruli themselves are denser than average
    tissue, so they are not compared with it unless the crop has almost no surroundings)."""
    od = optical_density(crop)
    if background_od_mean is not None and settings.stain_match > 0:
        around = tissue_map(crop) & ~outline
        reference = around if around.sum() >= 0.05 * outline.size else outline
        crop_mean = od[reference].mean(axis=0)
        od = od * (1.0 + settings.stain_match * (stain_ratio(crop_mean, background_od_mean) - 1.0))
    od = od * rng.uniform(1 - settings.stain_jitter, 1 + settings.stain_jitter, size=3).astype(np.float32)
    return from_optical_density(od)


def scaled_crop(crop: GlomerulusCrop, diameter_um: float, analysis_mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, outline) rescaled so the outline's equivalent diameter is ``diameter_um``."""
    scale = diameter_um / analysis_mpp / crop.equivalent_diameter_px
    image = resize_rgb(crop.image, scale)
    outline = resize_mask(crop.outline, image.shape[:2])
    return image, outline


def paste_glomeruli(background: np.ndarray, labels: np.ndarray, crops: list[GlomerulusCrop],
                    analysis_mpp: float, settings: CompositeSettings, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, list[Placement], list[GlomerulusCrop]]:
    """Paste ``crops`` into a copy of ``background`` (uint8 RGB) and ``labels``. Returns the new
    image, labels, the placements made, and the crops that found no place."""
    image = background.astype(np.float32)
    labels = labels.copy()
    tissue = tissue_map(background)
    od = optical_density(background)
    background_od = od[tissue].mean(axis=0) if tissue.any() else None
    h, w = labels.shape
    placements, unplaced = [], []
    for crop in crops:
        diameter = float(rng.uniform(*settings.diameter_range_um))
        pixels, outline = scaled_crop(crop, diameter, analysis_mpp)
        ch, cw = outline.shape
        if ch >= h or cw >= w:
            unplaced.append(crop)
            continue
        blocked = ndimage.binary_dilation(labels > 0, iterations=settings.clearance_px) if (labels > 0).any() else labels > 0
        n_outline = outline.sum()
        placed = False
        for _ in range(settings.attempts):
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            window = (slice(y, y + ch), slice(x, x + cw))
            if (blocked[window] & outline).any():
                continue
            if (tissue[window] & outline).sum() < settings.min_tissue_fraction * n_outline:
                continue
            placed = True
            break
        if not placed:
            unplaced.append(crop)
            continue
        adjusted = stain_adjust(pixels, outline, background_od, settings, rng)
        alpha = outline.astype(np.float32)
        if settings.edge_sigma_px > 0:
            alpha = np.clip(ndimage.gaussian_filter(alpha, settings.edge_sigma_px), 0, 1)
        alpha = alpha[..., None]
        image[window] = alpha * adjusted + (1 - alpha) * image[window]
        labels[window][outline] = crop.label
        placements.append(Placement(crop.name, crop.slide, crop.label, x, y, x + cw, y + ch, round(diameter, 1)))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels, placements, unplaced
