"""Inpainting crops from a glomerulus crop set with real outlines (issue #15, item 1).

A crop set (``labels.csv`` with ``image, slide, globally_sclerosed`` + ``images/`` + ``masks/``,
read by :func:`glomscan.train.dataset.sources.read_crop_set`) holds real glomeruli with their true
outlines, but each crop is tight around its glomerulus: in the AIDPATH set the outline touches
all four sides of the 224 px crop and its minimum enclosing circle is wider than the crop. The
paper's crops (method.md, "Inpainting augmentation", step 1) are 256 x 256 around the
glomerulus's minimum enclosing circle, with tissue around it. Each crop is therefore put on a
``size`` x ``size`` canvas:

1. **Scale.** Shrunk (never enlarged) so that its outline's minimum enclosing circle fits the
   canvas with ``margin_px`` on every side: the hole never touches the canvas border and the
   ring around it (what the trivial fills and the discriminators see) exists.
2. **Centre.** The enclosing circle's centre goes to the canvas centre, as in the paper.
3. **Context.** With a tile set (``tiles_dir``: ``images/`` + ``masks/``, glomeruli outlined)
   the canvas is a window of real tissue from a tile of the same split (training crops on
   training tiles, held-out crops on validation tiles, tiles split by group as ``prepare``
   does), chosen among random windows so that the outline plus ``clearance_px`` lies on tissue
   and off the tile's labelled glomeruli; the window's stain is moved towards the crop's own
   surrounding tissue (optical density ratio, clipped to [0.5, 2]). The crop is pasted over it
   along its outline dilated by ``keep_px`` (Bowman's capsule and a little of the glomerulus's own
   surroundings kept), with a soft edge outside that band only. Without a tile set the canvas
   is the crop padded by reflection (the reflected border can show glomerulus texture outside
   the mask: a fallback, not the paper's setting).
   Inside the mask every pixel is the original crop's (resampled): the inpainting target is the
   real glomerulus, unaltered in colour.
4. **Split by slide**: ``split_slides`` over all the crop set's slides with ``validation_fraction``
   and ``seed``, exactly as ``prepare`` splits the same crop set, so the held-out ("test") crops
   come from the segmentation model's validation slides.

Output: the folder format of ``glomscan augment crops`` (``images/``, ``masks/``, ``manifest.csv``
with :data:`glomscan.augment.crops.CROP_COLUMNS` and extra columns ``image, label, scale,
context``), read unchanged by ``train inpaint``, ``evaluate inpaint`` and ``train masks``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from ..imaging import from_optical_density, optical_density, stain_ratio, write_png
from ..labels import NORMAL, SCLEROSED
from ..train.dataset.composite import tissue_map
from .crops import CROP_COLUMNS, component_circle
from ..train.dataset.data import split_slides
from ..train.dataset.sources import GlomerulusCrop, read_crop_set, read_tile_set, resize_mask, resize_rgb
from .settings import OutlineCropSettings

log = logging.getLogger(__name__)

OUTLINE_CROP_COLUMNS = CROP_COLUMNS + ["image", "label", "scale", "context"]


def fit_scale(outline: np.ndarray, size: int, margin_px: int) -> float:
    """Scale (<= 1) that makes the outline's enclosing circle fit in size - 2 margin_px."""
    _, _, radius = component_circle(outline)
    return min(1.0, (size - 2 * margin_px) / (2 * radius))


