"""The overlapping tile grid at analysis resolution, and which tiles touch tissue."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .slides import TissueMask


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
