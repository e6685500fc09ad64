import json

import numpy as np
import openslide
import pandas as pd
import pyvips
import pytest

from glomscan.postprocess import Glomerulus
from glomscan.report import (
    StreamedLabelFile,
    glomeruli_geojson,
    glomeruli_table,
    polygon_mask,
    wilson_interval,
    write_mask_tiff,
    write_overview,
)


@pytest.mark.parametrize("k,n,lo,hi", [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
                                       (1, 4, 0.0456, 0.6994)])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_wilson_interval_without_glomeruli():
    assert wilson_interval(0, 0) == (None, None)


@pytest.mark.parametrize("pgm_loader", ["ppmload_source", "raw fallback"])
def test_label_tiff_reads_back_identically(tmp_path, monkeypatch, pgm_loader):
    if pgm_loader != "ppmload_source":  # a libvips without the PPM source loader (pyvips-binary)
        monkeypatch.setattr("glomscan.report.PGM_SOURCE_LOADER", "no_such_loader_source")
    rng = np.random.default_rng(0)
    labels = np.zeros((900, 1300), np.uint8)
    labels[100:300, 200:500] = 1
    labels[500:800, 700:1000] = 2
    labels[rng.random(labels.shape) > 0.999] = 2
    raw = StreamedLabelFile(tmp_path / "m.pgm", 1300, 900)
    for y in range(0, 900, 256):
        raw.write_rows(y, labels[y:y + 256])
    out = tmp_path / "mask.tif"
    write_mask_tiff(raw.image(), out, analysis_mpp=1.0)
    raw.close()
    via_vips = pyvips.Image.tiffload(str(out), page=0)
    arr = np.frombuffer(via_vips.write_to_memory(), np.uint8).reshape(900, 1300)
    assert np.array_equal(arr, labels)
    assert via_vips.xres == pytest.approx(1000.0)  # pixels per mm = 1 µm/px
    assert via_vips.get("n-pages") >= 3  # pyramid
    # pyramid levels hold only label values (mode, never averaged)
    level2 = pyvips.Image.tiffload(str(out), page=2)
    assert set(np.unique(np.frombuffer(level2.write_to_memory(), np.uint8))) <= {0, 1, 2}
    slide = openslide.OpenSlide(str(out))
    assert slide.dimensions == (1300, 900) and slide.level_count >= 3
    region = np.asarray(slide.read_region((0, 0), 0, (1300, 900)))
    assert np.array_equal(region[..., 0], labels)
    assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
    assert float(slide.properties["tiff.XResolution"]) == pytest.approx(10000.0)


def square_glomerulus(gid, cls, x0, y0, size):
    contour = [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size), (x0, y0)]
    label = 1 if cls == "normal" else 2
    return Glomerulus(gid, label, cls, 0.9, (0.9, 0.1) if label == 1 else (0.1, 0.9), size * size,
                      (x0 + size / 2, y0 + size / 2), (x0, y0, x0 + size, y0 + size),
                      [(float(x), float(y)) for x, y in contour])


def test_table_and_geojson_in_level0_pixels():
    gloms = [square_glomerulus(1, "normal", 10, 20, 100), square_glomerulus(2, "sclerosed", 300, 50, 80)]
    table = glomeruli_table(gloms, scale=2.0, analysis_mpp=1.0)
    row = table.iloc[1]
    assert row["class"] == "sclerosed"
    assert row["area_px"] == 80 * 80 * 4 and row["area_um2"] == 6400
    assert (row["centroid_x"], row["centroid_y"]) == (680, 180)
    assert (row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]) == (600, 100, 760, 260)
    assert row["equivalent_diameter_um"] == pytest.approx(2 * np.sqrt(6400 / np.pi), abs=0.1)
    gj = glomeruli_geojson(gloms, table, scale=2.0)
    json.dumps(gj)
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    f = gj["features"][1]
    assert f["geometry"]["type"] == "Polygon"
    assert f["geometry"]["coordinates"][0][0] == [600.0, 100.0]
    assert f["properties"]["objectType"] == "detection"
    assert f["properties"]["classification"] == {"name": "Glomerulus sclerosed", "color": [230, 30, 30]}
    assert f["properties"]["measurements"]["area_um2"] == 6400


def test_table_without_mpp_leaves_um_empty():
    table = glomeruli_table([square_glomerulus(1, "normal", 0, 0, 10)], scale=2.0, analysis_mpp=None)
    assert pd.isna(table.iloc[0]["area_um2"]) and table.iloc[0]["area_px"] == 400
    assert ",," in table.to_csv(index=False).splitlines()[1]  # an empty cell, not nan or None