def _place(image: np.ndarray, outline: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, int, int, tuple]:
    """The crop's pixels and outline on a size x size canvas with the enclosing circle centred:
    (pixels, covered (where the crop has pixels), outline, x0, y0 (crop origin in the canvas),
    circle in canvas px)."""
    cx, cy, radius = component_circle(outline)
    x0, y0 = int(round(size / 2 - cx)), int(round(size / 2 - cy))
    h, w = outline.shape
    canvas = np.zeros((size, size, 3), np.float32)
    covered = np.zeros((size, size), bool)
    mask = np.zeros((size, size), bool)
    ys, xs = slice(max(y0, 0), min(y0 + h, size)), slice(max(x0, 0), min(x0 + w, size))
    src = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    canvas[ys, xs] = image[src]
    covered[ys, xs] = True
    mask[ys, xs] = outline[src]
    if mask.sum() != outline.sum():
        raise ValueError("the outline does not fit the canvas")
    return canvas, covered, mask, x0, y0, (cx + x0, cy + y0, radius)


def reflect_canvas(image: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """The crop (uint8) padded by reflection to a size x size canvas with its origin at (x0, y0)."""
    h, w = image.shape[:2]
    pad = ((max(y0, 0), max(size - y0 - h, 0)), (max(x0, 0), max(size - x0 - w, 0)), (0, 0))
    out = np.pad(image, pad, mode="symmetric")
    oy, ox = max(-y0, 0), max(-x0, 0)
    return out[oy:oy + size, ox:ox + size]


def find_window(tiles, mask: np.ndarray, settings: OutlineCropSettings, rng: np.random.Generator):
    """A (tile, x, y) whose size x size window has tissue under the outline (plus clearance) and
    no labelled glomerulus there: the best of ``attempts`` random windows (most tissue, then
    least glomerulus overlap); None when no tile is large enough."""
    size = settings.size
    need = ndimage.binary_dilation(mask, iterations=settings.clearance_px)
    usable = [t for t in tiles if t.image.shape[0] >= size and t.image.shape[1] >= size]
    if not usable:
        return None
    best, best_score = None, None
    for _ in range(settings.attempts):
        t = usable[int(rng.integers(len(usable)))]
        h, w = t.labels.shape
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        tissue = t.tissue[y:y + size, x:x + size]
        glom = t.labels[y:y + size, x:x + size] > 0
        score = (-(glom & need).sum(), (tissue & need).mean() / need.mean())
        if best_score is None or score > best_score:
            best, best_score = (t, x, y), score
        if score[0] == 0 and score[1] >= 0.9:
            break
    return best


def _stain_towards(background: np.ndarray, background_tissue: np.ndarray, crop: np.ndarray,
                   crop_reference: np.ndarray) -> np.ndarray:
    """Background colours moved to the crop's reference tissue's mean optical density (float RGB)."""
    od = optical_density(background)
    if background_tissue.sum() < 100 or crop_reference.sum() < 100:
        return background.astype(np.float32)
    return from_optical_density(od * stain_ratio(od[background_tissue].mean(0), optical_density(crop)[crop_reference].mean(0)))


@dataclass
class _Tile:
    name: str
    group: str
    image: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray


def outline_crop(crop: GlomerulusCrop, settings: OutlineCropSettings, tiles: list | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """One crop on its canvas: (image uint8, mask bool, manifest fields)."""
    size = settings.size
    scale = fit_scale(crop.outline, size, settings.margin_px)
    image = resize_rgb(crop.image, scale) if scale < 1 else crop.image
    outline = resize_mask(crop.outline, image.shape[:2]) if scale < 1 else crop.outline
    outline = ndimage.binary_fill_holes(outline)
    labels, n = ndimage.label(outline, structure=np.ones((3, 3)))
    if n > 1:  # one glomerulus: the largest piece of the resampled outline
        outline = labels == 1 + int(np.argmax(ndimage.sum(outline, labels, range(1, n + 1))))
    pixels, covered, mask, x0, y0, circle = _place(image.astype(np.float32), outline, size)
    other = 0
    window = tiles and find_window(tiles, mask, settings, rng)
    if window:
        tile, wx, wy = window
        background = tile.image[wy:wy + size, wx:wx + size]
        around = covered & ~ndimage.binary_dilation(mask, iterations=2) & tissue_map(
            np.clip(pixels, 0, 255).astype(np.uint8))
        reference = around if around.sum() >= 100 else mask
        out = _stain_towards(background, tile.tissue[wy:wy + size, wx:wx + size], pixels, reference)
        keep = ndimage.binary_dilation(mask, iterations=settings.keep_px) & covered
        alpha = keep.astype(np.float32)
        if settings.edge_sigma_px > 0:  # soft edge outside the mask only
            alpha = np.clip(ndimage.gaussian_filter(alpha, settings.edge_sigma_px), 0, 1)
        alpha = alpha * covered
        alpha[mask] = 1.0
        result = alpha[..., None] * pixels + (1 - alpha[..., None]) * out
        result = np.clip(np.rint(result), 0, 255).astype(np.uint8)
        result[mask] = np.clip(np.rint(pixels[mask]), 0, 255).astype(np.uint8)
        other = int(((tile.labels[wy:wy + size, wx:wx + size] > 0) & ~mask).sum())
        context = f"{tile.name}:{wx},{wy}"
    else:
        result = reflect_canvas(np.clip(np.rint(image), 0, 255).astype(np.uint8), x0, y0, size)
        context = "reflect"
    cx, cy, radius = circle
    fields = {"x0": x0, "y0": y0, "cx": round(cx, 3), "cy": round(cy, 3), "radius": round(radius, 3),
              "mask_px": int(mask.sum()), "other_glomeruli_px": other, "scale": round(scale, 5), "context": context}
    return result, mask, fields


def make_outline_crops(crop_set_dir: Path, out_dir: Path, settings: OutlineCropSettings = OutlineCropSettings(),
                       tiles_dir: Path | None = None) -> pd.DataFrame:
    """Write the crops folder (see the module doc); returns its manifest."""
    if settings.classes not in ("sclerosed", "normal", "all"):
        raise ValueError(f"classes must be sclerosed, normal or all, got {settings.classes!r}")
    out_dir = Path(out_dir)
    crops = read_crop_set(Path(crop_set_dir))
    split = split_slides([c.slide for c in crops], settings.validation_fraction, settings.seed)
    wanted = {"sclerosed": (SCLEROSED,), "normal": (NORMAL,), "all": (NORMAL, SCLEROSED)}[settings.classes]
    chosen = [c for c in crops if c.label in wanted]
    if not chosen:
        raise ValueError(f"{crop_set_dir}: no {settings.classes} glomeruli in labels.csv")
    tiles_by_split: dict[str, list] = {"train": [], "val": []}
    if tiles_dir is not None:
        tile_set = read_tile_set(Path(tiles_dir), settings.tiles_mpp, settings.target_mpp)
        tile_split = split_slides([t.group for t in tile_set], settings.validation_fraction, settings.seed)
        for t in tile_set:
            tiles_by_split[tile_split[t.group]].append(_Tile(t.name, t.group, t.image, t.labels, tissue_map(t.image)))
        for name, tiles in tiles_by_split.items():
            if not tiles:
                log.warning("%s: no %s tiles: the %s crops are padded by reflection", tiles_dir, name, name)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    rows = []
    for index, crop in enumerate(chosen):
        rng = np.random.default_rng([settings.seed, index])
        image, mask, fields = outline_crop(crop, settings, tiles_by_split[split[crop.slide]] or None, rng)
        crop_id = Path(crop.name).stem
        write_png(out_dir / "images" / f"{crop_id}.png", image)
        write_png(out_dir / "masks" / f"{crop_id}.png", mask.astype(np.uint8) * 255)
        rows.append({"crop_id": crop_id, "split": "test" if split[crop.slide] == "val" else "train",
                     "source": crop.name, "slide": crop.slide, "slide_cx": np.nan, "slide_cy": np.nan,
                     "image": crop.name, "label": crop.label, **fields})
    manifest = pd.DataFrame(rows, columns=OUTLINE_CROP_COLUMNS)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    return manifest
