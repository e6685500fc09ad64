from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from glomscan.merge import WINDOW_FLOOR, BlendingCanvas, blending_window
from glomscan.tiling import TileGrid


def run_canvas(grid, tiles_probs, n_classes=2):
    canvas = BlendingCanvas(grid, n_classes)
    bands = []
    for tile, p in tiles_probs:
        bands += canvas.add(tile, p)
    bands += canvas.finish()
    return canvas, bands


def assemble(bands, grid, n_classes=2):
    probs = np.zeros((n_classes, grid.height, grid.width), np.uint8)
    fg = np.zeros((grid.height, grid.width), bool)
    y = 0
    for b in bands:
        assert b.y0 == y
        probs[:, y:y + b.height] = b.probabilities
        fg[y:y + b.height] = b.foreground
        y += b.height
    assert y == grid.height
    return probs, fg


def test_window_never_zero_and_partition_of_unity():
    w = blending_window(64)
    assert w.min() >= WINDOW_FLOOR**2
    w1 = np.sqrt(np.diag(w))  # separable: diagonal = w1(i)^2
    assert np.allclose(w, np.outer(w1, w1), rtol=1e-5)
    assert np.allclose(w1[:32] + w1[32:], 1 + WINDOW_FLOOR, atol=1e-6)


def test_constant_prediction_gives_constant_canvas_without_seams():
    grid = TileGrid(700, 520, tile=128, stride=64)
    p = np.empty((2, 128, 128), np.float32)
    p[0], p[1] = 0.6, 0.25  # 153 and 63.75 -> 64 after quantisation: no rounding ties
    _, bands = run_canvas(grid, [(t, p) for t in grid.tiles()])
    probs, fg = assemble(bands, grid)
    assert (probs[0] == 153).all() and (probs[1] == 64).all()
    assert fg.all()


def test_overlap_weights_sum_to_the_window_sum():
    grid = TileGrid(512, 384, tile=128, stride=64)
    canvas = BlendingCanvas(grid, 1)
    ones = np.ones((1, 128, 128), np.float32)
    expected = np.zeros((384, 512))
    window = blending_window(128)
    for t in grid.tiles():
        expected[t.y:t.y + 128, t.x:t.x + 128] += window[: 384 - t.y, : 512 - t.x]
    for t in grid.tiles()[: grid.n_cols]:  # first tile row only: cell row 0 is not yet emitted
        canvas.add(t, ones)
    for t in grid.tiles()[grid.n_cols: 2 * grid.n_cols]:
        canvas.add(t, ones)
    # cell row 1 is now complete (touched by tile rows 0 and 1) and still held in memory
    row1 = np.concatenate([canvas.weight_sum(1, cx) for cx in range(canvas.n_cell_cols)], axis=1)
    assert np.allclose(row1, expected[64:128], rtol=1e-6)
    assert np.allclose(expected[64:320, 64:448], (1 + WINDOW_FLOOR) ** 2, rtol=1e-6)


@pytest.mark.parametrize("stride", [64, 96, 112, 128])
def test_blending_equals_dense_reference_with_random_predictions_and_missing_tiles(stride):
    """Any stride up to the tile: cells of gcd(tile, stride) px (64, 32, 16, 128 here)."""
    rng = np.random.default_rng(3)
    grid = TileGrid(600, 450, tile=128, stride=stride)
    tiles = [t for t in grid.tiles() if rng.random() > 0.3]
    preds = [rng.random((2, 128, 128), dtype=np.float32) for _ in tiles]
    acc = np.zeros((2, 450 + 128, 600 + 128))
    ws = np.zeros((450 + 128, 600 + 128))
    window = blending_window(128).astype(np.float64)
    for t, p in zip(tiles, preds):
        acc[:, t.y:t.y + 128, t.x:t.x + 128] += p * window
        ws[t.y:t.y + 128, t.x:t.x + 128] += window
    ref = np.divide(acc, ws, out=np.zeros_like(acc), where=ws > 0)[:, :450, :600]
    canvas, bands = run_canvas(grid, list(zip(tiles, preds)))
    probs, fg = assemble(bands, grid)
    assert np.abs(probs.astype(int) - np.rint(ref * 255)).max() <= 1
    assert np.array_equal(fg, ref.max(0) >= 0.5)
    cells_per_tile_row = grid.n_cols * stride // canvas.cell + canvas.k
    assert canvas.peak_cells <= (canvas.k + canvas.step) * cells_per_tile_row  # a tile's height of cells, and a step


def test_tiles_out_of_row_order_are_refused():
    grid = TileGrid(256, 256, tile=128, stride=64)
    canvas = BlendingCanvas(grid, 1)
    tiles = grid.tiles()
    canvas.add(tiles[-1], np.zeros((1, 128, 128), np.float32))
    with pytest.raises(ValueError):
        canvas.add(tiles[0], np.zeros((1, 128, 128), np.float32))


