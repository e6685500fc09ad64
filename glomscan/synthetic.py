"""Synthetic PAS-like slides with known glomeruli, written as real pyramidal TIFFs by pyvips.

Used by the tests, the demo and the benchmarks. The slide is assembled from blocks: blocks
off tissue are one shared white image, blocks on tissue are rendered in numpy and kept
compressed until libvips streams them into the TIFF, so a 100k x 100k slide needs little RAM.

Colours are chosen so that a colour "oracle" can recover the ground truth from pixels:
normal glomeruli are pale lilac with dark nuclei-free texture, sclerosed ones dense and
homogeneous magenta, tissue pink, glass white.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyvips

from .labels import LABEL_OF_CLASS, QUPATH_CLASS_NAMES
from .qupath import feature_collection, polygon_feature

GLASS = (246, 244, 247)
TISSUE = (222, 168, 196)
NORMAL = (186, 128, 214)
SCLEROSED = (150, 36, 120)
"""Reference colours (RGB) of the synthetic classes."""


@dataclass(frozen=True)
class SyntheticGlomerulus:
    x: float
    y: float
    """Centre, level-0 pixels."""
    radius: float
    """Level-0 pixels."""
    sclerosed: bool


@dataclass
class SyntheticSlide:
    path: Path
    width: int
    height: int
    mpp: float | None
    tissue: list[tuple[int, int, int, int]]
    """Tissue rectangles (x0, y0, x1, y1), level-0 pixels."""
    glomeruli: list[SyntheticGlomerulus] = field(default_factory=list)
    colour_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per-slide stain variation added to every reference colour."""
    distractors: list[tuple[float, float, float, float]] = field(default_factory=list)
    """Tubule-like ellipses (x, y, rx, ry) in level-0 px: round, dense, but not glomeruli."""

    def qupath_geojson(self) -> dict:
        """The glomeruli as a QuPath annotation export (64-gon per glomerulus, level-0 px)."""
        features = []
        for g in self.glomeruli:
            a = np.linspace(0, 2 * np.pi, 65)
            ring = np.stack([g.x + g.radius * np.cos(a), g.y + g.radius * np.sin(a)], axis=1)
            ring[-1] = ring[0]
            features.append(polygon_feature([ring.round(2).tolist()],
                                            QUPATH_CLASS_NAMES["sclerosed" if g.sclerosed else "normal"]))
        return feature_collection(features)

    def label_image(self, downsample: float = 1.0) -> np.ndarray:
        """Ground-truth labels (0/1 normal/2 sclerosed) at level-0 / downsample."""
        h, w = int(round(self.height / downsample)), int(round(self.width / downsample))
        yy, xx = np.mgrid[0:h, 0:w]
        labels = np.zeros((h, w), np.uint8)
        for g in self.glomeruli:
            inside = ((xx + 0.5) * downsample - g.x) ** 2 + ((yy + 0.5) * downsample - g.y) ** 2 <= g.radius**2
            labels[inside] = LABEL_OF_CLASS["sclerosed" if g.sclerosed else "normal"]
        return labels


