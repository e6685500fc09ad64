"""Training sets from slides + annotations, the way the paper prepared them.

Each annotated slide is read at the analysis resolution, cut into tile x tile patches with the
given stride, and every patch touching tissue is written as ``images/<id>.png`` (RGB) and
``masks/<id>.png`` (uint8 labels: 0 background, 1 normal, 2 sclerosed glomerulus). A manifest
(``manifest.csv``) records slide, position, class pixel counts and the split; the split is by
slide, so patches of one slide never sit in both train and validation.

Annotations per slide (matched by file stem, in the annotations folder):
  ``<stem>.geojson``              QuPath export (polygons with classification names), or the
                                  corrections file of the review page (viewer.html): polygons,
                                  "Not glomerulus" (background) and points (patches near a
                                  point-only glomerulus are left out)
  ``<stem>_labels.png/.tif``      one label image (0/1/2), any resolution (scaled nearest)
  ``<stem>_normal.png`` + ``<stem>_sclerosed.png``  one binary mask per class (white on black)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips
from skimage.draw import polygon as fill_polygon

from ...imaging import image_to_array, read_png, write_png
from ...labels import BACKGROUND, NORMAL, SCLEROSED, UNKNOWN_CLASS
from ...qupath import PointAnnotation, PolygonAnnotation, read_qupath_geojson, read_qupath_points
from ...slides import Slide, TileReader, analysis_resolution, find_slides
from ...tiling import TileGrid
from .composite import paste_glomeruli
from .sources import read_crop_set, read_tile_set
from ..settings import DEFAULT_CLASS_MAP, PrepareSettings

log = logging.getLogger(__name__)

POINT_MARGIN_UM = 150.0
"""A glomerulus marked by a point (no outline) may reach this far from it: patches closer than
this to a point are left out of a training set, since its missing outline would teach them
background."""

MANIFEST_COLUMNS = ["patch_id", "slide", "split", "x0", "y0", "x", "y", "tile", "n_normal_px", "n_sclerosed_px",
                    "synthetic", "image", "mask", "kind", "n_unknown_class_px"]
"""``kind``: slide (cut from an annotated slide), tile (a tile set's tile), composite (a tile
with graded glomerulus crops pasted in). ``n_unknown_class_px``: glomerulus pixels of unknown
class (label 3)."""
PLACEMENT_COLUMNS = ["patch_id", "split", "crop", "slide", "label", "x0", "y0", "x1", "y1", "diameter_um"]
"""``glomeruli.csv`` of a prepared set: one row per pasted glomerulus (patch pixel box)."""


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
        if cls not in ("normal", "sclerosed", "unknown", "ignore"):
            raise ValueError(f"class map entry {item!r}: class must be normal, sclerosed, unknown or ignore")
        mapping[name.strip().lower()] = {"normal": NORMAL, "sclerosed": SCLEROSED, "unknown": UNKNOWN_CLASS,
                                         "ignore": BACKGROUND}[cls]
    return mapping


def near_points(points: list[PointAnnotation], x0: float, y0: float, size: float, margin: float) -> int:
    """How many points lie within ``margin`` of the square window at level-0 (x0, y0), side ``size``."""
    return sum(x0 - margin <= p.x < x0 + size + margin and y0 - margin <= p.y < y0 + size + margin for p in points)


def rasterise_polygons(polygons: list[PolygonAnnotation], x0: float, y0: float, width: int, height: int,
                       downsample: float) -> np.ndarray:
    """Labels (height, width) of the window whose top-left is level-0 (x0, y0), at level-0 /
    downsample. Pixel centres inside a polygon (and outside its holes) get its label; where
    outlines overlap, sclerosed wins over normal, and both over unknown class (3)."""
    out = np.zeros((height, width), np.uint8)
    for label in (3, 1, 2):
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
        self.points: list[PointAnnotation] = []
        self.label_image: pyvips.Image | None = None
        self.skipped: dict[str, int] = {}
        d = Path(annotations_dir)
        geojson = d / f"{stem}.geojson"
        if geojson.is_file():
            self.polygons, self.skipped = read_qupath_geojson(geojson, class_map)
            self.points = read_qupath_points(geojson, class_map)
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


def split_slides(slides: list[str], validation_fraction: float, seed: int) -> dict[str, str]:
    """Slide-level (or tile-group-level) train/val split: val gets round(fraction * n) of the n
    distinct names, at least one when n >= 2."""
    names = sorted(set(slides))
    rng = random.Random(seed)
    rng.shuffle(names)
    n_val = max(1, round(validation_fraction * len(names))) if len(names) >= 2 else 0
    return {name: ("val" if i < n_val else "train") for i, name in enumerate(names)}


def prepare_dataset(slides_dir: Path | None, annotations_dir: Path | None, out_dir: Path, settings: PrepareSettings,
                    tiles_dir: Path | None = None, crops_dir: Path | None = None) -> pd.DataFrame:
    """A training set from any mix of annotated slides, a tile set and a glomerulus crop set
    (crops need a tile set for their backgrounds). Writes images/, masks/, manifest.csv and,
    with crops, glomeruli.csv."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    if crops_dir is not None and tiles_dir is None:
        raise AnnotationError("a glomerulus crop set is composited into tissue: it needs a tile set (--tiles) "
                              "for the backgrounds")
    if slides_dir is None and tiles_dir is None:
        raise AnnotationError("nothing to prepare: give annotated slides, a tile set, or both")
    rows = _slide_patches(slides_dir, annotations_dir, out_dir, settings) if slides_dir is not None else []
    placements: list[dict] = []
    if tiles_dir is not None:
        tile_rows, placements = _tile_and_crop_patches(tiles_dir, crops_dir, out_dir, settings)
        rows += tile_rows
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    (out_dir / "dataset.json").write_text(json.dumps({"target_mpp": settings.target_mpp}))
    if crops_dir is not None:
        pd.DataFrame(placements, columns=PLACEMENT_COLUMNS).to_csv(out_dir / "glomeruli.csv", index=False)
    return manifest