def test_gaussian_window_is_floored_and_peaks_in_the_centre():
    w = blending_window(128, kind="gaussian")
    assert w.min() >= WINDOW_FLOOR * 0.999 and w[63, 63] == w.max()
    grid = TileGrid(300, 300, tile=128, stride=64)
    p = np.full((1, 128, 128), 0.6, np.float32)
    canvas = BlendingCanvas(grid, 1, window="gaussian")
    bands = []
    for t in grid.tiles():
        bands += canvas.add(t, p)
    bands += canvas.finish()
    probs, _ = assemble(bands, grid, n_classes=1)
    assert (probs == 153).all()


def test_rows_without_tiles_are_empty_bands():
    grid = TileGrid(256, 1024, tile=128, stride=64)
    tiles = [t for t in grid.tiles() if t.row in (0, 10)]
    _, bands = run_canvas(grid, [(t, np.ones((2, 128, 128), np.float32)) for t in tiles])
    # 16 cell rows; tile rows 0 and 10 cover cell rows 0-1 and 10-11
    assert [i for i, b in enumerate(bands) if not b.empty] == [0, 1, 10, 11]
    assert sum(b.height for b in bands) == 1024


def dense_reference_bands(grid, tiles, preds, n_classes=2, threshold=0.5):
    """Blending the slow, obvious way in float32, adding the tiles in their order: the sums every
    cell must reproduce bit for bit."""
    t = grid.tile
    acc = np.zeros((n_classes, grid.height + t, grid.width + t), np.float32)
    wsum = np.zeros((grid.height + t, grid.width + t), np.float32)
    window = blending_window(t)
    for tile, p in zip(tiles, preds):
        acc[:, tile.y:tile.y + t, tile.x:tile.x + t] += p * window[None]
        wsum[tile.y:tile.y + t, tile.x:tile.x + t] += window
    acc, wsum = acc[:, :grid.height, :grid.width], wsum[:grid.height, :grid.width]
    p = np.divide(acc, wsum[None], out=np.zeros_like(acc), where=wsum[None] > 0)
    return np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8), p.max(axis=0) >= threshold, wsum > 0


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_blending_is_bit_identical_to_in_order_sums_with_any_number_of_workers(workers):
    rng = np.random.default_rng(11)
    grid = TileGrid(1000, 700, tile=128, stride=64)
    tiles = [t for t in grid.tiles() if rng.random() > 0.25]
    preds = [rng.random((2, 128, 128), dtype=np.float32) for _ in tiles]
    probs_ref, fg_ref, covered = dense_reference_bands(grid, tiles, preds)
    with ThreadPoolExecutor(workers) as pool:
        canvas = BlendingCanvas(grid, 2, pool=pool, workers=workers)
        bands = []
        for i in range(0, len(tiles), 5):  # batches that start and end anywhere in a tile row
            bands += canvas.add_batch(tiles[i:i + 5], preds[i:i + 5])
        bands += canvas.finish()
    assert canvas.n_groups == min(workers, canvas.n_cell_cols)
    y = 0
    for b in bands:
        assert b.y0 == y
        if b.empty:
            assert not covered[y:y + b.height].any()
        else:
            assert np.array_equal(b.probabilities, probs_ref[:, y:y + b.height])
            assert np.array_equal(b.foreground, fg_ref[y:y + b.height])
        y += b.height
    assert y == grid.height
    assert canvas.peak_cells <= 3 * grid.n_cols


def test_another_merger_plugs_into_the_slide_merge():
    """The merger seam: a Merger that is not the blending canvas (here one that delegates to it
    and counts) drives the glomerulus finding the same way."""
    from glomscan.config import AnalysisSettings
    from glomscan.merge import Merger
    from glomscan.pipeline import SlideMerge

    grid = TileGrid(300, 260, tile=128, stride=64)
    rng = np.random.default_rng(2)
    probabilities = np.zeros((len(grid.tiles()), 2, 128, 128), np.float32)
    probabilities[:, 0, 30:90, 30:90] = 0.9  # a normal glomerulus seen by every tile
    probabilities += rng.random(probabilities.shape, dtype=np.float32) * 0.05

    class CountingMerger(Merger):
        def __init__(self):
            self.inner, self.calls = BlendingCanvas(grid, 2), 0

        def add_batch(self, tiles, probs):
            self.calls += 1
            return self.inner.add_batch(tiles, probs)

        def finish(self):
            return self.inner.finish()

    def glomeruli(merger):
        merge = SlideMerge(grid, ("normal", "sclerosed"), AnalysisSettings(tile=128, overlap=64), 10, None, 1, merger)
        tiles = grid.tiles()
        for i in range(0, len(tiles), 3):
            merge.add(tiles[i:i + 3], probabilities[i:i + 3])
        found = merge.finish()
        merge.close()
        return [(g.bbox, g.class_name, g.area_px) for g in found]

    counting = CountingMerger()
    assert glomeruli(counting) == glomeruli(None) != []
    assert counting.calls == -(-len(grid.tiles()) // 3)
    with pytest.raises(TypeError):
        Merger()
