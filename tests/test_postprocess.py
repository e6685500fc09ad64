import numpy as np
from scipy import ndimage

from glomscan.merge import Band
from glomscan.postprocess import EIGHT_CONNECTED, InstanceStream, outer_contour


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
