"""Weighted blending of overlapping tile predictions into a bounded-memory canvas.

The canvas is split into square cells whose side is the largest that divides both the tile and
the stride (the stride itself when the tile is a multiple of it: 512 px cells for 1024 px tiles
at stride 512, 256 px at stride 768, 128 px at 640 or 896). A tile covers (tile/cell)^2 cells
and starts a cell row (stride/cell per grid row) below the one above it; only cells some tile
touched are allocated. Tiles arrive in row-major grid order, so when the first tile of grid row
R arrives every cell row above that tile's first is final: it is normalised (sum of weighted
probabilities / sum of weights), handed on as a ``Band`` and freed. Memory therefore holds at
most one tile's height of cells plus one band, independent of the slide's height, and only the
cells under tissue tiles.

With a thread pool the work is spread by cell column: worker g blends and normalises the cells
whose column index is g modulo the number of workers. Every cell still receives its tiles'
contributions one after the other in tile order, by one thread, so the floating-point sums and
hence the bands are bit-identical to the sequential ones; numpy releases the GIL for the array
arithmetic, so the workers run on separate cores.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from .config import BLEND_WINDOWS
from .tiling import Tile, TileGrid

WINDOW_FLOOR = 1e-3
"""Smallest blending weight; weights are never zero, so an edge pixel seen by one tile only
still gets that tile's prediction."""