def _patch_row(patch_id: str, group: str, split: str, kind: str, labels: np.ndarray) -> dict:
    return {"patch_id": patch_id, "slide": group, "split": split, "x0": 0, "y0": 0, "x": 0, "y": 0,
            "tile": labels.shape[0], "n_normal_px": int((labels == NORMAL).sum()), "n_sclerosed_px": int((labels == SCLEROSED).sum()),
            "synthetic": False, "image": f"images/{patch_id}.png", "mask": f"masks/{patch_id}.png", "kind": kind,
            "n_unknown_class_px": int((labels == UNKNOWN_CLASS).sum())}


def _tile_and_crop_patches(tiles_dir: Path, crops_dir: Path | None, out_dir: Path,
                           settings: PrepareSettings) -> tuple[list[dict], list[dict]]:
    """Tile-set patches (glomerulus pixels of unknown class) and, with a crop set, composites:
    each training crop pasted ``composite_uses`` times into training tiles, each validation crop
    once into validation tiles. Tiles split by tile group, crops by slide."""
    tiles = read_tile_set(tiles_dir, settings.tiles_mpp, settings.target_mpp)
    tile_split = split_slides([t.group for t in tiles], settings.validation_fraction, settings.seed)
    rows: list[dict] = []
    for t in tiles:
        patch_id = f"tile_{t.name}"
        _write_patch(out_dir, patch_id, t.image, t.labels)
        rows.append(_patch_row(patch_id, t.group, tile_split[t.group], "tile", t.labels))
    log.info("%s: %d tiles in %d groups (%d val)", tiles_dir, len(tiles), len(tile_split),
             sum(v == "val" for v in tile_split.values()))
    if crops_dir is None:
        return rows, []
    crops = read_crop_set(crops_dir)
    crop_split = split_slides([c.slide for c in crops], settings.validation_fraction, settings.seed)
    rng = np.random.default_rng(settings.seed)
    placements: list[dict] = []
    for split, uses in (("train", settings.composite_uses), ("val", 1)):
        backgrounds = [t for t in tiles if tile_split[t.group] == split]
        queue = [c for c in crops if crop_split[c.slide] == split for _ in range(
            uses * (settings.sclerosed_oversampling if split == "train" and c.label == SCLEROSED else 1))]
        if not queue:
            continue
        if not backgrounds:
            raise AnnotationError(f"no {split} tiles to composite the {split} glomerulus crops into")
        rng.shuffle(queue)
        failures: dict[str, int] = {}
        n = 0
        while queue:
            background = backgrounds[int(rng.integers(len(backgrounds)))]
            k = int(rng.integers(settings.glomeruli_per_composite[0], settings.glomeruli_per_composite[1] + 1))
            batch, queue = queue[:k], queue[k:]
            image, labels, placed, unplaced = paste_glomeruli(background.image, background.labels, batch,
                                                              settings.target_mpp, settings.composite, rng)
            for crop in unplaced:  # try again on another background, up to three times
                failures[crop.name] = failures.get(crop.name, 0) + 1
                if failures[crop.name] < 3:
                    queue.append(crop)
            if not placed:
                continue
            patch_id = f"composite_{split}_{n:05d}_{background.name}"
            n += 1
            _write_patch(out_dir, patch_id, image, labels)
            rows.append(_patch_row(patch_id, background.group, split, "composite", labels))
            placements += [{"patch_id": patch_id, "split": split, **asdict(p)} for p in placed]
        dropped = sum(v >= 3 for v in failures.values())
        log.info("%s: %d %s composites, %d glomeruli pasted (%d crops found no place)", crops_dir, n, split,
                 sum(p["split"] == split for p in placements), dropped)
    return rows, placements


