"""End to end through the batch runner with an oracle engine that returns the true masks."""

import hashlib
import json

import numpy as np
import pandas as pd
import pyvips
import pytest

from glomscan.batch import STAGING, run_batch
from glomscan.config import AnalysisSettings
from glomscan.report import wilson_interval
from glomscan.synthetic import write_synthetic_slide

from conftest import ORACLE_CHOICE, TEST_GLOMERULI, OracleEngine, copy_slide, oracle_model

FAST = AnalysisSettings(tile=256, overlap=128, batch_size=4, workers=2)


def analyze(slides_dir, out_dir, settings=FAST, engine=None, **kw):
    engine = engine or OracleEngine()
    outcome = run_batch(slides_dir, out_dir, oracle_model(), engine, ORACLE_CHOICE, settings, quiet=True, **kw)
    return outcome, engine


@pytest.fixture(scope="module")
def oracle_run(small_slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    copy_slide(small_slide.path, root / "slides")
    outcome, _ = analyze(root / "slides", root / "out")
    return root / "out", outcome


def test_counts_classes_and_percent(oracle_run):
    out, outcome = oracle_run
    assert not outcome.failed
    report = json.loads((out / "case01" / "report.json").read_text())
    assert report["status"] == "ok"
    n_scl = sum(g.sclerosed for g in TEST_GLOMERULI)
    assert report["n_glomeruli"] == len(TEST_GLOMERULI)
    assert report["n_sclerosed"] == n_scl
    assert report["percent_global_glomerulosclerosis"] == pytest.approx(100 * n_scl / len(TEST_GLOMERULI), abs=0.01)
    lo, hi = wilson_interval(n_scl, len(TEST_GLOMERULI))
    assert report["ci95_low"] == pytest.approx(100 * lo, abs=0.01) and report["ci95_high"] == pytest.approx(100 * hi, abs=0.01)
    assert report["mpp"] == 0.5 and report["analysis_mpp"] == 1.0 and report["pyramid_level"] == 1
    assert report["tiles_tissue"] < report["tiles_total"]  # glass around the tissue is skipped
    # tissue rectangle 2300 x 2750 level-0 px at 0.5 µm/px = 1.58 mm²
    assert report["tissue_area_mm2"] == pytest.approx(2300 * 2750 * 0.25 / 1e6, rel=0.08)
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "slide"] == "case01" and summary.loc[0, "status"] == "ok"
    assert summary.loc[0, "n_sclerosed"] == n_scl


def test_csv_matches_known_discs(oracle_run):
    out, _ = oracle_run
    table = pd.read_csv(out / "case01" / "glomeruli.csv")
    assert len(table) == len(TEST_GLOMERULI)
    for g in TEST_GLOMERULI:
        d = np.hypot(table.centroid_x - g.x, table.centroid_y - g.y)
        row = table.iloc[int(d.argmin())]
        assert d.min() < 3.0, "centroid in level-0 px"
        assert row["class"] == ("sclerosed" if g.sclerosed else "normal")
        assert row.area_px == pytest.approx(np.pi * g.radius**2, rel=0.06)
        assert row.area_um2 == pytest.approx(np.pi * g.radius**2 * 0.25, rel=0.06)
        assert row.equivalent_diameter_um == pytest.approx(g.radius, rel=0.04)  # 2r * 0.5 µm/px
        assert row.bbox_x0 <= g.x - g.radius + 3 and row.bbox_x1 >= g.x + g.radius - 3
        assert 0.9 < row.class_probability <= 1.0


