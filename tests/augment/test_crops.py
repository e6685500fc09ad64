"""Sclerosed-glomerulus crops: minimum enclosing circle, crop centring and clamping,
deduplication across overlapping patches, the crops folder."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from glomscan.augment.crops import (
    CropSettings,
    component_circle,
    crop_origin,
    make_crops,
    minimum_enclosing_circle,
    read_crops,
    split_crops,
)
from glomscan.imaging import write_png
from glomscan.train.dataset.data import MANIFEST_COLUMNS


def brute_force_circle(points):
    """Smallest circle over all pair-diameter and triple-circumcircle candidates."""
    best = None
    cands = []
    for a, b in itertools.combinations(points, 2):
        c = (a + b) / 2
        cands.append((c, np.hypot(*(a - c))))
    for a, b, c in itertools.combinations(points, 3):
        bx, by = b - a
        cx, cy = c - a
        d = 2 * (bx * cy - by * cx)
        if abs(d) < 1e-12:
            continue
        ux = (cy * (bx * bx + by * by) - by * (cx * cx + cy * cy)) / d
        uy = (bx * (cx * cx + cy * cy) - cx * (bx * bx + by * by)) / d
        cands.append((a + (ux, uy), math.hypot(ux, uy)))
    for centre, r in cands:
        if np.all(np.hypot(*(points - centre).T) <= r + 1e-9) and (best is None or r < best[1]):
            best = (centre, r)
    return best


def test_minimum_enclosing_circle_matches_brute_force_on_random_sets():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(2, 14))
        points = rng.normal(size=(n, 2)) * rng.uniform(1, 100) + rng.uniform(-50, 50, 2)
        cx, cy, r = minimum_enclosing_circle(points, seed=trial)
        centre, r_bf = brute_force_circle(points)
        assert r == pytest.approx(r_bf, rel=1e-9, abs=1e-9)
        assert (cx, cy) == pytest.approx(tuple(centre), abs=1e-6 * max(1, r))
        assert np.all(np.hypot(points[:, 0] - cx, points[:, 1] - cy) <= r * (1 + 1e-9) + 1e-9)


def test_minimum_enclosing_circle_degenerate_sets():
    assert minimum_enclosing_circle([[3, 4]]) == (3.0, 4.0, 0.0)
    assert minimum_enclosing_circle([[0, 0], [1, 1], [2, 2], [4, 4]]) == pytest.approx((2, 2, math.sqrt(8)))
    assert minimum_enclosing_circle([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]]) == pytest.approx((1, 1, math.sqrt(2)))
    # obtuse triangle: the circle is on the long side, not the circumcircle
    assert minimum_enclosing_circle([[0, 0], [10, 0], [5, 1]]) == pytest.approx((5, 0, 5))


def disc(shape, cx, cy, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def test_component_circle_of_a_rasterised_disc():
    mask = disc((200, 220), 101.3, 87.6, 40)
    cx, cy, r = component_circle(mask)
    assert (cx, cy) == pytest.approx((101.3, 87.6), abs=0.75)
    assert 40 <= r <= 41.5  # pixel squares stick out of the disc by up to half a diagonal
    single = np.zeros((5, 5), bool)
    single[2, 3] = True
    assert component_circle(single) == pytest.approx((3.5, 2.5, math.sqrt(0.5)))


def test_crop_origin_centres_and_clamps():
    assert crop_origin(500, 400, 256, 1024, 1024) == (372, 272)
    assert crop_origin(30, 40, 256, 1024, 1024) == (0, 0)
    assert crop_origin(1000, 1010, 256, 1024, 1024) == (768, 768)
    with pytest.raises(ValueError):
        crop_origin(10, 10, 256, 200, 1024)


def test_split_crops_is_8_to_2_and_deterministic():
    s = split_crops(10, 0.2, seed=3)
    assert s.count("test") == 2 and s == split_crops(10, 0.2, seed=3)
    assert split_crops(1, 0.2, 0) == ["train"]
    assert split_crops(2, 0.2, 0).count("test") == 1


# --- a small hand-made dataset: overlapping 256 px patches at stride 128 ----------------------

SCLEROSED_DISCS = [(300, 260, 30), (140, 500, 25), (40, 300, 22), (620, 110, 45)]
"""(cx, cy, r) in slide pixels; (40, 300) sits near the left edge (clamped crop), (620, 110)
is wider than a 64 px crop in the 'too large' test."""
NORMAL_DISCS = [(350, 260, 15)]
CUT_DISC = (767, 500, 30)  # crosses the slide's right edge: cut in every patch


def build_dataset(root, width=768, height=640, tile=256, stride=128):
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal((222, 168, 196), 8, (height, width, 3)), 0, 255).astype(np.uint8)
    labels = np.zeros((height, width), np.uint8)
    for cx, cy, r in NORMAL_DISCS:
        labels[disc(labels.shape, cx, cy, r)] = 1
    for cx, cy, r in SCLEROSED_DISCS + [CUT_DISC]:
        labels[disc(labels.shape, cx, cy, r)] = 2
    image[labels == 2] = (150, 36, 120)
    image[labels == 1] = (186, 128, 214)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for slide, split in (("s", "train"), ("v", "val")):
        for y in range(0, height - tile + 1, stride):
            for x in range(0, width - tile + 1, stride):
                pid = f"{slide}_x{x}_y{y}"
                m = labels[y:y + tile, x:x + tile]
                write_png(root / "images" / f"{pid}.png", image[y:y + tile, x:x + tile])
                write_png(root / "masks" / f"{pid}.png", m)
                rows.append({"patch_id": pid, "slide": slide, "split": split, "x0": 2 * x, "y0": 2 * y, "x": x,
                             "y": y, "tile": tile, "n_normal_px": int((m == 1).sum()),
                             "n_sclerosed_px": int((m == 2).sum()), "synthetic": False,
                             "image": f"images/{pid}.png", "mask": f"masks/{pid}.png"})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / "manifest.csv", index=False)
    return image, labels


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops-ds") / "data"
    image, labels = build_dataset(root)
    return root, image, labels


def test_crops_one_per_glomerulus_centred_with_only_its_mask(hand_dataset, tmp_path):
    root, image, labels = hand_dataset
    summary = make_crops(root, tmp_path / "crops", CropSettings(size=128, test_fraction=0.25, seed=0))
    m = summary.manifest
    # 4 whole sclerosed glomeruli, each once although it lies in up to 4 overlapping patches;
    # the validation slide's copies are not used; the one crossing the slide edge is only counted
    assert len(m) == 4 and set(m.slide) == {"s"}
    assert summary.census.instances > 4 and summary.census.cut_only == 1 and summary.census.total == 5
    assert (m.split == "test").sum() == 1
    for cx, cy, r in SCLEROSED_DISCS:
        row = m.loc[((m.slide_cx - cx) ** 2 + (m.slide_cy - cy) ** 2).idxmin()]
        assert math.hypot(row.slide_cx - cx, row.slide_cy - cy) < 1.0
        assert r <= row.radius <= r + 1.5
        mask = read_crops(tmp_path / "crops", None)[list(m.crop_id).index(row.crop_id)][1]
        # the mask is exactly this disc (in slide coordinates), nothing else
        sx0 = int(row.slide_cx - row.cx) + row.x0
        sy0 = int(row.slide_cy - row.cy) + row.y0
        expected = disc(labels.shape, cx, cy, r)[sy0:sy0 + 128, sx0:sx0 + 128]
        assert np.array_equal(mask, expected) and row.mask_px == expected.sum()
        ys, xs = np.nonzero(mask)
        if cx - 64 >= 0:  # not clamped: the disc sits in the crop's centre
            assert (xs.mean() + 0.5, ys.mean() + 0.5) == pytest.approx((64, 64), abs=1.0)
        else:  # clamped at the patch's left border
            assert row.x0 == 0
    near = m.loc[((m.slide_cx - 300) ** 2 + (m.slide_cy - 260) ** 2).idxmin()]
    assert near.other_glomeruli_px > 0  # the normal glomerulus next to it stays in the image only
    crops = read_crops(tmp_path / "crops", "train")
    assert len(crops) == 3 and all(i.shape == (128, 128, 3) and k.shape == (128, 128) and k.dtype == bool
                                   for i, k in crops)
    img = read_crops(tmp_path / "crops", None)[0][0]
    r0 = m.iloc[0]
    src = image[int(r0.slide_cy - r0.cy) + r0.y0:][:128, int(r0.slide_cx - r0.cx) + r0.x0:][:, :128]
    assert np.array_equal(img, src)


def test_crops_skip_glomeruli_wider_than_the_crop(hand_dataset, tmp_path):
    root, _, _ = hand_dataset
    summary = make_crops(root, tmp_path / "crops", CropSettings(size=64))
    assert summary.too_large == 1 and len(summary.manifest) == 3


def test_crops_without_sclerosed_glomeruli_is_a_clear_error(hand_dataset, tmp_path):
    root, _, _ = hand_dataset
    m = pd.read_csv(root / "manifest.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "images").symlink_to(root / "images")
    (empty / "masks").symlink_to(root / "masks")
    m[m.n_sclerosed_px == 0].to_csv(empty / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="no sclerosed glomeruli"):
        make_crops(empty, tmp_path / "crops")
