"""Training sets from slides + annotations, the way the paper prepared them.

Each annotated slide is read at the analysis resolution, cut into tile x tile patches with the
given stride, and every patch touching tissue is written as ``images/<id>.png`` (RGB) and
``masks/<id>.png`` (uint8 labels: 0 background, 1 normal, 2 sclerosed glomerulus). A manifest
(``manifest.csv``) records slide, position, class pixel counts and the split; the split is by
slide, so patches of one slide never sit in both train and validation.

Annotations per slide (matched by file stem, in the annotations folder):
  ``<stem>.geojson``              QuPath export (polygons with classification names)
  ``<stem>_labels.png/.tif``      one label image (0/1/2), any resolution (scaled nearest)
  ``<stem>_normal.png`` + ``<stem>_sclerosed.png``  one binary mask per class (white on black)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips
from skimage.draw import polygon as fill_polygon

from ..config import TissueSettings
from ..slides import Slide, TileReader, find_slides, image_to_array
from ..tiling import TileGrid

log = logging.getLogger(__name__)

DEFAULT_CLASS_MAP = {
    "glomerulus normal": 1, "normal": 1, "normal glomerulus": 1, "glomerulus": 1, "non-sclerotic": 1,
    "glomerulus sclerosed": 2, "sclerosed": 2, "sclerosed glomerulus": 2, "sclerotic": 2,
    "globally sclerosed": 2, "global sclerosis": 2, "sclerotic glomerulus": 2,
}
"""QuPath classification name (case-insensitive) -> label."""

MANIFEST_COLUMNS = ["patch_id", "slide", "split", "x0", "y0", "x", "y", "tile", "n_normal_px", "n_sclerosed_px",
                    "synthetic", "image", "mask"]


class AnnotationError(Exception):
    pass


def parse_class_map(text: str | None) -> dict[str, int]:
    """"Name A=normal,Name B=sclerosed" -> {"name a": 1, "name b": 2}; None -> the default map."""
    if not text:
        return dict(DEFAULT_CLASS_MAP)
    mapping = {}
    for item in text.split(","):
        name, _, cls = item.partition("=")
        cls = cls.strip().lower()
        if cls not in ("normal", "sclerosed", "ignore"):
            raise ValueError(f"class map entry {item!r}: class must be normal, sclerosed or ignore")
        mapping[name.strip().lower()] = {"normal": 1, "sclerosed": 2, "ignore": 0}[cls]
    return mapping


@dataclass
class PolygonAnnotation:
    label: int
    rings: list[np.ndarray]
    """First ring is the outline, the others holes; (n, 2) arrays of level-0 (x, y)."""


def read_qupath_geojson(path: Path, class_map: dict[str, int]) -> tuple[list[PolygonAnnotation], dict[str, int]]:
    """Polygons (and MultiPolygons) with a mapped classification. Returns them and the count of
    features skipped per unmapped classification name, so nothing is dropped silently."""
    data = json.loads(Path(path).read_text())
    features = data.get("features", []) if isinstance(data, dict) and data.get("type") == "FeatureCollection" else (
        data if isinstance(data, list) else [data])
    polygons, skipped = [], {}
    for f in features:
        props = f.get("properties") or {}
        cls = props.get("classification") or {}
        name = (cls.get("name") if isinstance(cls, dict) else str(cls)) or props.get("name") or ""
        label = class_map.get(name.strip().lower())
        geometry = f.get("geometry") or {}
        if label is None:
            skipped[name or "<unclassified>"] = skipped.get(name or "<unclassified>", 0) + 1
            continue
        if label == 0:
            continue
        parts = ([geometry["coordinates"]] if geometry.get("type") == "Polygon"
                 else geometry.get("coordinates", []) if geometry.get("type") == "MultiPolygon" else [])
        for rings in parts:
            polygons.append(PolygonAnnotation(label, [np.asarray(r, np.float64)[:, :2] for r in rings]))
    return polygons, skipped


def rasterise_polygons(polygons: list[PolygonAnnotation], x0: float, y0: float, width: int, height: int,
                       downsample: float) -> np.ndarray:
    """Labels (height, width) of the window whose top-left is level-0 (x0, y0), at level-0 /
    downsample. Pixel centres inside a polygon (and outside its holes) get its label;
    sclerosed wins where classes overlap."""
    out = np.zeros((height, width), np.uint8)
    for label in (1, 2):
        for poly in polygons:
            if poly.label != label:
                continue
            outline = (poly.rings[0] - (x0, y0)) / downsample - 0.5
            if (outline[:, 0].max() < 0 or outline[:, 1].max() < 0 or outline[:, 0].min() >= width
                    or outline[:, 1].min() >= height):
                continue
            inside = np.zeros_like(out, bool)
            rr, cc = fill_polygon(outline[:, 1], outline[:, 0], shape=out.shape)
            inside[rr, cc] = True
            for hole in poly.rings[1:]:
                h = (hole - (x0, y0)) / downsample - 0.5
                rr, cc = fill_polygon(h[:, 1], h[:, 0], shape=out.shape)
                inside[rr, cc] = False
            out[inside] = label
    return out


class LabelSource:
    """Where a slide's labels come from, read per analysis-resolution window."""

    def __init__(self, slide: Slide, annotations_dir: Path, class_map: dict[str, int], analysis_size: tuple[int, int],
                 downsample: float):
        stem = slide.path.stem
        self.downsample = downsample
        self.polygons: list[PolygonAnnotation] | None = None
        self.label_image: pyvips.Image | None = None
        self.skipped: dict[str, int] = {}
        d = Path(annotations_dir)
        geojson = d / f"{stem}.geojson"
        if geojson.is_file():
            self.polygons, self.skipped = read_qupath_geojson(geojson, class_map)
            self.source = geojson.name
        else:
            self.label_image, self.source = label_image_from_masks(d, stem, *analysis_size)

    def window(self, x: int, y: int, tile: int) -> np.ndarray:
        """Labels of the analysis-resolution window at (x, y), padded with background."""
        if self.polygons is not None:
            return rasterise_polygons(self.polygons, x * self.downsample, y * self.downsample, tile, tile, self.downsample)
        img = self.label_image
        out = np.zeros((tile, tile), np.uint8)
        x1, y1 = min(x + tile, img.width), min(y + tile, img.height)
        if x1 > x and y1 > y:
            out[: y1 - y, : x1 - x] = image_to_array(img.crop(x, y, x1 - x, y1 - y))[..., 0]
        return out


