"""OUT/<slide>/viewer.html: the review page's files, its link from index.html and the --viewer
flag (without a browser)."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import pyvips
from click.testing import CliRunner

from glomscan import batch as batch_module
from glomscan.batch import run_batch
from glomscan.cli import main
from glomscan.config import AnalysisSettings
from glomscan.viewer import VIEWER_DIR, VIEWER_PAGE

from conftest import ORACLE_CHOICE, TEST_GLOMERULI, OracleEngine, copy_slide, oracle_model

FAST = AnalysisSettings(tile=256, overlap=128, batch_size=4, workers=2)


def page_data(page):
    text = page.read_text()
    m = re.search(r'<script id="glomscan-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def out(small_slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    copy_slide(small_slide.path, root / "slides", "case01.tif")
    outcome = run_batch(root / "slides", root / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE, FAST, quiet=True)
    assert not outcome.failed
    return root / "out"


def test_viewer_page_pyramid_and_vendored_viewer(out):
    folder = out / "case01"
    page = folder / VIEWER_PAGE
    text = page.read_text()
    # only relative resources, all of them present
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert refs and all(not re.match(r"(https?:|file:|/)", r) for r in refs)
    assert all((folder / r).is_file() for r in refs), refs
    assert (folder / VIEWER_DIR / "LICENSE-openseadragon.txt").read_text().startswith("Copyright")
    assert "openseadragon 6.1.1" in (folder / VIEWER_DIR / "openseadragon.min.js").read_text()[:200]
    data = page_data(page)
    report = json.loads((folder / "report.json").read_text())
    mask = pyvips.Image.new_from_file(str(folder / "mask.tif"))
    # the pyramid is the slide at the analysis resolution: the size of the mask, dzsave's layout
    assert (data["width"], data["height"]) == (mask.width, mask.height) == (1800, 1600)
    dzi = (folder / VIEWER_DIR / "tiles.dzi").read_text()
    assert 'Width="1800"' in dzi and 'Height="1600"' in dzi and f'TileSize="{data["tiles"]["size"]}"' in dzi
    top = int(np.ceil(np.log2(1800)))
    tiles = folder / VIEWER_DIR / "tiles_files" / str(top)
    n_cols = -(-1800 // data["tiles"]["size"])
    assert (tiles / f"{n_cols - 1}_0.{data['tiles']['format']}").is_file()
    assert not (tiles / f"{n_cols}_0.{data['tiles']['format']}").exists()
    # the glomeruli of glomeruli.geojson, with their measurements; counts as report.json says
    assert len(data["glomeruli"]) == report["n_glomeruli"] == len(TEST_GLOMERULI)
    geo = json.loads((folder / "glomeruli.geojson").read_text())
    assert [g["ring"][0] for g in data["glomeruli"]] == [
        [round(x, 1), round(y, 1)] for x, y in (f["geometry"]["coordinates"][0][0] for f in geo["features"])]
    assert {g["class"] for g in data["glomeruli"]} == {"normal", "sclerosed"}
    assert all("class_probability" in g["measurements"] for g in data["glomeruli"])
    assert data["analysed"]["percent"] == report["percent_global_glomerulosclerosis"]
    assert data["downsample"] == report["analysis_downsample"] == 2.0


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs)["href"])


def test_index_links_each_viewer_and_no_viewer_leaves_none(out, small_slide, tmp_path):
    links = Links()
    links.feed((out / "index.html").read_text())
    assert "case01/viewer.html" in links.links
    # --no-viewer: same results, no viewer, no link; the setting is not part of the fingerprint
    assert AnalysisSettings(viewer=False).fingerprint() == AnalysisSettings().fingerprint()
    copy_slide(small_slide.path, tmp_path / "slides", "case01.tif")
    settings = AnalysisSettings(tile=256, overlap=128, batch_size=4, workers=2, viewer=False)
    run_batch(tmp_path / "slides", tmp_path / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE, settings, quiet=True)
    assert not (tmp_path / "out" / "case01" / VIEWER_PAGE).exists()
    assert not (tmp_path / "out" / "case01" / VIEWER_DIR).exists()
    assert "viewer.html" not in (tmp_path / "out" / "index.html").read_text()
    assert (tmp_path / "out" / "case01" / "glomeruli.csv").read_text() == (out / "case01" / "glomeruli.csv").read_text()


def test_a_failing_viewer_leaves_the_slide_ok_without_one(small_slide, tmp_path, monkeypatch, caplog):
    import glomscan.viewer

    def broken(folder, report, mpp_override=None):
        (folder / VIEWER_DIR).mkdir()
        (folder / VIEWER_DIR / "partial.jpg").write_bytes(b"x")
        raise pyvips.Error("dzsave: out of luck")

    monkeypatch.setattr(glomscan.viewer, "write_viewer", broken)
    copy_slide(small_slide.path, tmp_path / "slides", "case01.tif")
    outcome = run_batch(tmp_path / "slides", tmp_path / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE, FAST,
                        quiet=True)
    assert not outcome.failed
    folder = tmp_path / "out" / "case01"
    assert (folder / "report.json").is_file() and not (folder / VIEWER_DIR).exists()
    assert "no viewer" in caplog.text and "out of luck" in caplog.text
    assert batch_module.is_complete(folder, outcome.reports[0].fingerprint)


def test_analyze_has_a_viewer_flag():
    res = CliRunner().invoke(main, ["analyze", "--help"])
    assert res.exit_code == 0 and "--viewer / --no-viewer" in res.output
