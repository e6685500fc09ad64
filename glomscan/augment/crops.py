"""Crops of sclerosed glomeruli for the inpainting model (issue #5, step 1).

For every sclerosed glomerulus (8-connected component of label 2) in a prepared dataset's
training patches: its minimum enclosing circle, and a size x size crop centred on the circle's
centre, shifted (clamped) to lie inside the patch. Folder format (read by ``train inpaint`` /
``evaluate inpaint``)::

    CROPS/images/<crop_id>.png   RGB uint8, size x size
    CROPS/masks/<crop_id>.png    uint8 0/255: this glomerulus only
    CROPS/manifest.csv           crop_id, split, source, x0, y0, cx, cy, radius, mask_px, ...

Decisions:
- Patches overlap (stride < tile), so one glomerulus appears in several patches. Only whole
  instances are used (a component touching the patch border is cut there); the whole
  instances of one slide are merged when their centres (in slide analysis pixels) lie within
  ``max(2, 0.1 * radius)`` px, keeping the instance farthest from its patch border (its crop
  needs the least clamping). A glomerulus seen only cut in every patch is not cropped; it is
  counted (``cut_only``) and still counts as a real sclerosed glomerulus.
- Other glomeruli (normal or sclerosed) inside a crop stay in the image as context; the mask
  holds only the crop's own glomerulus (their pixels are counted in ``other_glomeruli_px``).
- A glomerulus whose enclosing circle is wider than the crop is not cropped (its mask would
  be cut by the crop border); it is counted (``too_large``).
- Train/test split (default 8:2) is by glomerulus, deterministic for a seed.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import ConvexHull

from ..imaging import read_png, write_png
from ..labels import SCLEROSED
from ..train.dataset.data import load_patch, synthetic_rows
from .settings import CropSettings

log = logging.getLogger(__name__)

CROP_COLUMNS = ["crop_id", "split", "source", "x0", "y0", "cx", "cy", "radius", "mask_px",
                "slide", "slide_cx", "slide_cy", "other_glomeruli_px"]
"""x0, y0: crop origin in the source patch; cx, cy, radius: minimum enclosing circle in source
patch pixels (pixel i spans [i, i+1)); slide_cx, slide_cy: the centre in slide analysis pixels."""

EIGHT_CONNECTED = np.ones((3, 3), bool)


# --- minimum enclosing circle -------------------------------------------------------------------

def _circle_two(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    c = (a + b) / 2
    return float(c[0]), float(c[1]), float(np.hypot(*(a - c)))


def _circle_three(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[float, float, float]:
    """Circumcircle; for (nearly) collinear points the circle on the farthest pair."""
    bx, by = b - a
    cx, cy = c - a
    d = 2 * (bx * cy - by * cx)
    scale = max(bx * bx + by * by, cx * cx + cy * cy, 1e-300)
    if abs(d) < 1e-12 * scale:
        pairs = [(a, b), (a, c), (b, c)]
        return max((_circle_two(p, q) for p, q in pairs), key=lambda t: t[2])
    ux = (cy * (bx * bx + by * by) - by * (cx * cx + cy * cy)) / d
    uy = (bx * (cx * cx + cy * cy) - cx * (bx * bx + by * by)) / d
    return float(a[0] + ux), float(a[1] + uy), float(math.hypot(ux, uy))


def _inside(circle, p, eps: float) -> bool:
    return math.hypot(p[0] - circle[0], p[1] - circle[1]) <= circle[2] + eps


def minimum_enclosing_circle(points: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Smallest circle (cx, cy, r) containing all (x, y) points: Welzl's randomised incremental
    algorithm (expected linear time) on the points' convex hull."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) == 0:
        raise ValueError("no points")
    pts = np.unique(pts, axis=0)
    if len(pts) >= 3:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # all collinear: Qhull refuses; every point stays a candidate
            pass
    if len(pts) == 1:
        return float(pts[0, 0]), float(pts[0, 1]), 0.0
    order = list(range(len(pts)))
    random.Random(seed).shuffle(order)
    p = pts[order]
    eps = 1e-9 * max(1.0, float(np.abs(p).max()))
    circle = (float(p[0, 0]), float(p[0, 1]), 0.0)
    for i in range(1, len(p)):
        if _inside(circle, p[i], eps):
            continue
        circle = (float(p[i, 0]), float(p[i, 1]), 0.0)
        for j in range(i):
            if _inside(circle, p[j], eps):
                continue
            circle = _circle_two(p[i], p[j])
            for k in range(j):
                if not _inside(circle, p[k], eps):
                    circle = _circle_three(p[i], p[j], p[k])
    return circle


def component_circle(component: np.ndarray) -> tuple[float, float, float]:
    """Minimum enclosing circle of a binary component's pixel squares (pixel (row i, col j)
    spans [j, j+1) x [i, i+1)): the circle through the corners of its outermost pixels."""
    rows, cols = np.nonzero(component)
    if rows.size == 0:
        raise ValueError("empty component")
    # corners of the pixels; interior corners never lie on the hull, so take the boundary only
    boundary = component & ~ndimage.binary_erosion(component, EIGHT_CONNECTED, border_value=0)
    rows, cols = np.nonzero(boundary)
    corners = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return minimum_enclosing_circle(corners)


def crop_origin(cx: float, cy: float, size: int, width: int, height: int) -> tuple[int, int]:
    """Top-left of the size x size window centred on (cx, cy), shifted to lie inside a
    width x height image."""
    if size > width or size > height:
        raise ValueError(f"crop size {size} is larger than the image ({width} x {height})")
    x0 = int(round(cx - size / 2))
    y0 = int(round(cy - size / 2))
    return min(max(x0, 0), width - size), min(max(y0, 0), height - size)


# --- sclerosed glomeruli of a dataset, deduplicated ---------------------------------------------

@dataclass
class GlomerulusInstance:
    """A whole sclerosed glomerulus as seen in one patch."""
    slide: str
    patch_id: str
    patch_x: int
    patch_y: int
    """Patch origin in slide analysis pixels."""
    bbox: tuple[int, int, int, int]
    """(row0, col0, row1, col1) in the patch, end exclusive."""
    cx: float
    cy: float
    radius: float
    area_px: int
    border_distance: float
    """Distance of the circle centre to the nearest patch border (px)."""
    pixel: tuple[int, int]
    """(row, col) of one of its pixels in the patch."""
    group: str = ""
    """Instances of one group at the same place are one glomerulus: the slide for patches cut
    from a slide; the patch itself for tiles and composites (``prepare``'s kinds "tile" and
    "composite", which all lie at the origin of their group: their glomeruli are all distinct)."""

    @property
    def slide_centre(self) -> tuple[float, float]:
        return self.patch_x + self.cx, self.patch_y + self.cy


@dataclass
class GlomerulusCensus:
    glomeruli: list[GlomerulusInstance] = field(default_factory=list)
    """One whole instance per glomerulus."""
    cut_only: int = 0
    """Glomeruli touching the patch border in every patch they appear in."""
    instances: int = 0
    """Components of label 2 seen in all patches (before deduplication)."""
    patches: int = 0

    @property
    def total(self) -> int:
        """Real sclerosed glomeruli (whole or not)."""
        return len(self.glomeruli) + self.cut_only


def sclerosed_components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of label SCLEROSED: (component labels, count)."""
    return ndimage.label(labels == SCLEROSED, structure=EIGHT_CONNECTED)


