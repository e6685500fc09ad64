from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import ndimage

from glomscan import postprocess
from glomscan.merge import Band
from glomscan.postprocess import EIGHT_CONNECTED, Glomerulus, InstanceStream, glomerulus_class, outer_contour


def stream_image(fg, probs, band_height, min_area=0, max_pending=10_000):
    h, w = fg.shape
    painted = np.zeros((h, w), np.uint8)

    def sink(y0, rows):
        painted[y0:y0 + rows.shape[0]] = rows

    stream = InstanceStream(w, ("normal", "sclerosed"), min_area, sink, max_pending_rows=max_pending)
    for y in range(0, h, band_height):
        stream.push(Band(y, min(band_height, h - y), probs[:, y:y + band_height], fg[y:y + band_height]))
    return stream.finish(), painted, stream


def random_blobs(seed, h=300, w=200):
    rng = np.random.default_rng(seed)
    fg = ndimage.binary_opening(rng.random((h, w)) > 0.62, iterations=1)
    fg = ndimage.binary_dilation(fg, iterations=2)
    probs = (rng.random((2, h, w)) * 255).astype(np.uint8)
    return fg, probs


def test_streamed_instances_equal_whole_image_labelling():
    for seed in range(3):
        fg, probs = random_blobs(seed)
        labels, n = ndimage.label(fg, structure=EIGHT_CONNECTED)
        instances, painted, _ = stream_image(fg, probs, band_height=37)
        assert len(instances) == n
        truth = {}
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels[sl] == i
            means = [probs[c][sl][comp].mean() / 255 for c in range(2)]
            truth[(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)] = (int(comp.sum()), int(np.argmax(means)) + 1)
        got = {g.bbox: (g.area_px, g.label) for g in instances}
        assert got == truth
        # painted rows: each component in its class colour, nothing else
        expected = np.zeros_like(painted)
        for i in range(1, n + 1):
            comp = labels == i
            means = [probs[c][comp].mean() for c in range(2)]
            expected[comp] = int(np.argmax(means)) + 1
        assert np.array_equal(painted, expected)


def test_component_taller_than_many_bands():
    fg = np.zeros((400, 50), bool)
    fg[10:390, 20:25] = True
    probs = np.zeros((2, 400, 50), np.uint8)
    probs[1] = 200
    instances, painted, stream = stream_image(fg, probs, band_height=16)
    assert len(instances) == 1 and instances[0].class_name == "sclerosed"
    assert instances[0].area_px == 380 * 5
    assert (painted[fg] == 2).all()
    assert stream.forced_closures == 0


def test_pending_rows_are_bounded():
    fg = np.zeros((400, 50), bool)
    fg[:, 20:25] = True
    probs = np.full((2, 400, 50), 100, np.uint8)
    instances, painted, stream = stream_image(fg, probs, band_height=16, max_pending=64)
    assert stream.forced_closures > 0 and len(instances) > 1
    assert (painted[fg] > 0).all()


def test_small_components_dropped_and_not_painted():
    fg = np.zeros((60, 60), bool)
    fg[5:8, 5:8] = True  # 9 px
    fg[20:40, 20:40] = True  # 400 px
    probs = np.full((2, 60, 60), 50, np.uint8)
    probs[0, 20:40, 20:40] = 220
    instances, painted, stream = stream_image(fg, probs, band_height=25, min_area=50)
    assert len(instances) == 1 and stream.dropped_small == 1
    g = instances[0]
    assert g.class_name == "normal" and abs(g.probability - 220 / 255) < 1e-6
    assert g.centroid == (30.0, 30.0) and g.bbox == (20, 20, 40, 40)
    assert painted[5:8, 5:8].max() == 0 and (painted[20:40, 20:40] == 1).all()


def test_contour_hugs_a_square():
    comp = np.zeros((10, 10), bool)
    comp[2:6, 3:8] = True
    pts = np.asarray(outer_contour(comp[2:6, 3:8], 3, 2))
    assert pts[0].tolist() == pts[-1].tolist()
    # polygon area (shoelace) close to the pixel area, bounds on pixel edges
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]))
    assert 15 <= area <= 20
    assert x.min() >= 3 and x.max() <= 8 and y.min() >= 2 and y.max() <= 6


def test_empty_band_closes_pending_components():
    from glomscan.merge import Band

    fg = np.zeros((20, 30), bool)
    fg[10:20, 5:9] = True  # touches the bottom of band 0
    probs = np.full((2, 20, 30), 200, np.uint8)
    painted = np.zeros((60, 30), np.uint8)
    stream = InstanceStream(30, ("normal", "sclerosed"), 0, lambda y0, rows: painted.__setitem__(slice(y0, y0 + len(rows)), rows))
    stream.push(Band(0, 20, probs, fg))
    assert stream.instances == []  # still pending
    stream.push(Band(20, 20, None, None))
    assert len(stream.instances) == 1 and (painted[10:20, 5:9] == 1).all()
    stream.push(Band(40, 20, probs, fg))
    assert len(stream.finish()) == 2 and (painted[50:60, 5:9] == 1).all()


