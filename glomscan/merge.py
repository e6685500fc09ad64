"""Weighted blending of overlapping tile predictions into a bounded-memory canvas.

The canvas is split into cells of stride x stride pixels. A tile covers (tile/stride)^2 cells;
only cells some tile touched are allocated. Tiles arrive in row-major grid order, so when the
first tile of grid row R arrives every cell row < R is final: it is normalised (sum of weighted
probabilities / sum of weights), handed on as a ``Band`` and freed. Memory therefore holds at
most tile/stride rows of cells plus one band, independent of the slide's height, and only the
cells under tissue tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BLEND_WINDOWS
from .tiling import Tile, TileGrid

WINDOW_FLOOR = 1e-3
"""Smallest blending weight; weights are never zero, so an edge pixel seen by one tile only
still gets that tile's prediction."""


def blending_window(tile: int, floor: float = WINDOW_FLOOR, kind: str = "cosine") -> np.ndarray:
    """2-D separable blending window, never below ``floor`` (relative to its peak of 1).

    cosine: floor + (1 - floor) * sin^2(pi (i + 0.5) / T) (raised cosine / Hann). With stride T/2
    the sin^2 parts of overlapping windows sum to exactly 1 along each axis, so interior weight
    sums are (1 + floor)^2 everywhere: no seams.
    gaussian: exp(-d^2 / (2 (0.125 T)^2)) around the tile centre, clamped below at ``floor``
    (MONAI's default importance map, for like-for-like comparisons).
    """
    i = np.arange(tile, dtype=np.float64)
    if kind == "cosine":
        w1 = floor + (1.0 - floor) * np.sin(np.pi * (i + 0.5) / tile) ** 2
    elif kind == "gaussian":
        sigma = 0.125 * tile
        w1 = np.maximum(np.exp(-((i + 0.5 - tile / 2) ** 2) / (2 * sigma**2)), np.sqrt(floor))
    else:
        raise ValueError(f"unknown blending window {kind!r}; choose {BLEND_WINDOWS}")
    return np.outer(w1, w1).astype(np.float32)


@dataclass
class Band:
    """Finished rows [y0, y0 + height) of the canvas at analysis resolution. A band under which
    no tile was inferred is ``empty``: it carries no arrays (glass costs no memory or time)."""

    y0: int
    height: int
    probabilities: np.ndarray | None
    """uint8 (C, h, W): probability * 255, rounded."""
    foreground: np.ndarray | None
    """bool (h, W): max class probability >= threshold (decided before quantisation)."""

    @property
    def empty(self) -> bool:
        return self.foreground is None


class BlendingCanvas:
    def __init__(self, grid: TileGrid, n_classes: int, foreground_threshold: float = 0.5, window: str = "cosine"):
        if grid.tile % grid.stride:
            raise ValueError("tile must be a multiple of stride")
        self.grid = grid
        self.n_classes = n_classes
        self.threshold = foreground_threshold
        self.k = grid.tile // grid.stride
        self.window = blending_window(grid.tile, kind=window)
        self.n_cell_rows = -(-grid.height // grid.stride)
        self.n_cell_cols = -(-grid.width // grid.stride)
        self._cells: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._next_row = 0  # first cell row not yet emitted
        self._last_tile_row = -1
        self.peak_cells = 0

    def add(self, tile: Tile, probabilities: np.ndarray) -> list[Band]:
        """Blend one tile's (C, T, T) probabilities; returns the bands this made final."""
        if tile.row < self._last_tile_row:
            raise ValueError("tiles must be added in row-major grid order")
        bands = self._emit_until(tile.row) if tile.row > self._last_tile_row else []
        self._last_tile_row = tile.row
        s, g = self.grid.stride, self.grid
        weighted = probabilities * self.window[None]
        for dy in range(self.k):
            cy = tile.row + dy
            if cy >= self.n_cell_rows:
                break
            for dx in range(self.k):
                cx = tile.col + dx
                if cx >= self.n_cell_cols:
                    break
                acc, wsum = self._cell(cy, cx)
                h = min(s, g.height - cy * s)
                w = min(s, g.width - cx * s)
                ys, xs = slice(dy * s, dy * s + h), slice(dx * s, dx * s + w)
                acc[:, :h, :w] += weighted[:, ys, xs]
                wsum[:h, :w] += self.window[ys, xs]
        self.peak_cells = max(self.peak_cells, len(self._cells))
        return bands

    def finish(self) -> list[Band]:
        """Emit every remaining row (call once, after the last tile)."""
        return self._emit_until(self.n_cell_rows)

    def _cell(self, cy: int, cx: int) -> tuple[np.ndarray, np.ndarray]:
        cell = self._cells.get((cy, cx))
        if cell is None:
            s = self.grid.stride
            cell = (np.zeros((self.n_classes, s, s), np.float32), np.zeros((s, s), np.float32))
            self._cells[(cy, cx)] = cell
        return cell

    def _emit_until(self, row: int) -> list[Band]:
        bands = []
        while self._next_row < min(row, self.n_cell_rows):
            bands.append(self._emit_row(self._next_row))
            self._next_row += 1
        return bands

    def _emit_row(self, cy: int) -> Band:
        s, g = self.grid.stride, self.grid
        h = min(s, g.height - cy * s)
        if not any((cy, cx) in self._cells for cx in range(self.n_cell_cols)):
            return Band(y0=cy * s, height=h, probabilities=None, foreground=None)
        probs = np.zeros((self.n_classes, h, g.width), np.uint8)
        foreground = np.zeros((h, g.width), bool)
        for cx in range(self.n_cell_cols):
            cell = self._cells.pop((cy, cx), None)
            if cell is None:
                continue
            acc, wsum = cell
            w = min(s, g.width - cx * s)
            covered = wsum[:h, :w] > 0
            p = np.divide(acc[:, :h, :w], wsum[None, :h, :w], out=np.zeros_like(acc[:, :h, :w]),
                          where=covered[None])
            xs = slice(cx * s, cx * s + w)
            foreground[:, xs] = p.max(axis=0) >= self.threshold
            probs[:, :, xs] = np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Band(y0=cy * s, height=h, probabilities=probs, foreground=foreground)
