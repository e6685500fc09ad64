"""OUT/<slide>/viewer.html: the review page's files, its link from index.html, the --viewer flag,
and the corrections file read back by prepare and evaluate results (without a browser; the page
itself in a real browser: tests/test_viewer_browser.py)."""

import json
import re
import shutil
import time
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import pyvips
from click.testing import CliRunner

from glomscan import batch as batch_module
from glomscan import viewer
from glomscan.batch import load_report, run_batch
from glomscan.cli import main
from glomscan.config import AnalysisSettings
from glomscan.pipeline import sclerosis_summary
from glomscan.labels import QUPATH_CLASS_NAMES
from glomscan.imaging import read_png
from glomscan.qupath import read_qupath_geojson, read_qupath_points
from glomscan.train.settings import DEFAULT_CLASS_MAP
from glomscan.viewer import CORRECTION_CLASS_NAMES, REJECTED_COLOUR, VIEWER_DIR, VIEWER_PAGE

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


VERIFIER_P = {"verifier_p_not_glomerulus": 0.83, "verifier_p_normal": 0.12, "verifier_p_sclerosed": 0.05}


def reject_by_verifier(src, dst, gid: int) -> tuple[int, str]:
    """A copy of the analysed slide folder ``src`` as if the verifier had rejected glomerulus
    ``gid``: its feature moved from glomeruli.geojson to rejected.geojson (as analyze writes it:
    "Not glomerulus", glomscan.candidate_class, the id after the accepted ones, verifier
    probabilities), report.json's counts without it, the page written again. Returns the
    candidate's id and class."""
    shutil.copytree(src, dst)
    geo = json.loads((dst / "glomeruli.geojson").read_text())
    n = len(geo["features"])
    feature = next(f for f in geo["features"] if f["properties"]["measurements"]["glomscan id"] == gid)
    geo["features"].remove(feature)
    props = feature["properties"]
    cls = {v: k for k, v in QUPATH_CLASS_NAMES.items()}[props["classification"]["name"]]
    new_id = n + 1
    props["name"] = f"rejected candidate {new_id}"
    props["classification"] = {"name": CORRECTION_CLASS_NAMES["rejected"], "color": list(REJECTED_COLOUR)}
    props["glomscan"] = {"candidate_class": cls, "rejected_by": "verifier"}
    props["measurements"].update({"glomscan id": new_id, **VERIFIER_P})
    (dst / "glomeruli.geojson").write_text(json.dumps(geo))
    (dst / "rejected.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    report = load_report(dst)
    setattr(report, f"n_{cls}", getattr(report, f"n_{cls}") - 1)
    report.n_glomeruli -= 1
    report.n_candidates, report.n_rejected = n, 1
    (report.percent_global_glomerulosclerosis, report.ci95_low,
     report.ci95_high) = sclerosis_summary(report.n_normal, report.n_sclerosed)
    (dst / "report.json").write_text(report.to_json())
    size = page_data(src / VIEWER_PAGE)
    viewer.write_viewer_page(dst, report, size["width"], size["height"], time.perf_counter())
    return new_id, cls


def test_page_data_lists_the_candidates_the_verifier_rejected_uncounted(out, tmp_path):
    before = page_data(out / "case01" / VIEWER_PAGE)
    assert all(g["rejected_by"] is None for g in before["glomeruli"])  # no rejected.geojson: none
    gid = next(g["id"] for g in before["glomeruli"] if g["class"] == "normal")
    folder = tmp_path / "case01"
    new_id, cls = reject_by_verifier(out / "case01", folder, gid)
    assert cls == "normal"
    data = page_data(folder / VIEWER_PAGE)
    assert data == viewer.page_data(folder, load_report(folder), data["width"], data["height"])
    listed = {g["id"]: g for g in data["glomeruli"]}
    # every candidate once: the accepted ones as they were, the rejected one after them
    assert len(data["glomeruli"]) == len(before["glomeruli"]) and gid not in listed
    assert [g["id"] for g in data["glomeruli"]][-1] == new_id
    candidate = listed[new_id]
    assert candidate["rejected_by"] == "verifier" and candidate["class"] == "normal"
    assert [g["rejected_by"] for g in data["glomeruli"]].count("verifier") == 1
    assert candidate["ring"] == next(g["ring"] for g in before["glomeruli"] if g["id"] == gid)
    assert candidate["measurements"]["verifier_p_not_glomerulus"] == 0.83
    assert "glomscan id" not in candidate["measurements"]
    # the analysed counts are report.json's: the rejected candidate is not in them
    report = json.loads((folder / "report.json").read_text())
    assert data["analysed"]["n_normal"] == report["n_normal"] == before["analysed"]["n_normal"] - 1
    assert data["analysed"]["n_sclerosed"] == before["analysed"]["n_sclerosed"]
    assert data["analysed"]["percent"] == report["percent_global_glomerulosclerosis"] != before["analysed"]["percent"]
    # an empty rejected.geojson: nothing more
    (folder / "rejected.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    empty = viewer.page_data(folder, load_report(folder), data["width"], data["height"])
    assert [g["id"] for g in empty["glomeruli"]] == [g["id"] for g in data["glomeruli"]][:-1]


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

    def broken(folder, image):
        (folder / VIEWER_DIR).mkdir()
        (folder / VIEWER_DIR / "partial.jpg").write_bytes(b"x")
        raise pyvips.Error("dzsave: out of luck")

    monkeypatch.setattr(glomscan.viewer, "write_viewer_tiles", broken)
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


def corrections(data, changes: dict, rejected: set, added: list) -> dict:
    """A corrections file as the page writes it (tests/test_viewer_browser.py checks the page
    writes this shape): every glomerulus with its reviewed class, false detections as "Not
    glomerulus", added ones as points or outlines."""
    names = data["class_names"]
    features = []
    for g in data["glomeruli"]:
        cls = "rejected" if g["id"] in rejected else changes.get(g["id"], g["class"])
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [g["ring"]]},
                         "properties": {"objectType": "annotation", "classification": {"name": names[cls]}}})
    for cls, geometry in added:
        features.append({"type": "Feature", "geometry": geometry,
                         "properties": {"objectType": "annotation", "classification": {"name": names[cls]}}})
    return {"type": "FeatureCollection", "features": features}