class PreviousInstanceStream:
    """The instance stream as it was before bands were labelled one at a time (every pending
    row relabelled on each push): the reference the streamed labelling must reproduce exactly."""

    def __init__(self, width, class_names, min_area_px, row_sink, max_pending_rows=8192):
        self.class_names, self.min_area_px, self.row_sink = class_names, min_area_px, row_sink
        self.max_pending_rows = max_pending_rows
        self.instances, self.dropped_small, self.forced_closures = [], 0, 0
        self._y0 = 0
        self._fg = np.zeros((0, width), bool)
        self._probs = np.zeros((len(class_names), 0, width), np.uint8)
        self._paint = np.zeros((0, width), np.uint8)

    def push(self, band):
        assert band.y0 == self._y0 + self._fg.shape[0]
        if band.empty:
            self._resolve(final=True)
            self._y0 += band.height
            return
        self._fg = np.concatenate([self._fg, band.foreground], axis=0)
        self._probs = np.concatenate([self._probs, band.probabilities], axis=1)
        self._paint = np.concatenate([self._paint, np.zeros_like(band.foreground, np.uint8)], axis=0)
        self._resolve(final=False)

    def finish(self):
        self._resolve(final=True)
        return self.instances

    def _resolve(self, final):
        fg = self._fg
        height = fg.shape[0]
        if height == 0:
            return
        labels, _ = ndimage.label(fg, structure=EIGHT_CONNECTED)
        open_ids = set() if final else set(np.unique(labels[-1]).tolist()) - {0}
        cut = height
        for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            if idx in open_ids:
                cut = min(cut, sl[0].start)
                continue
            component = labels[sl] == idx
            self._finish_component(sl, component)
            fg[sl][component] = False
        if not final and height - cut > self.max_pending_rows:
            self.forced_closures += 1
            self._resolve(final=True)
            return
        if cut > 0:
            self.row_sink(self._y0, self._paint[:cut])
        self._y0 += cut
        self._fg, self._probs, self._paint = self._fg[cut:].copy(), self._probs[:, cut:].copy(), self._paint[cut:].copy()

    def _finish_component(self, sl, component):
        area = int(component.sum())
        if area < self.min_area_px:
            self.dropped_small += 1
            return
        means = tuple(float(self._probs[c][sl][component].mean()) / 255.0 for c in range(self._probs.shape[0]))
        cls = glomerulus_class(means)
        self._paint[sl][component] = cls + 1
        ys, xs = np.nonzero(component)
        y_off, x_off = self._y0 + sl[0].start, sl[1].start
        self.instances.append(Glomerulus(
            id=len(self.instances) + 1, label=cls + 1, class_name=self.class_names[cls], probability=means[cls],
            mean_probabilities=means, area_px=area,
            centroid=(float(xs.mean() + x_off + 0.5), float(ys.mean() + y_off + 0.5)),
            bbox=(x_off, y_off, x_off + component.shape[1], y_off + component.shape[0]),
            contour=outer_contour(component, x_off, y_off)))


def streamed(stream_type, fg, probs, band_heights, empty=(), **kw):
    """Push fg/probs in bands of the given heights (cycled; indices in ``empty`` pushed as empty
    bands) through a stream; returns (instances, painted rows, stream)."""
    h, w = fg.shape
    painted = np.zeros((h, w), np.uint8)

    def sink(y0, rows):
        assert not painted[y0:y0 + rows.shape[0]].any()  # every row is handed over once
        painted[y0:y0 + rows.shape[0]] = rows

    stream = stream_type(w, ("normal", "sclerosed"), row_sink=sink, **kw)
    y, i = 0, 0
    while y < h:
        bh = min(band_heights[i % len(band_heights)], h - y)
        if i in empty:
            stream.push(Band(y, bh, None, None))
        else:
            stream.push(Band(y, bh, probs[:, y:y + bh], fg[y:y + bh]))
        y, i = y + bh, i + 1
    return stream.finish(), painted, stream


