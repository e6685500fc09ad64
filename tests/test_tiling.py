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


def test_tile_source_yields_the_tiles_in_order_with_their_pixels_and_reads_ahead_boundedly():
    """The engine's side of the seam: batches of (tiles, pixels) in the tiles' order, the pixels
    those of the reader, and reading at most batch_size * (readers + 2) tiles ahead of the
    consumer (memory stays bounded); stopping early stops the readers."""
    import threading

    from glomscan.tiling import TileSource

    grid = TileGrid(3000, 2100, tile=64, stride=32)
    tiles = grid.tiles()[:23]
    lock, read = threading.Lock(), []

    def fake_read(x, y):
        with lock:
            read.append((x, y))
        return np.full((64, 64, 3), (x + 7 * y) % 251, np.uint8)

    source = TileSource(None, tiles, 64, readers=2, read=fake_read)
    assert len(source) == 23
    consumed = 0
    for batch, pixels in source.batches(4):
        assert pixels.shape == (len(batch), 64, 64, 3) and pixels.dtype == np.uint8
        assert [int(p[0, 0, 0]) for p in pixels] == [(t.x + 7 * t.y) % 251 for t in batch]
        assert batch == tiles[consumed:consumed + len(batch)]
        consumed += len(batch)
        assert len(read) <= consumed + 4 * (2 + 2)
    assert consumed == 23 and sorted(read) == sorted((t.x, t.y) for t in tiles)
    read.clear()
    batches = TileSource(None, tiles, 64, readers=2, read=fake_read).batches(2)
    next(batches)
    batches.close()
    assert len(read) <= 2 * (2 + 2)


def test_tile_source_reads_the_image_as_the_tile_reader_does():
    import pyvips

    from glomscan.slides import TileReader
    from glomscan.tiling import TileSource

    pixels = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    image = pyvips.Image.new_from_memory(pixels.tobytes(), 200, 150, 3, "uchar")
    grid = TileGrid(200, 150, tile=128, stride=64)
    got = [p for _, batch in TileSource(image, grid.tiles(), 128).batches(3) for p in batch]
    reader = TileReader(image, 128)
    assert len(got) == len(grid.tiles())
    for tile, p in zip(grid.tiles(), got):
        assert np.array_equal(p, reader.read(tile.x, tile.y))