def training_rows(manifest: pd.DataFrame, split: str = "train") -> pd.DataFrame:
    """Real (non-synthetic) patches of a split ("all": every split)."""
    rows = manifest if split == "all" else manifest[manifest.split == split]
    return rows[~synthetic_rows(rows)]


def sclerosed_census(dataset_dir: Path, manifest: pd.DataFrame, split: str = "train") -> GlomerulusCensus:
    """Every sclerosed glomerulus of the split's real patches, each once (see module doc)."""
    census = GlomerulusCensus()
    whole: list[GlomerulusInstance] = []
    cut: list[tuple[str, tuple[int, int, int, int]]] = []  # slide, bbox in slide px (x0, y0, x1, y1)
    for _, row in training_rows(manifest, split).iterrows():
        census.patches += 1
        if "n_sclerosed_px" in row and row.n_sclerosed_px == 0:
            continue
        labels = load_patch(dataset_dir, row)[1]
        comps, n = sclerosed_components(labels)
        h, w = labels.shape
        for index, sl in enumerate(ndimage.find_objects(comps), start=1):
            census.instances += 1
            r0, r1, c0, c1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            group = str(row.slide) if str(row.get("kind", "slide")) in ("slide", "nan") else f"{row.slide}/{row.patch_id}"
            if r0 == 0 or c0 == 0 or r1 == h or c1 == w:
                cut.append((group, (row.x + c0, row.y + r0, row.x + c1, row.y + r1)))
                continue
            component = comps[sl] == index
            cx, cy, radius = component_circle(component)
            cx, cy = cx + c0, cy + r0
            rr, cc = np.nonzero(component)
            whole.append(GlomerulusInstance(str(row.slide), str(row.patch_id), int(row.x), int(row.y),
                                            (r0, c0, r1, c1), cx, cy, radius, int(component.sum()),
                                            min(cx, cy, w - cx, h - cy), (int(r0 + rr[0]), int(c0 + cc[0])), group))
    whole.sort(key=lambda g: (g.slide, -g.border_distance, g.patch_id))
    for g in whole:
        sx, sy = g.slide_centre
        if not any(k.group == g.group and math.hypot(sx - k.slide_centre[0], sy - k.slide_centre[1])
                   <= max(2.0, 0.1 * k.radius) for k in census.glomeruli):
            census.glomeruli.append(g)
    # cut instances not belonging to a kept whole glomerulus, grouped by overlapping boxes
    groups: list[tuple[str, list[int]]] = []
    for slide, (x0, y0, x1, y1) in cut:
        xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
        covered = any(k.group == slide and k.slide_centre[0] - k.radius <= xc <= k.slide_centre[0] + k.radius
                      and k.slide_centre[1] - k.radius <= yc <= k.slide_centre[1] + k.radius for k in census.glomeruli)
        if covered:
            continue
        for gslide, box in groups:
            if gslide == slide and x0 < box[2] and box[0] < x1 and y0 < box[3] and box[1] < y1:
                box[:] = [min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)]
                break
        else:
            groups.append((slide, [x0, y0, x1, y1]))
    census.cut_only = len(groups)
    return census