def assert_same_instances(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == y  # every field, contour included, exactly (floats compared bit for bit)
        assert x.contour == y.contour


def blob_field(seed, h, w, threshold, grow):
    rng = np.random.default_rng(seed)
    fg = ndimage.binary_dilation(rng.random((h, w)) > threshold, iterations=grow)
    return fg, (rng.random((2, h, w)) * 255).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_streamed_labelling_equals_the_previous_relabelling_exactly(seed, monkeypatch):
    """Same glomeruli (ids, order, every measurement) and the same painted mask as relabelling
    every pending row, sequentially and with workers, for small blobs, blobs spanning many
    bands, a field that is mostly foreground, uneven bands, empty bands and forced closures."""
    monkeypatch.setattr(postprocess, "MIN_PIECE_ROWS", 4)  # workers label even thin bands in pieces
    rng = np.random.default_rng(100 + seed)
    h, w = int(rng.integers(150, 400)), int(rng.integers(60, 250))
    threshold, grow = [(0.995, 3), (0.999, 9), (0.6, 1), (0.97, 2), (0.9995, 14), (0.8, 1)][seed]
    fg, probs = blob_field(seed, h, w, threshold, grow)
    heights = [int(x) for x in rng.integers(1, 90, 5)]
    empty = {3} if seed % 2 else set()
    kw = dict(min_area_px=[0, 30, 200][seed % 3], max_pending_rows=[10_000, 120, 40][seed % 3])
    ref, ref_painted, ref_stream = streamed(PreviousInstanceStream, fg, probs, heights, empty, **kw)
    assert ref  # the case has glomeruli
    with ThreadPoolExecutor(4) as pool:
        for extra in ({}, {"pool": pool, "workers": 2}, {"pool": pool, "workers": 4}):
            got, painted, stream = streamed(InstanceStream, fg, probs, heights, empty, **kw, **extra)
            assert_same_instances(got, ref)
            assert np.array_equal(painted, ref_painted)
            assert (stream.dropped_small, stream.forced_closures) == (ref_stream.dropped_small, ref_stream.forced_closures)


def test_band_labelled_in_pieces_joins_components_across_piece_edges():
    """A band of 300 rows labelled in pieces by 5 workers: shapes cut by every piece edge, and
    diagonal-only contacts across them, are single components as in one labelling."""
    fg = np.zeros((300, 120), bool)
    fg[:, 10] = True  # a column through every piece
    for y in range(300):  # a diagonal line: each pixel touches the next only at a corner
        fg[y, 20 + y % 80] = True
    fg[55:70, 105:115] = True  # a block straddling the first piece edge (row 60)
    fg[60, 117] = fg[59, 118] = True  # two pixels meeting at a corner across that edge
    probs = np.full((2, 300, 120), 180, np.uint8)
    ref, ref_painted, _ = streamed(PreviousInstanceStream, fg, probs, [300], min_area_px=0)
    with ThreadPoolExecutor(5) as pool:
        got, painted, _ = streamed(InstanceStream, fg, probs, [300], min_area_px=0, pool=pool, workers=5)
    assert_same_instances(got, ref)
    assert np.array_equal(painted, ref_painted)


def test_a_component_spanning_every_band_costs_no_relabelling_of_pending_rows():
    """The pending rows of a tall component are labelled once: each push labels its band only."""
    fg = np.zeros((2000, 40), bool)
    fg[:, 5:9] = True
    probs = np.full((2, 2000, 40), 150, np.uint8)
    labelled_rows = []
    original = ndimage.label

    def counting_label(input, *args, **kwargs):
        labelled_rows.append(np.asarray(input).shape[0])
        return original(input, *args, **kwargs)

    ndimage.label = counting_label
    try:
        instances, painted, _ = streamed(InstanceStream, fg, probs, [50], min_area_px=0)
    finally:
        ndimage.label = original
    assert len(instances) == 1 and instances[0].area_px == 2000 * 4 and (painted[fg] == 1).all()
    assert max(labelled_rows) == 50 and sum(labelled_rows) == 2000


def test_contour_simplification_keeps_the_vertices_of_douglas_peucker():
    """The same vertices as skimage's approximate_polygon, on glomerulus-like blobs and on
    integer polylines full of equal distances."""
    from skimage.measure import approximate_polygon, find_contours

    from glomscan.postprocess import simplify_polyline

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:160, 0:160]
    for _ in range(40):
        blob = np.zeros((160, 160), bool)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, ry, rx = rng.uniform(40, 120, 2).tolist() + rng.uniform(8, 45, 2).tolist()
            blob |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + 0.3 * rng.standard_normal(blob.shape) < 1
        contours = find_contours(np.pad(ndimage.binary_opening(blob), 1).astype(np.uint8), 0.5)
        if contours:
            contour = max(contours, key=len)
            for tolerance in (0.1, 0.75, 2.0):
                assert np.array_equal(simplify_polyline(contour, tolerance), approximate_polygon(contour, tolerance))
    for _ in range(200):
        line = rng.integers(0, 10, (int(rng.integers(3, 40)), 2)).astype(float)
        for tolerance in (0.5, 1.0, 3.0):
            assert np.array_equal(simplify_polyline(line, tolerance), approximate_polygon(line, tolerance))
    assert simplify_polyline(np.zeros((2, 2)), 1.0).shape == (2, 2)
