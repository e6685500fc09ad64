"""Glomerulus instances from the streamed probability bands.

Instances are 8-connected components of the glomerulus mask (any class). Each gets the class
with the larger mean probability over its pixels; components smaller than the minimum area are
dropped. Bands are processed top to bottom: a component still touching the newest band's bottom
edge stays "pending" with the rows it occupies; every other one is finished, measured, painted
into the label rows with its class and forgotten. Memory holds one band plus pending rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

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


def glomerulus_class(mean_probabilities: tuple[float, ...] | np.ndarray) -> int:
    """The one decision rule for a glomerulus's class: the index of the class with the larger
    mean probability over the glomerulus's pixels (0 normal, 1 sclerosed; a tie is normal).
    ``analyze``, ``evaluate`` and training validation all classify through this function."""
    return int(np.argmax(np.asarray(mean_probabilities, dtype=np.float64)))


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


class InstanceStream:
    def __init__(self, width: int, class_names: tuple[str, ...], min_area_px: float,
                 row_sink: RowSink | None = None, max_pending_rows: int = 8192):
        self.width = width
        self.class_names = class_names
        self.min_area_px = min_area_px
        self.row_sink = row_sink
        self.max_pending_rows = max_pending_rows
        self.instances: list[Glomerulus] = []
        self.dropped_small = 0
        self.forced_closures = 0
        c = len(class_names)
        self._y0 = 0
        self._fg = np.zeros((0, width), bool)
        self._probs = np.zeros((c, 0, width), np.uint8)
        self._paint = np.zeros((0, width), np.uint8)

    def push(self, band: Band) -> None:
        if band.y0 != self._y0 + self._fg.shape[0]:
            raise ValueError(f"bands must be contiguous: expected y0={self._y0 + self._fg.shape[0]}, got {band.y0}")
        if band.empty:  # nothing can continue through it: close what is pending, skip its rows
            self._resolve(final=True)
            self._y0 += band.height
            return
        self._fg = np.concatenate([self._fg, band.foreground], axis=0)
        self._probs = np.concatenate([self._probs, band.probabilities], axis=1)
        self._paint = np.concatenate([self._paint, np.zeros_like(band.foreground, np.uint8)], axis=0)
        self._resolve(final=False)

    def finish(self) -> list[Glomerulus]:
        self._resolve(final=True)
        return self.instances

    def _resolve(self, final: bool) -> None:
        fg = self._fg
        height = fg.shape[0]
        if height == 0:
            return
        labels, n = ndimage.label(fg, structure=EIGHT_CONNECTED)
        open_ids = set() if final else set(np.unique(labels[-1]).tolist()) - {0}
        slices = ndimage.find_objects(labels)
        cut = height
        for idx, sl in enumerate(slices, start=1):
            if sl is None:
                continue
            if idx in open_ids:
                cut = min(cut, sl[0].start)
                continue
            component = labels[sl] == idx
            self._finish_component(sl, component)
            fg[sl][component] = False
        if not final and height - cut > self.max_pending_rows:
            # A component taller than any glomerulus: close everything rather than grow.
            self.forced_closures += 1
            log.warning("a glomerulus-mask component spans more than %d rows; closing it early",
                        self.max_pending_rows)
            self._resolve(final=True)
            return
        if self.row_sink is not None and cut > 0:
            self.row_sink(self._y0, self._paint[:cut])
        self._y0 += cut
        self._fg = self._fg[cut:].copy()
        self._probs = self._probs[:, cut:].copy()
        self._paint = self._paint[cut:].copy()

    def _finish_component(self, sl: tuple[slice, slice], component: np.ndarray) -> None:
        area = int(component.sum())
        if area < self.min_area_px:
            self.dropped_small += 1
            return
        means = tuple(float(self._probs[c][sl][component].mean()) / 255.0 for c in range(self._probs.shape[0]))
        cls = glomerulus_class(means)
        self._paint[sl][component] = cls + 1
        ys, xs = np.nonzero(component)
        y_off, x_off = self._y0 + sl[0].start, sl[1].start
        self.instances.append(
            Glomerulus(
                id=len(self.instances) + 1,
                label=cls + 1,
                class_name=self.class_names[cls],
                probability=means[cls],
                mean_probabilities=means,
                area_px=area,
                centroid=(float(xs.mean() + x_off + 0.5), float(ys.mean() + y_off + 0.5)),
                bbox=(x_off, y_off, x_off + component.shape[1], y_off + component.shape[0]),
                contour=outer_contour(component, x_off, y_off),
            )
        )


def outer_contour(component: np.ndarray, x_off: int, y_off: int, tolerance: float = 0.75) -> list[tuple[float, float]]:
    """Outer boundary of a binary component as a closed (x, y) polygon, offset into the image.

    find_contours traces the 0.5 level between pixel centres; +0.5 moves the result into
    pixel-edge coordinates (pixel i covers [i, i+1)), so the polygon hugs the pixels.
    """
    padded = np.pad(component.astype(np.uint8), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return []
    outer = max(contours, key=len)
    outer = approximate_polygon(outer, tolerance=tolerance)
    points = [(float(c - 1 + x_off + 0.5), float(r - 1 + y_off + 0.5)) for r, c in outer]
    if points and points[0] != points[-1]:
        points.append(points[0])
    return points