def mirror_past_edge(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Labels of a tile whose first ``width`` x ``height`` pixels lie inside the image, mirrored
    past the edge exactly as ``TileReader`` mirrors the pixels."""
    h, w = min(height, labels.shape[0]), min(width, labels.shape[1])
    if (h, w) == labels.shape:
        return labels
    return np.pad(labels[:h, :w], ((0, labels.shape[0] - h), (0, labels.shape[1] - w)), mode="symmetric")


def _write_patch(out_dir: Path, patch_id: str, image: np.ndarray, labels: np.ndarray) -> None:
    write_png(out_dir / "images" / f"{patch_id}.png", image, compression=3)
    write_png(out_dir / "masks" / f"{patch_id}.png", labels, compression=6)


def _slide_patches(slides_dir: Path, annotations_dir: Path | None, out_dir: Path, settings: PrepareSettings) -> list[dict]:
    if annotations_dir is None:
        raise AnnotationError("annotated slides need their annotations folder (--annotations)")
    slides = find_slides(slides_dir)
    if not slides:
        raise AnnotationError(f"no slides in {slides_dir}")
    split = split_slides([s.stem for s in slides], settings.validation_fraction, settings.seed)
    rows = []
    for path in slides:
        slide = Slide(path)
        resolution = analysis_resolution(slide, settings.target_mpp, settings.downsample)
        downsample = resolution.downsample
        image, _ = slide.image_at(downsample)
        labels = LabelSource(slide, annotations_dir, settings.class_map, (image.width, image.height), downsample)
        for name, count in labels.skipped.items():
            log.warning("%s: %d annotation(s) classified %r are not in the class map; skipped", path.name, count, name)
        tissue = slide.tissue(downsample, resolution.assumed_mpp, settings.tissue)
        grid = TileGrid(image.width, image.height, settings.tile, settings.stride)
        reader = TileReader(image, settings.tile)
        margin = POINT_MARGIN_UM / (slide.mpp or resolution.assumed_mpp / downsample)  # level-0 px
        near_point = 0
        for t in grid.tissue_tiles(tissue):
            if labels.points and near_points(labels.points, t.x * downsample, t.y * downsample,
                                             settings.tile * downsample, margin):
                near_point += 1
                continue
            pixels = reader.read(t.x, t.y)
            mask = mirror_past_edge(labels.window(t.x, t.y, settings.tile), image.width - t.x, image.height - t.y)
            patch_id = f"{path.stem}_x{t.x}_y{t.y}"
            _write_patch(out_dir, patch_id, pixels, mask)
            rows.append({**_patch_row(patch_id, path.stem, split[path.stem], "slide", mask),
                         "x0": round(t.x * downsample), "y0": round(t.y * downsample), "x": t.x, "y": t.y})
        log.info("%s: %s, %d patches (%s)", path.name, labels.source, sum(r["slide"] == path.stem for r in rows),
                 split[path.stem])
        if near_point:
            log.warning("%s: %d patch(es) left out: within %g µm of the %d glomerul(us/i) marked by a point only "
                        "(outline them to train on them)", path.name, near_point, POINT_MARGIN_UM, len(labels.points))
    return rows


def load_patch(dataset_dir: Path, row) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, uint8 labels) of a manifest row."""
    return read_png(Path(dataset_dir) / row["image"])[..., :3], read_png(Path(dataset_dir) / row["mask"])[..., 0]


def synthetic_rows(manifest: pd.DataFrame) -> pd.Series:
    """True for the manifest's synthetic patches (``synthesize`` output; the column may be
    absent, bool, or read back from CSV as text)."""
    if "synthetic" not in manifest:
        return pd.Series(False, index=manifest.index)
    return manifest.synthetic.astype(str).str.lower().isin(["true", "1"])


