"""Glomerulus instances from the streamed probability bands.

Instances are 8-connected components of the glomerulus mask (any class). Each gets the class
with the larger mean probability over its pixels; components smaller than the minimum area are
dropped. Bands are processed top to bottom: a component still touching the newest band's bottom
edge stays "pending" with the rows it occupies; every other one is finished, measured, painted
into the label rows with its class and forgotten. Memory holds one band plus pending rows.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours

from .merge import Band

log = logging.getLogger(__name__)

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class Glomerulus:
    """One glomerulus at analysis resolution (pixel coordinates of the analysis image)."""

    id: int
    label: int
    """Mask value: 1 + index of its class."""
    class_name: str
    probability: float
    """Mean probability of the assigned class over the glomerulus."""
    mean_probabilities: tuple[float, ...]
    area_px: int
    centroid: tuple[float, float]
    """(x, y) of the pixel centroid, pixel-centre convention (pixel i spans [i, i+1))."""
    bbox: tuple[int, int, int, int]
    """(x0, y0, x1, y1), exclusive end."""
    contour: list[tuple[float, float]] = field(repr=False)
    """Closed outer boundary polygon (x, y), pixel-edge coordinates."""
    verifier_probabilities: tuple[float, float, float] | None = None
    """The candidate verifier's (not glomerulus, normal, sclerosed), when it ran."""
    rejected: bool = False
    """The verifier judged it not a glomerulus: counted nowhere, shown as rejected for review."""


REJECTED = -1
"""``glomerulus_class`` of a candidate the verifier judged not a glomerulus."""


def glomerulus_class(mean_probabilities: tuple[float, ...] | np.ndarray,
                     verifier_probabilities: tuple[float, ...] | np.ndarray | None = None,
                     min_glomerulus_probability: float = 0.5, verifier_grading_weight: float = 1.0) -> int:
    """The one decision rule for a glomerulus's class: 0 normal, 1 sclerosed, or ``REJECTED``.

    Without a verifier: the index of the class with the larger mean probability over the
    glomerulus's pixels (a tie is normal). With the verifier's (not glomerulus, normal,
    sclerosed) probabilities: rejected when p_normal + p_sclerosed < ``min_glomerulus_probability``;
    otherwise sclerosed when the weighted mean of the two models' sclerosed shares (the
    verifier's p_sclerosed / (p_normal + p_sclerosed) with ``verifier_grading_weight``, the
    segmentation's mean sclerosed / (normal + sclerosed) with the rest) exceeds one half.
    ``analyze``, ``evaluate`` and training validation all classify through this function."""
    means = np.asarray(mean_probabilities, dtype=np.float64)
    if verifier_probabilities is None:
        return int(np.argmax(means))
    v = np.asarray(verifier_probabilities, dtype=np.float64)
    p_glomerulus = v[1] + v[2]
    if p_glomerulus < min_glomerulus_probability:
        return REJECTED
    verifier_share = v[2] / p_glomerulus if p_glomerulus > 0 else 0.0
    segmentation_share = means[1] / means.sum() if means.sum() > 0 else 0.0
    share = verifier_grading_weight * verifier_share + (1 - verifier_grading_weight) * segmentation_share
    return int(share > 0.5)


def glomeruli_in_image(probabilities: np.ndarray, class_names: tuple[str, ...], min_area_px: float,
                       foreground_threshold: float = 0.5) -> tuple[list["Glomerulus"], np.ndarray]:
    """Glomeruli and their class-painted label image (0 background, 1 + class) of one
    probability map (C, H, W) in [0, 1], by the same streaming code ``analyze`` runs."""
    c, h, w = probabilities.shape
    quantised = np.clip(np.rint(probabilities * 255), 0, 255).astype(np.uint8)
    foreground = probabilities.max(axis=0) >= foreground_threshold
    labels = np.zeros((h, w), np.uint8)

    def sink(y0: int, rows: np.ndarray) -> None:
        labels[y0:y0 + rows.shape[0]] = rows

    stream = InstanceStream(w, class_names, min_area_px, row_sink=sink)
    stream.push(Band(0, h, quantised, foreground))
    return stream.finish(), labels


RowSink = Callable[[int, np.ndarray], None]
"""Receives (y0, uint8 label rows of full width) in increasing y order."""

MIN_PIECE_ROWS = 64
"""With workers, a band is labelled in horizontal pieces of at least this many rows."""