def label_image_from_masks(folder: Path, stem: str, width: int, height: int) -> tuple[pyvips.Image, str]:
    """Labels (lazy, width x height, nearest-scaled) from ``<stem>_labels.png/.tif`` or from
    ``<stem>_normal.png`` + ``<stem>_sclerosed.png``; and which file(s) it came from."""
    d = Path(folder)
    labels = next((p for p in (d / f"{stem}_labels.png", d / f"{stem}_labels.tif") if p.is_file()), None)
    normal, sclerosed = d / f"{stem}_normal.png", d / f"{stem}_sclerosed.png"
    if labels is not None:
        return _resize_nearest(pyvips.Image.new_from_file(str(labels))[0], width, height), labels.name
    if normal.is_file() and sclerosed.is_file():
        n = _resize_nearest(pyvips.Image.new_from_file(str(normal))[0], width, height) > 127
        s = _resize_nearest(pyvips.Image.new_from_file(str(sclerosed))[0], width, height) > 127
        return s.ifthenelse(2, n.ifthenelse(1, 0)).cast("uchar"), f"{normal.name} + {sclerosed.name}"
    raise AnnotationError(f"no annotations for {stem} in {d} (looked for {stem}.geojson, {stem}_labels.png/.tif, "
                          f"{stem}_normal.png + {stem}_sclerosed.png)")


def _resize_nearest(image: pyvips.Image, width: int, height: int) -> pyvips.Image:
    if (image.width, image.height) == (width, height):
        return image
    return image.resize(width / image.width, vscale=height / image.height, kernel="nearest")