def test_overview_draws_class_colours(tmp_path):
    thumb = np.full((100, 120, 3), 240, np.uint8)
    gloms = [square_glomerulus(1, "normal", 40, 40, 80), square_glomerulus(2, "sclerosed", 160, 40, 60)]
    write_overview(thumb, 2.0, gloms, tmp_path / "o.png")
    im = pyvips.Image.new_from_file(str(tmp_path / "o.png"))
    arr = np.frombuffer(im.write_to_memory(), np.uint8).reshape(100, 120, 3)
    assert arr[40, 40, 2] > arr[40, 40, 0]  # blue-ish inside the normal one
    assert arr[35, 95, 0] > arr[35, 95, 2]  # red-ish inside the sclerosed one
    assert (arr[5, 5] == 240).all()


def pnpoly_mask(rows, cols, shape):
    """Reference: the PNPOLY crossing test at every pixel centre."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    inside = np.zeros(shape, bool)
    for i in range(len(rows)):
        j = (i + 1) % len(rows)
        crosses = (rows[i] > yy) != (rows[j] > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = (cols[j] - cols[i]) * (yy - rows[i]) / (rows[j] - rows[i]) + cols[i]
        inside ^= crosses & (xx < x)
    return inside


def test_polygon_fill_matches_the_crossing_test_pixel_for_pixel():
    """Convex, star-shaped, self-intersecting, integer-vertex and partly outside polygons."""
    rng = np.random.default_rng(1)
    for k in range(120):
        n = int(rng.integers(3, 40))
        angles, radii = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(5, 30, n)
        cy, cx = rng.uniform(-10, 70, 2)
        rows, cols = cy + radii * np.sin(angles), cx + radii * np.cos(angles)
        if k % 3 == 0:
            rows, cols = np.round(rows), np.round(cols)
        if k % 5 == 0:
            rows, cols = rng.uniform(-5, 60, n), rng.uniform(-5, 60, n)
        assert np.array_equal(polygon_mask(rows, cols, (60, 70)), pnpoly_mask(rows, cols, (60, 70))), k


def test_polygon_fill_of_a_slide_sized_outline():
    """A false detection the size of a tissue island (hundreds of vertices, millions of pixels)."""
    t = np.linspace(0, 2 * np.pi, 342, endpoint=False)
    rows, cols = 800 + 700 * np.sin(t) + 30 * np.sin(7 * t), 1000 + 900 * np.cos(t)
    inside = polygon_mask(rows, cols, (1600, 2000))
    assert abs(int(inside.sum()) - np.pi * 700 * 900) < 0.01 * np.pi * 700 * 900
    assert inside[800, 1000] and not inside[5, 5] and not inside[800, 1950]
    assert not polygon_mask([1.0, 2.0], [1.0, 2.0], (5, 5)).any()  # fewer than 3 vertices


def test_qupath_geojson_written_and_read_in_one_module(tmp_path):
    """What glomscan writes QuPath reads back the same way: a polygon feature with its class
    name (and colour), a FeatureCollection, a list or a single feature on disk; class names from
    the classification (object or old string form) else the name; unmapped classes counted,
    background-mapped ones left out on purpose, points read apart."""
    import json

    from glomscan.qupath import (classification_name, feature_collection, polygon_feature, read_features,
                                 read_qupath_geojson, read_qupath_points, write_geojson)

    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    written = feature_collection([
        polygon_feature([square], "Glomerulus (normal)", colour=(1, 2, 3), object_type="detection", name="g1",
                        properties={"measurements": {"area": 100.0}}),
        polygon_feature([square], "Tubule"),
        polygon_feature([square], "Not glomerulus"),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]},
         "properties": {"classification": "Glomerulus (sclerosed)"}},
    ])
    write_geojson(written, tmp_path / "a.geojson")
    features = read_features(tmp_path / "a.geojson")
    assert features == written["features"]
    assert [classification_name(f) for f in features] == ["Glomerulus (normal)", "Tubule", "Not glomerulus",
                                                           "Glomerulus (sclerosed)"]
    assert features[0]["properties"]["classification"] == {"name": "Glomerulus (normal)", "color": [1, 2, 3]}
    class_map = {"glomerulus (normal)": 1, "glomerulus (sclerosed)": 2, "not glomerulus": 0}
    polygons, skipped = read_qupath_geojson(tmp_path / "a.geojson", class_map)
    assert [p.label for p in polygons] == [1] and skipped == {"Tubule": 1}
    assert [(p.label, p.x, p.y) for p in read_qupath_points(tmp_path / "a.geojson", class_map)] == [(2, 5.0, 6.0)]
    (tmp_path / "list.geojson").write_text(json.dumps(written["features"][:1]))
    (tmp_path / "one.geojson").write_text(json.dumps(written["features"][0]))
    assert read_features(tmp_path / "list.geojson") == read_features(tmp_path / "one.geojson") == features[:1]