@dataclass
class _Chunk:
    """Pending rows [y0, y0 + height) as pushed: provisional component ids (int32, 0 background),
    quantised probabilities (C, h, W) and the label values painted so far."""

    y0: int
    ids: np.ndarray
    probabilities: np.ndarray
    paint: np.ndarray

    @property
    def height(self) -> int:
        return self.ids.shape[0]


@dataclass
class _Component:
    """A component still being streamed: bounding box (absolute rows) and its provisional ids."""

    y0: int
    y1: int
    x0: int
    x1: int
    members: list[int]


class InstanceStream:
    """Glomeruli from bands pushed top to bottom.

    Each band is labelled on its own (8-connected) and its components are joined to those of
    the rows above through the one pair of touching rows (union-find over provisional ids), so
    a band costs the same however tall the components that cross it. A component is finished
    when no pixel of it lies in the newest band's last row. Provisional ids are handed out in
    raster order (scipy numbers components by their first pixel), and the smallest id of a
    component stays its name, so components finished together are measured in the order of
    their first pixel: the order, ids and masks of labelling all pending rows at once.

    With a thread pool (``workers`` > 1) a band is labelled in horizontal pieces and finished
    components are measured on the pool at the same time; the results do not depend on it.
    """

    def __init__(self, width: int, class_names: tuple[str, ...], min_area_px: float,
                 row_sink: RowSink | None = None, max_pending_rows: int = 8192,
                 pool: Executor | None = None, workers: int = 1):
        self.width = width
        self.class_names = class_names
        self.min_area_px = min_area_px
        self.row_sink = row_sink
        self.max_pending_rows = max_pending_rows
        self.pool = pool if workers > 1 else None
        self.workers = workers if self.pool is not None else 1
        self.instances: list[Glomerulus] = []
        self.dropped_small = 0
        self.forced_closures = 0
        self._y0 = 0  # first pending row
        self._chunks: list[_Chunk] = []
        self._next_id = 1
        self._parent: dict[int, int] = {}
        self._live: dict[int, _Component] = {}  # root id -> component

    @property
    def _height(self) -> int:
        return sum(c.height for c in self._chunks)

    def push(self, band: Band) -> None:
        if band.y0 != self._y0 + self._height:
            raise ValueError(f"bands must be contiguous: expected y0={self._y0 + self._height}, got {band.y0}")
        if band.empty:  # nothing can continue through it: close what is pending, skip its rows
            self._resolve(final=True)
            self._y0 += band.height
            return
        ids, pieces = self._label(band.foreground, band.y0)
        above = self._chunks[-1].ids[-1] if self._chunks else None
        self._chunks.append(_Chunk(band.y0, ids, band.probabilities, np.zeros(ids.shape, np.uint8)))
        if above is not None:
            self._join(above, ids[0])
        for start in pieces[1:]:
            self._join(ids[start - 1], ids[start])
        self._resolve(final=False)

    def finish(self) -> list[Glomerulus]:
        self._resolve(final=True)
        return self.instances

    def _map(self, work, items: list) -> list:
        if self.pool is None or len(items) < 2:
            return [work(item) for item in items]
        return list(self.pool.map(work, items))

    def _label(self, foreground: np.ndarray, y0: int) -> tuple[np.ndarray, list[int]]:
        """Provisional ids of one band (raster order, continuing the running count) and the
        first rows of the pieces it was labelled in; registers every component as live."""
        h = foreground.shape[0]
        n_pieces = max(1, min(self.workers, h // MIN_PIECE_ROWS))
        starts = [h * i // n_pieces for i in range(n_pieces)]
        ends = starts[1:] + [h]
        ids = np.empty(foreground.shape, np.int32)

        def label(i: int):
            piece = ids[starts[i]:ends[i]]
            n = ndimage.label(foreground[starts[i]:ends[i]], structure=EIGHT_CONNECTED, output=piece)
            return n, ndimage.find_objects(piece, max_label=n)

        found = self._map(label, list(range(n_pieces)))
        bases = []
        for i, (n, objects) in enumerate(found):
            base = self._next_id - 1
            bases.append(base)
            for j, sl in enumerate(objects, start=1):
                self._parent[base + j] = base + j
                self._live[base + j] = _Component(y0 + starts[i] + sl[0].start, y0 + starts[i] + sl[0].stop,
                                                  sl[1].start, sl[1].stop, [base + j])
            self._next_id += n

        def offset(i: int) -> None:
            if bases[i]:
                piece = ids[starts[i]:ends[i]]
                np.add(piece, bases[i], out=piece, where=piece > 0)

        self._map(offset, list(range(n_pieces)))
        return ids, starts

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def _join(self, upper: np.ndarray, lower: np.ndarray) -> None:
        """Union the components of two vertically adjacent rows that touch (8-connected)."""
        w = upper.shape[0]
        pairs = []
        for d in (-1, 0, 1):  # upper x with lower x + d
            a = upper[max(0, -d):w - max(0, d)]
            b = lower[max(0, d):w - max(0, -d)]
            both = (a > 0) & (b > 0)
            if both.any():
                pairs.append(np.stack([a[both], b[both]], axis=1))
        if not pairs:
            return
        for i, j in np.unique(np.concatenate(pairs), axis=0).tolist():
            ri, rj = self._find(i), self._find(j)
            if ri == rj:
                continue
            if rj < ri:
                ri, rj = rj, ri
            self._parent[rj] = ri  # the smaller id (the earlier first pixel) names the component
            keep, gone = self._live[ri], self._live.pop(rj)
            keep.y0, keep.y1 = min(keep.y0, gone.y0), max(keep.y1, gone.y1)
            keep.x0, keep.x1 = min(keep.x0, gone.x0), max(keep.x1, gone.x1)
            keep.members += gone.members

    def _resolve(self, final: bool) -> None:
        height = self._height
        if height == 0:
            return
        if final:
            open_roots: set[int] = set()
        else:
            last = self._chunks[-1].ids[-1]
            open_roots = {self._find(i) for i in np.unique(last[last > 0]).tolist()}
        self._finish_components(sorted(r for r in self._live if r not in open_roots))
        cut = min((self._live[r].y0 for r in open_roots), default=self._y0 + height) - self._y0
        if not final and height - cut > self.max_pending_rows:
            # A component taller than any glomerulus: close everything rather than grow.
            self.forced_closures += 1
            log.warning("a glomerulus-mask component spans more than %d rows; closing it early",
                        self.max_pending_rows)
            self._resolve(final=True)
            return
        if self.row_sink is not None and cut > 0:
            self.row_sink(self._y0, self._rows("paint", self._y0, self._y0 + cut, 0, self.width))
        self._drop_rows(self._y0 + cut)

    def _rows(self, name: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pending rows [y0, y1) and columns [x0, x1) of one array of the chunks (a view when
        they lie in one chunk)."""
        parts = []
        for chunk in self._chunks:
            a, b = max(y0, chunk.y0), min(y1, chunk.y0 + chunk.height)
            if a < b:
                parts.append(getattr(chunk, name)[..., a - chunk.y0:b - chunk.y0, x0:x1])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-2)

    def _drop_rows(self, y: int) -> None:
        """Forget the pending rows above ``y``."""
        kept = []
        for chunk in self._chunks:
            if chunk.y0 + chunk.height <= y:
                continue
            if chunk.y0 < y:
                k = y - chunk.y0
                chunk = _Chunk(y, chunk.ids[k:], chunk.probabilities[:, k:], chunk.paint[k:])
            kept.append(chunk)
        self._chunks = kept
        self._y0 = y
        if not kept:  # nothing pending refers to an id any more: start counting again
            self._next_id = 1
            self._parent.clear()

    def _finish_components(self, roots: list[int]) -> None:
        """Measure, keep (or drop) and paint the finished components, in the given order."""
        components = [self._live.pop(r) for r in roots]
        for c in components:
            for m in c.members:
                del self._parent[m]
        for c, measured in zip(components, self._map(self._measure, components)):
            if measured is None:
                self.dropped_small += 1
                continue
            mask, area, means, cls, centroid, contour = measured
            for chunk in self._chunks:  # paint the component's rows in every chunk it spans
                a, b = max(c.y0, chunk.y0), min(c.y1, chunk.y0 + chunk.height)
                if a < b:
                    chunk.paint[a - chunk.y0:b - chunk.y0, c.x0:c.x1][mask[a - c.y0:b - c.y0]] = cls + 1
            self.instances.append(
                Glomerulus(
                    id=len(self.instances) + 1,
                    label=cls + 1,
                    class_name=self.class_names[cls],
                    probability=means[cls],
                    mean_probabilities=means,
                    area_px=area,
                    centroid=centroid,
                    bbox=(c.x0, c.y0, c.x1, c.y1),
                    contour=contour,
                )
            )

    def _measure(self, c: _Component):
        """(mask, area, class means, class, centroid, contour) of a finished component, or None
        when it is smaller than the minimum area."""
        ids = self._rows("ids", c.y0, c.y1, c.x0, c.x1)
        mask = ids == c.members[0] if len(c.members) == 1 else np.isin(ids, c.members)
        area = int(mask.sum())
        if area < self.min_area_px:
            return None
        probabilities = self._rows("probabilities", c.y0, c.y1, c.x0, c.x1)
        means = tuple(float(probabilities[k][mask].mean()) / 255.0 for k in range(probabilities.shape[0]))
        # pixel-centre means from exact integer sums (what mean() of the nonzero() coordinates gives)
        mean_x = np.float64(int(mask.sum(axis=0) @ np.arange(mask.shape[1]))) / area
        mean_y = np.float64(int(mask.sum(axis=1) @ np.arange(mask.shape[0]))) / area
        centroid = (float(mean_x + c.x0 + 0.5), float(mean_y + c.y0 + 0.5))
        return mask, area, means, glomerulus_class(means), centroid, outer_contour(mask, c.x0, c.y0)


def outer_contour(component: np.ndarray, x_off: int, y_off: int, tolerance: float = 0.75) -> list[tuple[float, float]]:
    """Outer boundary of a binary component as a closed (x, y) polygon, offset into the image.

    find_contours traces the 0.5 level between pixel centres; +0.5 moves the result into
    pixel-edge coordinates (pixel i covers [i, i+1)), so the polygon hugs the pixels.
    """
    padded = np.pad(component.astype(np.uint8), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return []
    outer = simplify_polyline(max(contours, key=len), tolerance)
    points = [(float(c - 1 + x_off + 0.5), float(r - 1 + y_off + 0.5)) for r, c in outer]
    if points and points[0] != points[-1]:
        points.append(points[0])
    return points


def simplify_polyline(coords: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker: the same vertices as ``skimage.measure.approximate_polygon`` (the
    same distances, the first farthest point splits a segment), but every segment of the chain
    is split at once, level by level, in whole-array operations: a few passes over the points
    instead of a dozen small array operations per kept vertex (measuring glomeruli spent most of
    its time there)."""
    coords = np.asarray(coords, np.float64)
    n = coords.shape[0]
    if tolerance <= 0 or n < 3:
        return coords
    keep = np.zeros(n, bool)
    keep[0] = keep[-1] = True
    open_segments = True
    while open_segments:
        starts = np.flatnonzero(keep)
        segment = np.cumsum(keep) - 1  # the segment each point starts or lies inside
        index = np.flatnonzero(~keep)
        if index.size == 0:
            break
        seg = segment[index]
        a, b = starts[seg], starts[seg + 1]
        r0, c0, r1, c1 = coords[a, 0], coords[a, 1], coords[b, 0], coords[b, 1]
        dr, dc = r1 - r0, c1 - c0
        angle = -np.arctan2(dr, dc)
        offset = c0 * np.sin(angle) + r0 * np.cos(angle)
        r, c = coords[index, 0], coords[index, 1]
        dr0, dc0, dr1, dc1 = r - r0, c - c0, r - r1, c - c1
        perpendicular = ((dr0 * dr + dc0 * dc) > 0) & ((-dr1 * dr - dc1 * dc) > 0)
        distance = np.where(perpendicular, np.abs(r * np.cos(angle) + c * np.sin(angle) - offset),
                            np.minimum(np.sqrt(dc0 ** 2 + dr0 ** 2), np.sqrt(dc1 ** 2 + dr1 ** 2)))
        # the farthest point of each segment (the first of equals), where it is beyond tolerance
        first = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
        points_per_segment = np.diff(np.r_[first, index.size])
        farthest = np.maximum.reduceat(distance, first)
        split = farthest > tolerance
        open_segments = bool(split.any())
        if open_segments:
            is_max = distance == np.repeat(farthest, points_per_segment)
            candidates = np.flatnonzero(is_max & np.repeat(split, points_per_segment))
            _, pick = np.unique(seg[candidates], return_index=True)
            keep[index[candidates[pick]]] = True
    return coords[keep]