def _render_block(x0: int, y0: int, w: int, h: int, slide: SyntheticSlide, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32) + 0.5
    img = np.empty((h, w, 3), np.float32)
    shift = np.asarray(slide.colour_shift, np.float32)
    img[:] = GLASS
    tissue = np.zeros((h, w), bool)
    for tx0, ty0, tx1, ty1 in slide.tissue:
        tissue |= (xx >= tx0) & (xx < tx1) & (yy >= ty0) & (yy < ty1)
    # gentle low-frequency stain variation plus fine grain, pink tissue
    wave = 10 * np.sin(xx / 53.0) * np.cos(yy / 71.0)
    img[tissue] = np.asarray(TISSUE, np.float32) + shift + wave[tissue, None]
    for dx, dy, rx, ry in slide.distractors:
        if dx + rx < x0 or dx - rx > x0 + w or dy + ry < y0 or dy - ry > y0 + h:
            continue
        inside = ((xx - dx) / rx) ** 2 + ((yy - dy) / ry) ** 2 <= 1
        ring = inside & (((xx - dx) / (0.6 * rx)) ** 2 + ((yy - dy) / (0.6 * ry)) ** 2 > 1)
        img[ring] = np.asarray((196, 120, 170), np.float32) + shift  # tubular epithelium
        img[inside & ~ring] = np.asarray((236, 214, 228), np.float32) + shift  # lumen
    for g in slide.glomeruli:
        if g.x + g.radius < x0 or g.x - g.radius > x0 + w or g.y + g.radius < y0 or g.y - g.radius > y0 + h:
            continue
        inside = (xx - g.x) ** 2 + (yy - g.y) ** 2 <= g.radius**2
        img[inside] = np.asarray(SCLEROSED if g.sclerosed else NORMAL, np.float32) + shift
        if not g.sclerosed:  # capillary-loop texture in normal glomeruli
            img[inside] += (6 * np.sin(xx[inside] / 3.1) * np.sin(yy[inside] / 2.7))[:, None]
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_slide(path: Path, width: int, height: int, glomeruli: list[SyntheticGlomerulus],
                          tissue: list[tuple[int, int, int, int]] | None = None, mpp: float | None = 0.5,
                          seed: int = 0, compression: str = "deflate", block: int = 1024,
                          pyramid: bool = True, colour_shift: tuple[float, float, float] = (0.0, 0.0, 0.0),
                          distractors: list[tuple[float, float, float, float]] | None = None) -> SyntheticSlide:
    """Write a tiled (pyramidal) TIFF. ``compression`` "jpeg" for big benchmark slides (small,
    lossy) or "deflate"/"lzw" for exact colours. ``mpp`` None writes no resolution tags."""
    path = Path(path)
    slide = SyntheticSlide(path, width, height, mpp, tissue if tissue is not None else [(0, 0, width, height)],
                           list(glomeruli), tuple(colour_shift), list(distractors or []))
    rng = np.random.default_rng(seed)
    white = None
    rows = []
    for by in range(0, height, block):
        row = []
        for bx in range(0, width, block):
            w, h = min(block, width - bx), min(block, height - by)
            touches = any(tx0 < bx + w and tx1 > bx and ty0 < by + h and ty1 > by
                          for tx0, ty0, tx1, ty1 in slide.tissue)
            if touches:
                pixels = _render_block(bx, by, w, h, slide, rng)
                buffer = pyvips.Image.new_from_array(pixels, interpretation="srgb").write_to_buffer(
                    ".jpg[Q=92]" if compression == "jpeg" else ".png[compression=1]")
                row.append(pyvips.Image.new_from_buffer(buffer, ""))
            else:
                if white is None or white.width != w or white.height != h:
                    white = (pyvips.Image.black(w, h, bands=3) + list(GLASS)).cast("uchar").copy(interpretation="srgb")
                row.append(white)
        rows.append(row)
    # arrayjoin pads every cell to the largest; only the last row/column is smaller, so crop
    flat = [im for r in rows for im in r]
    image = pyvips.Image.arrayjoin(flat, across=len(rows[0])).crop(0, 0, width, height)
    kwargs = dict(tile=True, tile_width=256, tile_height=256, pyramid=pyramid, compression=compression,
                  bigtiff=width * height * 3 > 2**31)
    if compression == "jpeg":
        kwargs["Q"] = 90
    if mpp is not None:
        kwargs.update(xres=1000.0 / mpp, yres=1000.0 / mpp, resunit="cm")
    image.tiffsave(str(path), **kwargs)
    return slide


def scatter_glomeruli(tissue: list[tuple[int, int, int, int]], n: int, radius_range: tuple[float, float],
                      sclerosed_fraction: float, seed: int = 0, margin: float = 1.2) -> list[SyntheticGlomerulus]:
    """Non-overlapping discs inside the tissue rectangles (rejection sampling)."""
    rng = np.random.default_rng(seed)
    placed: list[SyntheticGlomerulus] = []
    n_scl = int(round(n * sclerosed_fraction))
    attempts = 0
    while len(placed) < n and attempts < 200 * max(n, 1):
        attempts += 1
        tx0, ty0, tx1, ty1 = tissue[rng.integers(len(tissue))]
        r = rng.uniform(*radius_range)
        if tx1 - tx0 < 2 * r * margin or ty1 - ty0 < 2 * r * margin:
            continue
        x = rng.uniform(tx0 + r * margin, tx1 - r * margin)
        y = rng.uniform(ty0 + r * margin, ty1 - r * margin)
        if all(math.hypot(x - g.x, y - g.y) > (r + g.radius) * margin for g in placed):
            placed.append(SyntheticGlomerulus(x, y, r, sclerosed=len(placed) < n_scl))
    return placed


def needle_biopsy_slide(path: Path, quick: bool = False, mpp: float = 0.5, pyramid: bool = True) -> SyntheticSlide:
    """What the speed benchmarks call a needle biopsy: a transplant needle-biopsy layout of three
    cores 0.9 mm wide (1800 px at 0.5 µm/px) and 3-7 mm long with glass between them, in a
    20000 x 12000 px (10 x 6 mm) region, about 20 % tissue, 30 glomeruli of which 30 % sclerosed,
    JPEG tiles. ``quick``: 8000 x 5000 px with 900 px cores. ``mpp`` 0.25 draws the same
    millimetres at 40x (twice the pixels per side); ``pyramid`` False writes level 0 alone."""
    scale = 0.5 / mpp
    w, h = (int(8000 * scale), int(5000 * scale)) if quick else (int(20000 * scale), int(12000 * scale))
    core = int((900 if quick else 1800) * scale)
    cores = [(int(w * 0.05), int(h * 0.10), int(w * 0.75), int(h * 0.10) + core),
             (int(w * 0.20), int(h * 0.45), int(w * 0.80), int(h * 0.45) + core),
             (int(w * 0.10), int(h * 0.78), int(w * 0.45), int(h * 0.78) + core)]
    glomeruli = scatter_glomeruli(cores, 30, (int(80 * scale), int(150 * scale)), 0.3)
    return write_synthetic_slide(path, w, h, glomeruli, cores, mpp=mpp, compression="jpeg", pyramid=pyramid)