def test_geojson_polygons_outline_the_discs(oracle_run):
    out, _ = oracle_run
    gj = json.loads((out / "case01" / "glomeruli.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(TEST_GLOMERULI)
    for f in gj["features"]:
        ring = np.asarray(f["geometry"]["coordinates"][0])
        cx, cy = ring[:-1].mean(axis=0)
        g = min(TEST_GLOMERULI, key=lambda g: np.hypot(g.x - cx, g.y - cy))
        radii = np.hypot(ring[:, 0] - g.x, ring[:, 1] - g.y)
        assert np.abs(radii - g.radius).max() < 6  # level-0 px
        expected = "Glomerulus sclerosed" if g.sclerosed else "Glomerulus normal"
        assert f["properties"]["classification"]["name"] == expected


def test_mask_tiff_matches_truth(oracle_run, small_slide):
    out, _ = oracle_run
    mask = pyvips.Image.tiffload(str(out / "case01" / "mask.tif"), page=0)
    assert (mask.width, mask.height) == (1800, 1600)
    assert mask.xres == pytest.approx(1000.0)
    labels = np.frombuffer(mask.write_to_memory(), np.uint8).reshape(1600, 1800)
    truth = small_slide.label_image(2.0)
    for cls in (1, 2):
        a, b = labels == cls, truth == cls
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.97, (cls, dice)
    assert (out / "case01" / "overview.png").stat().st_size > 0
    assert not (out / STAGING).exists() and not (out / ".glomscan.lock").exists()  # a finished folder holds results only


def test_same_result_with_paper_tile_size(oracle_run, tmp_path):
    out, _ = oracle_run
    slides = out.parent / "slides"
    outcome, _ = analyze(slides, tmp_path / "out", AnalysisSettings(tile=1024, overlap=512))
    a = pd.read_csv(out / "case01" / "glomeruli.csv")
    b = pd.read_csv(tmp_path / "out" / "case01" / "glomeruli.csv")
    assert len(a) == len(b) and (a["class"].values == b["class"].values).all()
    assert np.allclose(a.area_px, b.area_px, rtol=0.01)


def file_state(folder):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_resume_skips_complete_and_redoes_changed(small_slide, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    inputs_before = file_state(slides)
    out = tmp_path / "out"
    first, engine = analyze(slides, out)
    assert engine.calls > 0
    report_mtime = (out / "case01" / "report.json").stat().st_mtime_ns
    again, engine = analyze(slides, out)
    assert engine.calls == 0 and again.skipped == ["case01"]
    assert (out / "case01" / "report.json").stat().st_mtime_ns == report_mtime
    assert pd.read_csv(out / "summary.csv").loc[0, "skipped"] == "yes"
    # other settings -> redo; --force -> redo
    _, engine = analyze(slides, out, AnalysisSettings(tile=256, overlap=128, min_glomerulus_area_um2=500))
    assert engine.calls > 0
    _, engine = analyze(slides, out, AnalysisSettings(tile=256, overlap=128, min_glomerulus_area_um2=500), force=True)
    assert engine.calls > 0
    assert file_state(slides) == inputs_before  # inputs never written


def test_failures_are_reported_and_batch_goes_on(small_slide, tmp_path):
    slides = tmp_path / "slides"
    good = copy_slide(small_slide.path, slides, "good.tif")
    (slides / "empty.svs").write_bytes(b"")
    (slides / "notes.tif").write_text("not an image at all")
    data = good.read_bytes()
    (slides / "truncated.tif").write_bytes(data[: len(data) // 3])
    write_synthetic_slide(slides / "glass.tif", 1200, 1000, [], tissue=[], mpp=0.5)
    outcome, _ = analyze(slides, tmp_path / "out")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("slide")
    assert summary.loc["good", "status"] == "ok"
    assert set(summary.index[summary.status == "failed"]) == {"empty", "notes", "truncated", "glass"}
    assert "empty file" in summary.loc["empty", "reason"]
    assert summary.loc["glass", "reason"] == "no tissue detected"
    assert all(isinstance(r, str) and r for r in summary.loc[summary.status == "failed", "reason"])
    assert len(outcome.failed) == 4
    for name in ("empty", "notes", "truncated", "glass"):
        rep = json.loads((tmp_path / "out" / name / "report.json").read_text())
        assert rep["status"] == "failed" and not (tmp_path / "out" / name / "mask.tif").exists()
    # failed slides are retried on the next run, the good one is skipped
    again, engine = analyze(slides, tmp_path / "out")
    assert again.skipped == ["good"] and len(again.failed) == 4


def test_unknown_mpp_uses_downsample_and_pixel_areas(tmp_path):
    slides = tmp_path / "slides"
    write_synthetic_slide(slides.mkdir() or slides / "nompp.tif", 2000, 1600, TEST_GLOMERULI[:2],
                          tissue=[(200, 200, 1900, 1500)], mpp=None)
    outcome, _ = analyze(slides, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "nompp" / "report.json").read_text())
    assert report["mpp_source"] == "unknown" and report["analysis_mpp"] is None
    assert report["analysis_downsample"] == 2.0 and report["n_glomeruli"] == 2
    table = pd.read_csv(tmp_path / "out" / "nompp" / "glomeruli.csv")
    assert table.area_um2.isna().all() and (table.area_px > 0).all()
    # with --mpp the areas come back in µm²
    analyze(slides, tmp_path / "out2", AnalysisSettings(tile=256, overlap=128, mpp_override=0.5))
    assert pd.read_csv(tmp_path / "out2" / "nompp" / "glomeruli.csv").area_um2.notna().all()


def test_second_batch_into_the_same_output_is_refused(small_slide, tmp_path):
    from glomscan.batch import output_lock

    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    (tmp_path / "out").mkdir()
    with output_lock(tmp_path / "out"):
        with pytest.raises(ValueError, match="another glomscan batch"):
            analyze(slides, tmp_path / "out")
    outcome, _ = analyze(slides, tmp_path / "out")  # free again afterwards
    assert not outcome.failed


def test_merge_workers_do_not_change_any_output(oracle_run, tmp_path):
    """Blending and labelling spread over threads give the same mask, table and outlines as the
    one-thread merge (the default run above uses one thread per CPU)."""
    out, _ = oracle_run
    slides = out.parent / "slides"
    for workers in (1, 3):
        analyze(slides, tmp_path / f"out{workers}", AnalysisSettings(tile=256, overlap=128, batch_size=4, workers=2,
                                                                     merge_workers=workers))
    for folder in (tmp_path / "out1", tmp_path / "out3", out):
        assert json.loads((folder / "case01" / "report.json").read_text())["status"] == "ok"
    for name in ("glomeruli.csv", "glomeruli.geojson"):
        reference = (tmp_path / "out1" / "case01" / name).read_bytes()
        assert (tmp_path / "out3" / "case01" / name).read_bytes() == reference
        assert (out / "case01" / name).read_bytes() == reference

    def mask(folder):
        return pyvips.Image.tiffload(str(folder / "case01" / "mask.tif"), page=0).write_to_memory()

    assert mask(tmp_path / "out3") == mask(tmp_path / "out1") == mask(out)
