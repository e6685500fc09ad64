"""Every file is accounted for: images in any colour model are analysed correctly or fail with
the real reason; links that point nowhere are reported; a failed slide's report keeps what was
known about it."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import pyvips

from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings
from glomscan.imaging import image_to_array
from glomscan.slides import Slide, TileReader
from glomscan.synthetic import write_synthetic_slide

from conftest import ORACLE_CHOICE, TEST_GLOMERULI, TEST_TISSUE, OracleEngine, oracle_model

FAST = AnalysisSettings(tile=256, overlap=128, batch_size=4)


@pytest.fixture(scope="module")
def rgb_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("colour")
    slide = write_synthetic_slide(d / "rgb.tif", 3600, 3200, TEST_GLOMERULI, TEST_TISSUE, mpp=0.5, seed=1,
                                  pyramid=False)
    return slide


def _variant(src: pyvips.Image, kind: str) -> pyvips.Image:
    if kind == "rgba":
        return src.bandjoin(255)
    if kind == "rgb16":
        return src.colourspace("rgb16")
    if kind == "cmyk":
        return src.colourspace("cmyk")
    if kind == "grey":
        return src.colourspace("b-w")
    if kind == "grey-alpha":
        return src.colourspace("b-w").bandjoin(255)
    raise ValueError(kind)


def _read_centre(path):
    slide = Slide(path, mpp_override=0.5)
    image, _ = slide.image_at(2.0)
    return TileReader(image, 256).read(256, 256)


@pytest.mark.parametrize("kind,max_error", [("rgba", 0.5), ("rgb16", 1.0), ("cmyk", 25.0)])
def test_colour_models_read_as_the_rgb_they_hold(rgb_slide, tmp_path, kind, max_error):
    src = pyvips.Image.new_from_file(str(rgb_slide.path))
    path = tmp_path / f"{kind}.tif"
    _variant(src, kind).tiffsave(str(path), tile=True, compression="deflate", xres=2000.0, yres=2000.0)
    reference, got = _read_centre(rgb_slide.path).astype(float), _read_centre(path).astype(float)
    assert got.shape == reference.shape
    assert np.abs(got - reference).mean() <= max_error, kind


def test_palette_png_is_expanded_to_rgb(rgb_slide, tmp_path):
    src = pyvips.Image.new_from_file(str(rgb_slide.path)).crop(0, 0, 800, 800)
    path = tmp_path / "palette.png"
    src.pngsave(str(path), palette=True)
    got = image_to_array(Slide(path, mpp_override=1.0).image_at(1.0)[0])
    assert got.shape == (800, 800, 3)
    assert np.abs(got.astype(float) - image_to_array(src).astype(float)).mean() < 12  # quantised to 256 colours


def test_batch_accounts_for_every_file_with_real_reasons(rgb_slide, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    src = pyvips.Image.new_from_file(str(rgb_slide.path))
    for kind in ("rgb16", "cmyk", "grey", "grey-alpha"):
        _variant(src, kind).tiffsave(str(slides / f"{kind}.tif"), tile=True, compression="deflate",
                                     xres=2000.0, yres=2000.0)
    os.symlink(tmp_path / "moved-away.svs", slides / "dangling.svs")
    outcome = run_batch(slides, tmp_path / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE, FAST, quiet=True)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("slide")
    assert set(summary.index) == {"rgb16", "cmyk", "grey", "grey-alpha", "dangling"}
    assert summary.loc["rgb16", "status"] == "ok"
    assert summary.loc["rgb16", "n_glomeruli"] == len(TEST_GLOMERULI)  # 16-bit: same glomeruli as 8-bit
    assert summary.loc["cmyk", "status"] == "ok"
    for grey in ("grey", "grey-alpha"):
        assert summary.loc[grey, "status"] == "failed"
        assert summary.loc[grey, "reason"].startswith("greyscale image"), summary.loc[grey, "reason"]
    assert summary.loc["dangling", "status"] == "failed"
    assert "link points nowhere" in summary.loc["dangling", "reason"]
    # the failed report keeps what was known before the failure
    report = json.loads((tmp_path / "out" / "grey" / "report.json").read_text())
    assert (report["width"], report["height"]) == (3600, 3200) and report["n_levels"] == 1
    assert report["mpp"] == pytest.approx(0.5) and report["mpp_source"] == "metadata"
    assert report["n_glomeruli"] is None and report["percent_global_glomerulosclerosis"] is None
    assert len(outcome.failed) == 3
