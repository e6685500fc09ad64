import numpy as np
import pytest

from glomscan.slides import TissueMask
from glomscan.tiling import TileGrid


@pytest.mark.parametrize("width,height", [(1024, 1024), (1000, 700), (3000, 2100), (1537, 513)])
def test_grid_covers_every_pixel(width, height):
    grid = TileGrid(width, height, tile=1024, stride=512)
    covered = np.zeros((height, width), np.int32)
    for t in grid.tiles():
        covered[t.y:t.y + 1024, t.x:t.x + 1024] += 1
    assert covered.min() >= 1
    # no tile starts beyond the image, and the last ones reach the far edge
    assert all(t.x < width and t.y < height for t in grid.tiles())
    assert max(t.x for t in grid.tiles()) + 1024 >= width


def test_grid_counts():
    grid = TileGrid(3000, 2100, tile=1024, stride=512)
    assert (grid.n_cols, grid.n_rows) == (5, 4)  # starts 0..2048 and 0..1536
    assert len(grid.tiles()) == 20


def test_tissue_tiles_only_touching_tissue():
    mask = np.zeros((64, 64), bool)
    mask[2:6, 2:6] = True  # analysis px 32..96 at downsample 16
    grid = TileGrid(1024, 1024, tile=256, stride=128)
    kept = grid.tissue_tiles(TissueMask(mask, 16.0, 0.1))
    assert {(t.x, t.y) for t in kept} == {(0, 0)}
    mask[40, 40] = True  # analysis px 640..656
    kept = {(t.x, t.y) for t in grid.tissue_tiles(TissueMask(mask, 16.0, 0.1))}
    assert (512, 512) in kept and (640, 640) in kept and (384, 384) not in kept
