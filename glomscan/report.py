"""Outputs: label mask TIFF, per-glomerulus CSV, QuPath GeoJSON, overview PNG, slide report.

Coordinates in the CSV and GeoJSON are level-0 pixels of the input slide, so they overlay the
slide in QuPath. ``mask.tif`` is at analysis resolution with its resolution tags set.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips
from scipy import ndimage

from .atomic import atomic_write_bytes, atomic_write_text
from .imaging import equivalent_diameter
from .labels import QUPATH_CLASS_NAMES
from .postprocess import Glomerulus
from .qupath import feature_collection, polygon_feature

CLASS_COLOURS = {"normal": (0, 90, 255), "sclerosed": (230, 30, 30)}
"""Blue normal, red sclerosed (overview and QuPath classification colours)."""
Z_95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval for a binomial proportion k/n (None, None when n == 0)."""
    if n <= 0:
        return None, None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# -- per-glomerulus table ---------------------------------------------------------------------
GLOMERULI_COLUMNS = [
    "id", "class", "class_probability", "p_normal", "p_sclerosed", "area_px", "area_um2",
    "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
    "equivalent_diameter_px", "equivalent_diameter_um",
    "verifier_p_not_glomerulus", "verifier_p_normal", "verifier_p_sclerosed",
]
"""The verifier's probabilities are empty when it did not run."""


def glomeruli_table(instances: list[Glomerulus], scale: float, analysis_mpp: float | None) -> pd.DataFrame:
    """One row per glomerulus. ``scale`` = level-0 pixels per analysis pixel. Pixel quantities
    (area_px, centroid, bbox, equivalent_diameter_px) are in level-0 pixels; µm quantities are
    empty when the slide's mpp is unknown."""
    rows = []
    for g in instances:
        area0 = g.area_px * scale * scale
        area_um2 = g.area_px * analysis_mpp**2 if analysis_mpp else None
        rows.append({
            "id": g.id,
            "class": g.class_name,
            "class_probability": round(g.probability, 4),
            "p_normal": round(g.mean_probabilities[0], 4),
            "p_sclerosed": round(g.mean_probabilities[1], 4),
            "area_px": int(round(area0)),  # a pixel count
            "area_um2": round(area_um2, 1) if area_um2 is not None else None,
            "centroid_x": round(g.centroid[0] * scale, 1),
            "centroid_y": round(g.centroid[1] * scale, 1),
            "bbox_x0": int(math.floor(g.bbox[0] * scale)),
            "bbox_y0": int(math.floor(g.bbox[1] * scale)),
            "bbox_x1": int(math.ceil(g.bbox[2] * scale)),
            "bbox_y1": int(math.ceil(g.bbox[3] * scale)),
            "equivalent_diameter_px": round(equivalent_diameter(area0), 1),
            "equivalent_diameter_um": round(equivalent_diameter(area_um2), 1) if area_um2 is not None else None,
            **dict(zip(("verifier_p_not_glomerulus", "verifier_p_normal", "verifier_p_sclerosed"),
                       (round(p, 4) for p in g.verifier_probabilities) if g.verifier_probabilities else (None,) * 3)),
        })
    return pd.DataFrame(rows, columns=GLOMERULI_COLUMNS)


def write_glomeruli_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, table.to_csv(index=False))


# -- QuPath GeoJSON ---------------------------------------------------------------------------
REJECTED_CLASS_NAME = "Not glomerulus"
REJECTED_COLOUR = (140, 140, 140)
"""QuPath classification of the candidates the verifier rejected (``rejected.geojson``); the
review page's false detections carry the same name."""
REJECTED_FILE = "rejected.geojson"
"""Per slide, when the verifier ran: the candidates it rejected, for the review page and QuPath."""


def glomeruli_geojson(instances: list[Glomerulus], table: pd.DataFrame, scale: float) -> dict:
    """FeatureCollection of QuPath detections: one polygon per glomerulus in level-0 pixels,
    classification name + colour, and the CSV's measurements. Candidates the verifier rejected
    (``rejected.geojson``) are classified "Not glomerulus", named "rejected candidate <id>" and
    carry ``glomscan.candidate_class``: the class a reviewer restores them to."""
    features = []
    measurement_columns = [c for c in GLOMERULI_COLUMNS if c not in ("id", "class")]
    for g, (_, row) in zip(instances, table.iterrows()):
        ring = [[round(x * scale, 2), round(y * scale, 2)] for x, y in g.contour]
        measurements = {c: float(row[c]) for c in measurement_columns if pd.notna(row[c])}
        if g.rejected:
            name, class_name, colour = f"rejected candidate {g.id}", REJECTED_CLASS_NAME, REJECTED_COLOUR
        else:
            name, class_name, colour = f"glomerulus {g.id}", QUPATH_CLASS_NAMES[g.class_name], CLASS_COLOURS[g.class_name]
        properties = {"isLocked": False, "measurements": {"glomscan id": g.id, **measurements}}
        if g.rejected:
            properties["glomscan"] = {"candidate_class": g.class_name, "rejected_by": "verifier"}
        features.append(polygon_feature([ring], class_name, object_type="detection", colour=colour, name=name,
                                        feature_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"glomscan/{g.id}/{ring[:1]}")),
                                        properties=properties))
    return feature_collection(features)


