"""Does a fast engine (reduced precision, another runtime) paint the same masks as the fp32
reference? Mask Dice on a few tiles, checked when an engine is first built or used."""

from __future__ import annotations

import logging

import numpy as np

from .base import Engine

log = logging.getLogger(__name__)

MIN_PARITY_DICE = 0.99


def mask_dice(a: np.ndarray, b: np.ndarray, threshold: float = 0.5) -> float:
    """Dice of the thresholded masks of two probability arrays (1.0 when both are empty)."""
    ma, mb = a >= threshold, b >= threshold
    total = ma.sum() + mb.sum()
    return 1.0 if total == 0 else float(2 * (ma & mb).sum() / total)


def random_tiles(tile: int, n: int = 2) -> np.ndarray:
    """Deterministic random RGB tiles, for when no real tissue tiles are at hand."""
    return np.random.default_rng(0).integers(0, 256, size=(n, tile, tile, 3), dtype=np.uint8)


def real_tissue_tiles(tile: int, analysis_mpp: float) -> np.ndarray | None:
    """The shipped sample's PAS tiles as analyze reads them (the one resolution rule, tiles
    mirrored past the image edge); None when the sample is not installed."""
    from ..config import AnalysisSettings
    from ..shipped import SAMPLE_DIR
    from ..slides import Slide, TileReader, analysis_resolution

    tiles = []
    for path in sorted(SAMPLE_DIR.glob("*.tif")) if SAMPLE_DIR.is_dir() else []:
        slide = Slide(path)
        resolution = analysis_resolution(slide, analysis_mpp, AnalysisSettings().downsample)
        image, _ = slide.image_at(resolution.downsample)
        tiles.append(TileReader(image, tile).read(0, 0))
    return np.stack(tiles) if tiles else None


def parity_check_tiles(tile: int, analysis_mpp: float) -> tuple[np.ndarray, str]:
    """(tiles, what they are) for a parity check: real tissue when the sample is installed,
    else random tiles."""
    tiles = real_tissue_tiles(tile, analysis_mpp)
    if tiles is None:
        return random_tiles(tile), "random tiles (no sample installed)"
    return tiles, "real tissue tiles (the shipped sample)"


def parity_check(engine: Engine, reference: Engine, tiles: np.ndarray, min_dice: float = MIN_PARITY_DICE) -> float:
    """Mask Dice of ``engine`` against ``reference`` on ``tiles``; a warning when below ``min_dice``."""
    dice = mask_dice(engine.predict(tiles), reference.predict(tiles))
    if dice < min_dice:
        log.warning("%s output differs from %s: mask Dice %.4f < %.2f", engine.description, reference.description,
                    dice, min_dice)
    else:
        log.info("%s vs %s mask Dice on %d tiles: %.4f", engine.description, reference.description, len(tiles), dice)
    return dice