def prepared_label_at(dataset, x0: float, y0: float, downsample: float = 2.0):
    """The prepared label at level-0 (x0, y0), from the first patch that holds it (None: no patch)."""
    manifest = pd.read_csv(dataset / "manifest.csv")
    x, y = x0 / downsample, y0 / downsample
    for row in manifest.itertuples():
        if row.x <= x < row.x + row.tile and row.y <= y < row.y + row.tile:
            return int(read_png(dataset / row.mask)[int(y - row.y), int(x - row.x), 0])
    return None


def centre(g):
    ring = np.asarray(g["ring"])
    return ring[:, 0].mean(), ring[:, 1].mean()


def test_corrections_file_feeds_prepare_and_evaluate(out, small_slide, tmp_path):
    data = page_data(out / "case01" / VIEWER_PAGE)
    glomeruli = {g["id"]: g for g in data["glomeruli"]}
    normal = [i for i, g in glomeruli.items() if g["class"] == "normal"]
    changed, rejected = normal[0], normal[1]
    # a missed glomerulus outlined, one marked by a point: in tissue, in patches (1024 level-0 px
    # apart) of their own, the point more than 150 µm (300 px) from any other patch
    outline = [[1850, 1150], [2000, 1150], [2000, 1300], [1850, 1300], [1850, 1150]]
    point = [2450, 450]
    added = [("sclerosed", {"type": "Polygon", "coordinates": [outline]})]
    truth, no_point = tmp_path / "truth", tmp_path / "no-point"
    truth.mkdir(), no_point.mkdir()
    fc = corrections(data, {changed: "sclerosed"}, {rejected}, added)
    (no_point / "case01.geojson").write_text(json.dumps(fc))
    fc = corrections(data, {changed: "sclerosed"}, {rejected}, added + [("normal", {"type": "Point", "coordinates": point})])
    (truth / "case01.geojson").write_text(json.dumps(fc))
    polygons, skipped = read_qupath_geojson(truth / "case01.geojson", DEFAULT_CLASS_MAP)
    assert skipped == {} and len(polygons) == len(TEST_GLOMERULI) - 1 + 1
    assert [(p.label, p.x, p.y) for p in read_qupath_points(truth / "case01.geojson", DEFAULT_CLASS_MAP)] == [(1, *point)]

    for annotations, dataset in ((truth, "set"), (no_point, "set-no-point")):
        res = CliRunner().invoke(main, ["prepare", "--slides", str(small_slide.path.parent), "--annotations",
                                        str(annotations), "--out", str(tmp_path / dataset), "--tile", "512",
                                        "--stride", "512"])
        assert res.exit_code == 0, res.output
    assert prepared_label_at(tmp_path / "set", *centre(glomeruli[changed])) == 2  # the reviewed class
    assert prepared_label_at(tmp_path / "set", *centre(glomeruli[rejected])) == 0  # a false detection: background
    assert prepared_label_at(tmp_path / "set", 1925, 1225) == 2  # the added outline
    # the patch around a point-only glomerulus is left out (and only that one)
    assert prepared_label_at(tmp_path / "set-no-point", *point) == 0 and prepared_label_at(tmp_path / "set", *point) is None
    assert len(pd.read_csv(tmp_path / "set" / "manifest.csv")) == len(pd.read_csv(tmp_path / "set-no-point" / "manifest.csv")) - 1
    kept = [i for i in glomeruli if i not in (changed, rejected)]
    assert all(prepared_label_at(tmp_path / "set", *centre(glomeruli[i])) == (2 if glomeruli[i]["class"] == "sclerosed" else 1)
               for i in kept)

    res = CliRunner().invoke(main, ["evaluate", "results", "--results", str(out), "--truth", str(truth),
                                    "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(tmp_path / "eval.csv").iloc[0]
    # truth: 6 detected - 1 false + 1 outlined + 1 point; the analysis found 6, of which 5 are true
    assert row.n_true == len(TEST_GLOMERULI) + 1 and row.n_predicted == len(TEST_GLOMERULI)
    assert row.matched == len(TEST_GLOMERULI) - 1 and row.class_agreement == len(TEST_GLOMERULI) - 2
    n_scl = sum(g.sclerosed for g in TEST_GLOMERULI) + 2  # the changed one and the outline
    assert row.sclerosis_pct_true == pytest.approx(100 * n_scl / (len(TEST_GLOMERULI) + 1))


def test_evaluate_matches_a_point_inside_a_detection():
    from glomscan.train.evaluation.metrics import instance_matches, sclerosis_percent

    pred = np.zeros((40, 40), np.uint8)
    pred[5:15, 5:15] = 2
    pred[25:35, 25:35] = 1
    truth = np.zeros_like(pred)
    truth[5:15, 5:15] = 2
    # one point inside the unmatched detection (class agrees), one inside the matched one, one in nothing
    got = instance_matches(pred, truth, true_points=[(30, 30, 1), (10, 10, 2), (20, 2, 2)])
    assert (got["n_true"], got["matched"], got["class_agreement"]) == (4, 2, 2)
    assert sclerosis_percent(truth, [(30, 30, 1), (20, 2, 2)]) == pytest.approx(200 / 3)