# -- label mask ------------------------------------------------------------------------------
PGM_SOURCE_LOADER = "ppmload_source"


class StreamedLabelFile:
    """Label rows streamed to a binary PGM file with plain writes (not mmap, so the pages do not
    count against the process). Untouched (all-background) rows stay holes in a sparse file.
    ``image()`` reads it back through a custom pyvips source: sequential reads, never mapped."""

    def __init__(self, path: Path, width: int, height: int):
        self.path = Path(path)
        self.width, self.height = width, height
        self._header = f"P5\n{width} {height}\n255\n".encode()
        with open(self.path, "wb") as f:
            f.write(self._header)
            f.truncate(len(self._header) + width * height)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._reader = None

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        if rows.shape[1] != self.width or y0 + rows.shape[0] > self.height:
            raise ValueError("rows do not fit the mask")
        nz = np.flatnonzero(rows.any(axis=1))
        if nz.size == 0:
            return
        first, last = int(nz[0]), int(nz[-1]) + 1
        offset = len(self._header) + (y0 + first) * self.width
        os.pwrite(self._fd, np.ascontiguousarray(rows[first:last]).tobytes(), offset)

    def relabel(self, bbox: tuple[int, int, int, int], contour: list[tuple[float, float]], value: int) -> None:
        """Paint the glomerulus with box ``bbox`` and outline ``contour`` (analysis pixels,
        pixel-edge coordinates) as ``value`` (0 erases it): the 8-connected component of labelled
        pixels in the box that the outline covers most. For the verifier's changes, after every
        row was written."""
        x0, y0, x1, y1 = bbox
        w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0 or len(contour) < 3:
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            offsets = [len(self._header) + y * self.width + x0 for y in range(y0, y1)]
            block = np.stack([np.frombuffer(os.pread(fd, w, o), np.uint8) for o in offsets]).copy()
            points = np.asarray(contour, np.float64)
            inside = polygon_mask(points[:, 1] - 0.5 - y0, points[:, 0] - 0.5 - x0, (h, w))
            components, _ = ndimage.label(block > 0, structure=np.ones((3, 3), bool))
            covered = components[inside & (components > 0)]
            if covered.size == 0:
                return
            block[components == np.bincount(covered).argmax()] = value
            for o, row in zip(offsets, block):
                os.pwrite(fd, row.tobytes(), o)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def image(self) -> pyvips.Image:
        """The labels as a sequential pyvips image (valid until ``close``). A libvips built
        without the PPM source loader (the pyvips-binary wheel) reads the file as raw pixels
        instead (mapped: same labels, more resident memory for very large masks)."""
        if not pyvips.type_find("VipsOperation", PGM_SOURCE_LOADER):
            return pyvips.Image.rawload(str(self.path), self.width, self.height, 1, offset=len(self._header))
        self._reader = open(self.path, "rb")
        source = pyvips.SourceCustom()
        source.on_read(self._reader.read)
        return pyvips.Image.new_from_source(source, "", access="sequential")


def write_mask_tiff(labels: pyvips.Image, path: Path, analysis_mpp: float | None) -> None:
    """Tiled pyramidal TIFF (deflate), top-level IFD pyramid, levels downsampled by 'mode' so
    labels are never averaged; resolution tags in pixels per cm when mpp is known."""
    labels = labels.copy(interpretation="b-w")
    kwargs = dict(tile=True, tile_width=256, tile_height=256, pyramid=True, compression="deflate",
                  region_shrink="mode", bigtiff=labels.width * labels.height > 2**31)
    if analysis_mpp:
        ppmm = 1000.0 / analysis_mpp
        kwargs.update(xres=ppmm, yres=ppmm, resunit="cm")
    # Encoded in memory (labels deflate to a few % of the pixels), then written by Python: libvips
    # 8.14's pyramidal tiffsave crashes the process (SIGSEGV) when the disk fills up mid-write,
    # where a Python write raises ENOSPC and the batch records it.
    atomic_write_bytes(path, labels.tiffsave_buffer(**kwargs))