def blending_window(tile: int, floor: float = WINDOW_FLOOR, kind: str = "cosine") -> np.ndarray:
    """2-D separable blending window, never below ``floor`` (relative to its peak of 1).

    cosine: floor + (1 - floor) * sin^2(pi (i + 0.5) / T) (raised cosine / Hann). The canvas
    divides by the weights' sum, so any stride blends without a seam: a window's weight falls to
    its floor at its edges where the next one's rises. With stride T/2 the sin^2 parts of
    overlapping windows even sum to exactly 1 along each axis (interior weight sums (1 + floor)^2
    everywhere); at the default stride 3T/4 the sums vary, and the division evens them out.
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


class Merger(ABC):
    """What turns tile predictions into the slide's probability map, a band of finished rows at
    a time, top to bottom (after MONAI's ``Merger``): ``BlendingCanvas`` on the CPU; a GPU or an
    on-disk merger plugs in here. Tiles come in row-major grid order; bands must come in order,
    cover every row once, and may be ``empty`` where no tile was inferred."""

    @abstractmethod
    def add_batch(self, tiles: list[Tile], probabilities) -> list[Band]:
        """Take tiles with their (C, T, T) probabilities; return the bands they made final."""

    @abstractmethod
    def finish(self) -> list[Band]:
        """Return every remaining band (called once, after the last tile)."""


class BlendingCanvas(Merger):
    def __init__(self, grid: TileGrid, n_classes: int, foreground_threshold: float = 0.5, window: str = "cosine",
                 pool: Executor | None = None, workers: int = 1):
        """``pool`` with ``workers`` > 1: blend and normalise on that many tasks of the pool at a
        time (each call waits for its tasks), split by cell column. Results do not depend on it."""
        if not 0 < grid.stride <= grid.tile:
            raise ValueError(f"need 0 < stride <= tile, got stride {grid.stride}, tile {grid.tile}")
        self.grid = grid
        self.n_classes = n_classes
        self.threshold = foreground_threshold
        self.cell = math.gcd(grid.tile, grid.stride)
        """Side of a cell, pixels."""
        self.k = grid.tile // self.cell
        """Cells along a tile's side."""
        self.step = grid.stride // self.cell
        """Cells from one grid row (or column) of tiles to the next."""
        self.window = blending_window(grid.tile, kind=window)
        self.n_cell_rows = -(-grid.height // self.cell)
        self.n_cell_cols = -(-grid.width // self.cell)
        self.pool = pool if workers > 1 else None
        self.n_groups = max(1, min(workers, self.n_cell_cols)) if self.pool is not None else 1
        self._cells: dict[tuple[int, int], tuple[np.ndarray, list[tuple[int, int]]]] = {}
        """(cy, cx) -> (sum of weighted probabilities, the window parts (dy, dx) added, in order)."""
        self._weight_sums: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
        self._next_row = 0  # first cell row not yet emitted
        self._last_tile_row = -1
        self.peak_cells = 0

    def add(self, tile: Tile, probabilities: np.ndarray) -> list[Band]:
        """Blend one tile's (C, T, T) probabilities; returns the bands this made final."""
        return self.add_batch([tile], [probabilities])

    def add_batch(self, tiles: list[Tile], probabilities) -> list[Band]:
        """Blend tiles (in row-major grid order) with their (C, T, T) probabilities; returns the
        bands they made final. The rows a tile makes final are emitted before it is blended, so
        memory holds the same cells as adding the tiles one by one."""
        bands: list[Band] = []
        pairs = list(zip(tiles, probabilities))
        for row, run in groupby(pairs, key=lambda pair: pair[0].row):
            if row < self._last_tile_row:
                raise ValueError("tiles must be added in row-major grid order")
            if row > self._last_tile_row:
                bands += self._emit_until(row * self.step)
            self._last_tile_row = row
            run = list(run)
            for tile, _ in run:  # cells are created here, filled by the column groups below
                cy0, cx0 = tile.row * self.step, tile.col * self.step
                for cy in range(cy0, min(cy0 + self.k, self.n_cell_rows)):
                    for cx in range(cx0, min(cx0 + self.k, self.n_cell_cols)):
                        self._cell(cy, cx)
            self.peak_cells = max(self.peak_cells, len(self._cells))
            self._in_groups(lambda g: self._blend(run, g))
        return bands

    def finish(self) -> list[Band]:
        """Emit every remaining row (call once, after the last tile)."""
        return self._emit_until(self.n_cell_rows)

    def _in_groups(self, work) -> None:
        """Run ``work(g)`` for every column group g, on the pool when there is one."""
        if self.pool is None:
            work(0)
            return
        for future in [self.pool.submit(work, g) for g in range(self.n_groups)]:
            future.result()

    def _blend(self, run: list[tuple[Tile, np.ndarray]], group: int) -> None:
        """Add the tiles of ``run`` to the cells of column group ``group``, in tile order."""
        s, g = self.cell, self.grid
        scratch = None
        for tile, probabilities in run:
            if scratch is None or scratch.dtype != np.result_type(probabilities, self.window):
                scratch = np.empty((self.n_classes, s, s), np.result_type(probabilities, self.window))
            for dx in range(self.k):
                cx = tile.col * self.step + dx
                if cx >= self.n_cell_cols:
                    break
                if cx % self.n_groups != group:
                    continue
                w = min(s, g.width - cx * s)
                xs = slice(dx * s, dx * s + w)
                for dy in range(self.k):
                    cy = tile.row * self.step + dy
                    if cy >= self.n_cell_rows:
                        break
                    acc, parts = self._cells[(cy, cx)]
                    h = min(s, g.height - cy * s)
                    ys = slice(dy * s, dy * s + h)
                    weighted = np.multiply(probabilities[:, ys, xs], self.window[ys, xs], out=scratch[:, :h, :w])
                    np.add(acc[:, :h, :w], weighted, out=acc[:, :h, :w], casting="same_kind")
                    parts.append((dy, dx))

    def weight_sum(self, cy: int, cx: int) -> np.ndarray:
        """Sum of the window weights a cell received: the window parts added in the order they
        came, which depends only on which neighbouring tiles were present, so each such pattern
        is summed once (the same float32 additions as summing per cell)."""
        parts = tuple(self._cells[(cy, cx)][1])
        wsum = self._weight_sums.get(parts)
        if wsum is None:
            s = self.cell
            wsum = np.zeros((s, s), np.float32)
            for dy, dx in parts:
                wsum += self.window[dy * s:dy * s + s, dx * s:dx * s + s]
            self._weight_sums[parts] = wsum
        return wsum

    def _cell(self, cy: int, cx: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        cell = self._cells.get((cy, cx))
        if cell is None:
            s = self.cell
            cell = (np.zeros((self.n_classes, s, s), np.float32), [])
            self._cells[(cy, cx)] = cell
        return cell

    def _emit_until(self, row: int) -> list[Band]:
        rows = range(self._next_row, min(row, self.n_cell_rows))
        if not rows:
            return []
        s, g = self.cell, self.grid
        bands = []
        for cy in rows:
            h = min(s, g.height - cy * s)
            if any((cy, cx) in self._cells for cx in range(self.n_cell_cols)):
                bands.append(Band(y0=cy * s, height=h, probabilities=np.zeros((self.n_classes, h, g.width), np.uint8),
                                  foreground=np.zeros((h, g.width), bool)))
            else:
                bands.append(Band(y0=cy * s, height=h, probabilities=None, foreground=None))
        self._in_groups(lambda group: self._normalise(rows, bands, group))
        for cy in rows:
            for cx in range(self.n_cell_cols):
                self._cells.pop((cy, cx), None)
        self._next_row = rows.stop
        return bands

    def _normalise(self, rows: range, bands: list[Band], group: int) -> None:
        """Write the finished cells of column group ``group`` into the bands of ``rows``."""
        s, g = self.cell, self.grid
        for cy, band in zip(rows, bands):
            if band.empty:
                continue
            h, probs, foreground = band.height, band.probabilities, band.foreground
            for cx in range(group, self.n_cell_cols, self.n_groups):
                cell = self._cells.get((cy, cx))
                if cell is None:
                    continue
                acc, wsum = cell[0], self.weight_sum(cy, cx)
                w = min(s, g.width - cx * s)
                covered = wsum[:h, :w] > 0
                p = np.divide(acc[:, :h, :w], wsum[None, :h, :w], out=np.zeros_like(acc[:, :h, :w]),
                              where=covered[None])
                xs = slice(cx * s, cx * s + w)
                foreground[:, xs] = p.max(axis=0) >= self.threshold
                probs[:, :, xs] = np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)