def demo_slide(path: Path, seed: int = 7) -> SyntheticSlide:
    """The bundled demo: 6000 x 5000 px at 0.5 µm/px (20x), two tissue cores, 14 glomeruli."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tissue = [(300, 400, 2900, 4600), (3300, 800, 5700, 4300)]
    glomeruli = scatter_glomeruli(tissue, 14, (90, 160), sclerosed_fraction=0.3, seed=seed)
    return write_synthetic_slide(path, 6000, 5000, glomeruli, tissue, mpp=0.5, seed=seed, compression="jpeg")


def training_slide(path: Path, seed: int, width: int = 4000, height: int = 3000) -> SyntheticSlide:
    """A varied synthetic slide for training: stain shift, 1-2 tissue pieces, 6-14 glomeruli of
    which 15-50 % sclerosed, and tubule-like distractors."""
    rng = np.random.default_rng(seed)
    tissue = [(int(width * 0.05), int(height * 0.08), int(width * rng.uniform(0.5, 0.95)), int(height * 0.92))]
    if tissue[0][2] < width * 0.7:
        tissue.append((int(width * 0.75), int(height * rng.uniform(0.1, 0.4)), int(width * 0.97), int(height * 0.9)))
    glomeruli = scatter_glomeruli(tissue, int(rng.integers(6, 15)), (70, 160), float(rng.uniform(0.15, 0.5)), seed=seed)
    distractors = []
    for _ in range(int(rng.integers(15, 40))):
        tx0, ty0, tx1, ty1 = tissue[int(rng.integers(len(tissue)))]
        x, y = rng.uniform(tx0 + 40, tx1 - 40), rng.uniform(ty0 + 40, ty1 - 40)
        if all(math.hypot(x - g.x, y - g.y) > g.radius + 60 for g in glomeruli):
            distractors.append((x, y, rng.uniform(20, 45), rng.uniform(20, 45)))
    shift = tuple(float(v) for v in rng.normal(0, 8, 3))
    return write_synthetic_slide(path, width, height, glomeruli, tissue, mpp=0.5, seed=seed, compression="jpeg",
                                 colour_shift=shift, distractors=distractors)


def write_training_slides(out_dir: Path, count: int, seed: int) -> None:
    """``count`` training slides as ``OUT/slides/synthetic000.tif``... with their outlines as
    QuPath GeoJSON in ``OUT/annotations/``; slide i uses seed ``seed + i``."""
    import json

    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(exist_ok=True)
    for i in range(count):
        slide = training_slide(out_dir / "slides" / f"synthetic{i:03d}.tif", seed=seed + i)
        (out_dir / "annotations" / f"synthetic{i:03d}.geojson").write_text(json.dumps(slide.qupath_geojson()))


def write_real_tissue_slide(path: Path, width: int, height: int, tissue: list[tuple[int, int, int, int]],
                            seed: int = 0, sample_dir: Path | None = None) -> int:
    """A pyramidal JPEG TIFF at 0.5 µm/px whose tissue rectangles are paved with the shipped
    sample's real PAS tiles (1024 px at 0.5 µm/px, each turned and mirrored at random), on
    glass elsewhere: a slide of any size on which a model trained on real tissue finds
    glomeruli of real sizes (synthetic discs are not tissue to it). Returns the tiles placed."""
    from .shipped import SAMPLE_DIR

    sources = [pyvips.Image.new_from_file(str(p), access="random")
               for p in sorted(Path(sample_dir or SAMPLE_DIR).glob("*.tif"))]
    if not sources:
        raise FileNotFoundError(f"no sample tiles (*.tif) in {sample_dir or SAMPLE_DIR}")
    sources = [s.extract_band(0, n=3) if s.bands > 3 else s for s in sources]
    rng = np.random.default_rng(seed)
    image = (pyvips.Image.black(width, height, bands=3) + list(GLASS)).cast("uchar").copy(interpretation="srgb")
    placed = 0
    for x0, y0, x1, y1 in tissue:
        for y in range(y0, y1, 1024):
            for x in range(x0, x1, 1024):
                tile = sources[int(rng.integers(len(sources)))].rot(("d0", "d90", "d180", "d270")[int(rng.integers(4))])
                if rng.integers(2):
                    tile = tile.fliphor()
                tile = tile.crop(0, 0, min(tile.width, x1 - x, width - x), min(tile.height, y1 - y, height - y))
                image = image.insert(tile, x, y)
                placed += 1
    image.tiffsave(str(path), tile=True, tile_width=256, tile_height=256, pyramid=True, compression="jpeg", Q=90,
                   xres=2000.0, yres=2000.0, resunit="cm")
    return placed