# --- the crops command ---------------------------------------------------------------------------

@dataclass
class CropSummary:
    manifest: pd.DataFrame
    census: GlomerulusCensus
    too_large: int


def split_crops(n: int, test_fraction: float, seed: int) -> list[str]:
    """"train"/"test" for n crops: round(fraction * n) test crops (at least one when n >= 2)."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
    n_test = max(1, round(test_fraction * n)) if n >= 2 and test_fraction > 0 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    split = ["train"] * n
    for i in order[:n_test]:
        split[i] = "test"
    return split


def make_crops(dataset_dir: Path, out_dir: Path, settings: CropSettings = CropSettings()) -> CropSummary:
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    manifest_path = dataset_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise ValueError(f"{dataset_dir}: no manifest.csv (make the dataset with 'glomscan prepare')")
    manifest = pd.read_csv(manifest_path, dtype={"patch_id": str, "slide": str})
    census = sclerosed_census(dataset_dir, manifest, settings.split)
    if census.total == 0:
        raise ValueError(f"{dataset_dir}: no sclerosed glomeruli in the {settings.split!r} patches "
                         f"({census.patches} patches)")
    fitting = [g for g in census.glomeruli if 2 * g.radius <= settings.size]
    too_large = len(census.glomeruli) - len(fitting)
    if not fitting:
        raise ValueError(f"{dataset_dir}: none of the {census.total} sclerosed glomeruli can be cropped "
                         f"({too_large} wider than {settings.size} px, {census.cut_only} cut by the patch border "
                         f"in every patch)")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    rows_by_id = {str(r.patch_id): r for _, r in manifest.iterrows()}
    splits = split_crops(len(fitting), settings.test_fraction, settings.seed)
    ids, used = [], set()
    for g in fitting:
        sx, sy = g.slide_centre
        crop_id = f"{g.slide}_x{int(sx)}_y{int(sy)}"
        while crop_id in used:
            crop_id += "b"
        used.add(crop_id)
        ids.append(crop_id)
    by_patch: dict[str, list[int]] = {}
    for i, g in enumerate(fitting):
        by_patch.setdefault(g.patch_id, []).append(i)
    rows: list[dict] = [{}] * len(fitting)
    side = settings.size
    for patch_id, indices in by_patch.items():  # each patch read and labelled once
        image, labels = load_patch(dataset_dir, rows_by_id[patch_id])
        h, w = labels.shape
        comps, _ = sclerosed_components(labels)
        for i in indices:
            g, crop_id = fitting[i], ids[i]
            x0, y0 = crop_origin(g.cx, g.cy, side, w, h)
            mask = comps[y0:y0 + side, x0:x0 + side] == comps[g.pixel]
            write_png(out_dir / "images" / f"{crop_id}.png", image[y0:y0 + side, x0:x0 + side])
            write_png(out_dir / "masks" / f"{crop_id}.png", mask.astype(np.uint8) * 255)
            other = (labels[y0:y0 + side, x0:x0 + side] > 0) & ~mask
            sx, sy = g.slide_centre
            rows[i] = {"crop_id": crop_id, "split": splits[i], "source": g.patch_id, "x0": x0, "y0": y0,
                       "cx": round(g.cx, 3), "cy": round(g.cy, 3), "radius": round(g.radius, 3),
                       "mask_px": int(mask.sum()), "slide": g.slide, "slide_cx": round(sx, 3),
                       "slide_cy": round(sy, 3), "other_glomeruli_px": int(other.sum())}
    out = pd.DataFrame(rows, columns=CROP_COLUMNS)
    out.to_csv(out_dir / "manifest.csv", index=False)
    if too_large or census.cut_only:
        log.warning("%d sclerosed glomeruli not cropped: %d wider than %d px, %d cut by the patch border in every patch",
                    too_large + census.cut_only, too_large, settings.size, census.cut_only)
    return CropSummary(out, census, too_large)


def crop_ids(crops_dir: Path, split: str | None = "train") -> list[str]:
    """The ids of the crops in ``split`` ("train", "test", or None for all), in manifest order."""
    manifest_path = Path(crops_dir) / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{crops_dir}: no manifest.csv (make it with 'glomscan augment crops')")
    manifest = pd.read_csv(manifest_path, dtype={"crop_id": str})
    return list(manifest.crop_id if split is None else manifest[manifest.split == split].crop_id)


def read_crops(crops_dir: Path, split: str | None = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    """(image uint8 HxWx3, mask bool HxW) of every crop in ``split`` ("train", "test", or None
    for all), in manifest order (:func:`crop_ids`)."""
    crops_dir = Path(crops_dir)
    return [(np.array(read_png(crops_dir / "images" / f"{crop_id}.png")[..., :3]),
             read_png(crops_dir / "masks" / f"{crop_id}.png")[..., 0] > 127)
            for crop_id in crop_ids(crops_dir, split)]