# -- overview --------------------------------------------------------------------------------
THUMBNAIL_NAME = "thumbnail.png"
THUMBNAIL_MAX_SIDE = 440
"""Twice the size index.html shows it at (sharp on high-density screens)."""


def polygon_mask(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of a ``shape`` image whose centres lie inside the polygon (vertices at ``rows``,
    ``cols``; even-odd rule, the crossing test of PNPOLY), filled scanline by scanline: cost
    grows with rows x vertices plus pixels, where a point-in-polygon test per pixel of the
    bounding box grows with pixels x vertices (seconds for a slide-sized false detection)."""
    height, width = shape
    out = np.zeros((height, width), bool)
    r0, c0 = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    if r0.size < 3:
        return out
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    y_first, y_last = max(0, math.ceil(r0.min())), min(height - 1, math.floor(r0.max()))
    x_first, x_last = max(0, math.ceil(c0.min())), min(width, math.floor(c0.max()) + 1)
    if y_first > y_last or x_first >= x_last:
        return out
    flat = r1 == r0
    slope = np.where(flat, 0.0, (c1 - c0) / np.where(flat, 1.0, r1 - r0))
    for start in range(y_first, y_last + 1, 512):  # bounded memory for long contours
        ys = np.arange(start, min(start + 512, y_last + 1), dtype=np.float64)[:, None]
        crossing = (r0 > ys) != (r1 > ys)
        xs = np.sort(np.where(crossing, c0 + (ys - r0) * slope, np.inf), axis=1)
        begin, end = np.ceil(xs[:, 0::2]), np.ceil(xs[:, 1::2])  # inside: begin <= x < end
        row, pair = np.nonzero(np.isfinite(end))
        begin = np.clip(begin[row, pair], x_first, x_last).astype(np.int64) - x_first
        end = np.clip(end[row, pair], x_first, x_last).astype(np.int64) - x_first
        edges = np.zeros((ys.shape[0], x_last - x_first + 1), np.int32)
        np.add.at(edges, (row, begin), 1)
        np.add.at(edges, (row, end), -1)
        out[start:start + ys.shape[0], x_first:x_last] = np.cumsum(edges, axis=1)[:, :-1] > 0
    return out


def write_overview(thumbnail: np.ndarray, downsample: float, instances: list[Glomerulus], path: Path) -> None:
    """Thumbnail (uint8 RGB at ``downsample`` analysis px per pixel) with each glomerulus
    filled translucent and outlined in its class colour."""
    canvas = thumbnail.astype(np.float32).copy()
    h, w = canvas.shape[:2]
    for g in instances:
        if len(g.contour) < 3:
            continue
        pts = np.asarray(g.contour) / downsample
        colour = np.asarray(CLASS_COLOURS[g.class_name], np.float32)
        x0, y0 = max(int(pts[:, 0].min()) - 1, 0), max(int(pts[:, 1].min()) - 1, 0)
        x1, y1 = min(int(pts[:, 0].max()) + 2, w), min(int(pts[:, 1].max()) + 2, h)
        if x1 <= x0 or y1 <= y0:
            continue
        inside = polygon_mask(pts[:, 1] - y0, pts[:, 0] - x0, (y1 - y0, x1 - x0))
        if not inside.any():  # smaller than a thumbnail pixel: mark its centre
            inside[min(int(g.centroid[1] / downsample) - y0, inside.shape[0] - 1),
                   min(int(g.centroid[0] / downsample) - x0, inside.shape[1] - 1)] = True
        outline = inside & ~ndimage.binary_erosion(inside, iterations=2)
        box = canvas[y0:y1, x0:x1]
        box[inside] = 0.55 * box[inside] + 0.45 * colour
        box[outline] = colour
    image = pyvips.Image.new_from_array(np.ascontiguousarray(canvas.astype(np.uint8)), interpretation="srgb")
    atomic_write_bytes(path, image.pngsave_buffer(compression=1))  # level 6 took ~1.5 s per slide
    # what index.html shows, small so that a page of many slides loads fast (box + linear: 4x
    # faster than thumbnail_image's lanczos)
    small = image.resize(min(1.0, THUMBNAIL_MAX_SIDE / max(image.width, image.height)), kernel="linear")
    atomic_write_bytes(path.with_name(THUMBNAIL_NAME), small.pngsave_buffer(compression=6))
