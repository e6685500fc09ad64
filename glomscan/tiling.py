"""The overlapping tile grid at analysis resolution, which tiles touch tissue, and the tile
source that hands the engine those tiles with their pixels (after MONAI's ``Splitter``: the
engine side never sees coordinates-to-pixels plumbing)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .slides import TileReader, TissueMask


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    """Grid indices; the tile's top-left corner is (col * stride, row * stride)."""
    x: int
    y: int


@dataclass(frozen=True)
class TileGrid:
    width: int
    height: int
    """Analysis image size, pixels."""
    tile: int
    stride: int

    @property
    def n_cols(self) -> int:
        return _count(self.width, self.tile, self.stride)

    @property
    def n_rows(self) -> int:
        return _count(self.height, self.tile, self.stride)

    def tiles(self) -> list[Tile]:
        """All tiles, row-major. Together they cover every pixel of the image; the last row and
        column may stick out past the edge (those pixels are padded when read)."""
        return [
            Tile(r, c, c * self.stride, r * self.stride)
            for r in range(self.n_rows)
            for c in range(self.n_cols)
        ]

    def tissue_tiles(self, tissue: TissueMask) -> list[Tile]:
        """Tiles whose footprint contains at least one tissue pixel of the thumbnail mask."""
        mask = tissue.mask
        integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
        integral[1:, 1:] = mask.cumsum(0).cumsum(1)
        ds = tissue.downsample
        keep = []
        for t in self.tiles():
            x0 = int(np.floor(t.x / ds))
            y0 = int(np.floor(t.y / ds))
            x1 = min(int(np.ceil((t.x + self.tile) / ds)), mask.shape[1])
            y1 = min(int(np.ceil((t.y + self.tile) / ds)), mask.shape[0])
            if x1 <= x0 or y1 <= y0:
                continue
            count = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            if count > 0:
                keep.append(t)
        return keep


def _count(size: int, tile: int, stride: int) -> int:
    """Tiles along one axis so that the last one reaches the edge."""
    if size <= tile:
        return 1
    return int(np.ceil((size - tile) / stride)) + 1


class TileSource:
    """The chosen tiles of an analysis image with their pixels, in order, read ahead by
    ``readers`` threads (one pyvips region each). ``batches`` yields (tiles, (N, tile, tile, 3)
    uint8 pixels); past the image edge the pixels are mirrored (``TileReader``). ``read`` (x, y)
    -> pixels replaces the image reader (tests, other sources)."""

    def __init__(self, image, tiles: list[Tile], tile_px: int, readers: int = 2,
                 read: Callable[[int, int], np.ndarray] | None = None):
        self.tiles = tiles
        self.readers = max(1, readers)
        self._read = read if read is not None else TileReader(image, tile_px).read

    def __len__(self) -> int:
        return len(self.tiles)

    def batches(self, batch_size: int) -> Iterator[tuple[list[Tile], np.ndarray]]:
        """Batches of ``batch_size`` tiles (the last may be smaller). Reading runs ahead of the
        consumer by at most ``batch_size * (readers + 2)`` tiles, so memory stays bounded."""
        pending: deque = deque()
        remaining = iter(self.tiles)
        max_in_flight = batch_size * (self.readers + 2)
        pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="tile-reader")

        def refill() -> None:
            while len(pending) < max_in_flight:
                tile = next(remaining, None)
                if tile is None:
                    return
                pending.append((tile, pool.submit(self._read, tile.x, tile.y)))

        try:
            refill()
            while pending:
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                pixels = np.stack([future.result() for _, future in batch])
                refill()  # the next tiles are read while the consumer runs this batch
                yield [tile for tile, _ in batch], pixels
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