@dataclass
class PrepareSettings:
    target_mpp: float = 1.0
    downsample: float = 2.0
    """Used for slides without mpp."""
    tile: int = 1024
    stride: int = 512
    validation_fraction: float = 0.2
    seed: int = 0
    class_map: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CLASS_MAP))
    tissue: TissueSettings = field(default_factory=TissueSettings)


def split_slides(slides: list[str], validation_fraction: float, seed: int) -> dict[str, str]:
    """Slide-level train/val split (val gets round(fraction * n) slides, at least one when n >= 2)."""
    names = sorted(slides)
    rng = random.Random(seed)
    rng.shuffle(names)
    n_val = max(1, round(validation_fraction * len(names))) if len(names) >= 2 else 0
    return {name: ("val" if i < n_val else "train") for i, name in enumerate(names)}


def prepare_dataset(slides_dir: Path, annotations_dir: Path, out_dir: Path, settings: PrepareSettings) -> pd.DataFrame:
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    slides = find_slides(slides_dir)
    if not slides:
        raise AnnotationError(f"no slides in {slides_dir}")
    split = split_slides([s.stem for s in slides], settings.validation_fraction, settings.seed)
    rows = []
    for path in slides:
        slide = Slide(path)
        downsample = settings.target_mpp / slide.mpp if slide.mpp else settings.downsample
        image, _ = slide.image_at(downsample)
        labels = LabelSource(slide, annotations_dir, settings.class_map, (image.width, image.height), downsample)
        for name, count in labels.skipped.items():
            log.warning("%s: %d annotation(s) classified %r are not in the class map; skipped", path.name, count, name)
        tissue = slide.tissue(downsample, settings.target_mpp if slide.mpp else 1.0, settings.tissue)
        grid = TileGrid(image.width, image.height, settings.tile, settings.stride)
        reader = TileReader(image, settings.tile)
        for t in grid.tissue_tiles(tissue):
            pixels = reader.read(t.x, t.y)
            mask = labels.window(t.x, t.y, settings.tile)
            patch_id = f"{path.stem}_x{t.x}_y{t.y}"
            write_png(out_dir / "images" / f"{patch_id}.png", pixels, compression=3)
            write_png(out_dir / "masks" / f"{patch_id}.png", mask, compression=6)
            rows.append({"patch_id": patch_id, "slide": path.stem, "split": split[path.stem],
                         "x0": round(t.x * downsample), "y0": round(t.y * downsample), "x": t.x, "y": t.y,
                         "tile": settings.tile, "n_normal_px": int((mask == 1).sum()),
                         "n_sclerosed_px": int((mask == 2).sum()), "synthetic": False,
                         "image": f"images/{patch_id}.png", "mask": f"masks/{patch_id}.png"})
        log.info("%s: %s, %d patches (%s)", path.name, labels.source, sum(r["slide"] == path.stem for r in rows),
                 split[path.stem])
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    return manifest


def load_patch(dataset_dir: Path, row) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, uint8 labels) of a manifest row."""
    return read_png(Path(dataset_dir) / row["image"])[..., :3], read_png(Path(dataset_dir) / row["mask"])[..., 0]


def synthetic_rows(manifest: pd.DataFrame) -> pd.Series:
    """True for the manifest's synthetic patches (``synthesize`` output; the column may be
    absent, bool, or read back from CSV as text)."""
    if "synthetic" not in manifest:
        return pd.Series(False, index=manifest.index)
    return manifest.synthetic.astype(str).str.lower().isin(["true", "1"])


def write_png(path: Path, array: np.ndarray, compression: int = 3) -> None:
    """uint8 (H, W) greyscale or (H, W, 3) RGB as a PNG (images, label masks, picture grids)."""
    interpretation = "srgb" if array.ndim == 3 else "b-w"
    pyvips.Image.new_from_array(np.ascontiguousarray(array), interpretation=interpretation).pngsave(
        str(path), compression=compression)


def read_png(path: Path) -> np.ndarray:
    """A PNG as uint8 (H, W, bands)."""
    return image_to_array(pyvips.Image.new_from_file(str(path)))
