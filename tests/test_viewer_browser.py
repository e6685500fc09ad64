"""The review page (OUT/<slide>/viewer.html) in a real headless Chromium, opened from the file
system as a pathologist opens it (file://, no server, no --allow-file-access-from-files), driven
by Playwright (PyPI `playwright`, the `test` extra) with the system Chromium (Debian package
`chromium`; .ci/run installs it; no Playwright browser download). Skips with the reason when
either is missing."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import pyvips
from click.testing import CliRunner

from glomscan.batch import run_batch
from glomscan.cli import main
from glomscan.config import AnalysisSettings
from glomscan.pipeline import sclerosis_summary
from glomscan.synthetic import NORMAL, SCLEROSED
from glomscan.labels import QUPATH_CLASS_NAMES
from glomscan.qupath import read_qupath_geojson
from glomscan.train.settings import DEFAULT_CLASS_MAP
from glomscan.viewer import CORRECTION_CLASS_NAMES, REJECTED_COLOUR, VIEWER_PAGE

from conftest import ORACLE_CHOICE, TEST_GLOMERULI, OracleEngine, copy_slide, oracle_model
from test_viewer import VERIFIER_P, centre, page_data, prepared_label_at, reject_by_verifier

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = os.environ.get("GLOMSCAN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; "
                                                          ".ci/run installs it)")
FAST = AnalysisSettings(tile=256, overlap=128, batch_size=4, workers=2)


@pytest.fixture(scope="module")
def out(small_slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer-browser")
    copy_slide(small_slide.path, root / "slides", "case01.tif")
    run_batch(root / "slides", root / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE, FAST, quiet=True)
    return root / "out"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def open_viewer(browser, folder):
    """A fresh page (fresh storage) with the viewer of a slide folder, every tile of the first
    view loaded; its context (close it)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((folder / VIEWER_PAGE).as_uri())
    page.wait_for_function("document.body.dataset.ready === '1' && window.glomscanViewer.world.getItemCount() === 1"
                           " && window.glomscanViewer.world.getItemAt(0).getFullyLoaded()", timeout=30_000)
    page.errors = errors
    return context, page


@pytest.fixture
def page(browser, out):
    context, page = open_viewer(browser, out / "case01")
    yield page
    context.close()


def on_screen(page, x0, y0):
    """Page coordinates of level-0 pixel (x0, y0) in the current view."""
    return page.evaluate("""([x, y]) => {
        const v = window.glomscanViewer, ds = JSON.parse(document.getElementById('glomscan-data').textContent).downsample;
        const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x / ds, y / ds));
        const r = v.element.getBoundingClientRect();
        return [r.left + p.x, r.top + p.y];
    }""", [x0, y0])


def test_viewer_loads_the_pyramid_and_draws_each_outline_on_its_glomerulus(page, out):
    body = page.evaluate("Object.assign({}, document.body.dataset)")
    assert int(body["tilesLoaded"]) > 0 and "tilesFailed" not in body and "openFailed" not in body, body
    assert page.errors == []
    assert int(body["outlines"]) == len(TEST_GLOMERULI)
    data = page_data(out / "case01" / VIEWER_PAGE)
    # the list: sclerosed first
    labels = page.locator("#list li .label").all_inner_texts()
    n_scl = sum(g.sclerosed for g in TEST_GLOMERULI)
    assert all("sclerosed" in t for t in labels[:n_scl]) and all("normal" in t for t in labels[n_scl:])
    # each outline encloses pixels of its glomerulus' colour in the rendered tiles
    shot = pyvips.Image.new_from_buffer(page.screenshot(), "")
    pixels = np.ndarray((shot.height, shot.width, shot.bands), np.uint8, shot.write_to_memory())
    for g in data["glomeruli"]:
        box = page.locator(f'svg.overlay polygon[data-key="g{g["id"]}"]').bounding_box()
        x, y = on_screen(page, *centre(g))
        assert box["x"] < x < box["x"] + box["width"] and box["y"] < y < box["y"] + box["height"]
        colour = np.median(pixels[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3, :3].reshape(-1, 3), axis=0)
        d_normal, d_scl = (np.linalg.norm(colour - np.asarray(c)) for c in (NORMAL, SCLEROSED))
        assert (d_scl < d_normal) == (g["class"] == "sclerosed"), (g["id"], colour)


def test_js_percent_and_wilson_interval_agree_with_python(page):
    pairs = [(k, n) for n in range(0, 121) for k in range(0, n + 1)] + [(97, 800), (1, 8), (3, 8), (5, 8), (7, 8)]
    js = page.evaluate("pairs => pairs.map(([k, n]) => { const s = window.glomscanSclerosisSummary(n - k, k);"
                       " return [s.percent, s.low, s.high]; })", pairs)
    py = [list(sclerosis_summary(n - k, k)) for k, n in pairs]
    assert js == py


def test_a_click_shows_measurements_and_a_class_change_updates_the_percent(page, out):
    data = page_data(out / "case01" / VIEWER_PAGE)
    table = pd.read_csv(out / "case01" / "glomeruli.csv").set_index("id")
    g = next(g for g in data["glomeruli"] if g["class"] == "normal")
    page.mouse.click(*on_screen(page, *centre(g)))
    details = page.locator("#details")
    assert f"Glomerulus #{g['id']}" in details.inner_text()
    assert f"{table.loc[g['id'], 'class_probability']:.3f}" in details.inner_text()
    assert f"{table.loc[g['id'], 'area_um2']:.0f} µm²" in details.inner_text()
    n_normal, n_scl = data["analysed"]["n_normal"], data["analysed"]["n_sclerosed"]
    assert page.locator("#reviewed-percent").inner_text() == f"{sclerosis_summary(n_normal, n_scl)[0]:g} %"
    page.locator("#set-sclerosed").click()
    pct, lo, hi = sclerosis_summary(n_normal - 1, n_scl + 1)
    assert page.locator("#reviewed-percent").inner_text() == f"{pct:g} %"
    assert page.locator("#reviewed-ci").inner_text() == f"{lo:g}–{hi:g} %"
    assert page.evaluate("document.body.dataset.reviewedCounts") == f"{n_normal - 1},{n_scl + 1}"
    page.keyboard.press("u")  # undo
    assert page.locator("#reviewed-percent").inner_text() == f"{sclerosis_summary(n_normal, n_scl)[0]:g} %"
    page.keyboard.press("2")
    page.reload()  # corrections survive a reload (local storage)
    page.wait_for_function("document.body.dataset.ready === '1'")
    assert page.evaluate("[document.body.dataset.restored, document.body.dataset.reviewedCounts]") == [
        "1", f"{n_normal - 1},{n_scl + 1}"]


def test_corrections_export_round_trips_through_prepare_and_evaluate(page, out, small_slide, tmp_path):
    data = page_data(out / "case01" / VIEWER_PAGE)
    normal = [g for g in data["glomeruli"] if g["class"] == "normal"]
    changed, rejected = normal[0], normal[1]
    page.mouse.click(*on_screen(page, *centre(changed)))
    page.keyboard.press("2")  # sclerosed
    page.locator(f'#list li[data-key="g{rejected["id"]}"]').click()  # selects it and pans there
    page.locator("#reject").click()
    page.evaluate("window.glomscanViewer.viewport.goHome(true)")
    # a missed sclerosed glomerulus marked by a point, a normal one outlined (as in test_viewer.py)
    page.locator('button[data-tool="point"]').click()
    page.locator("#new-class").select_option("sclerosed")
    page.mouse.click(*on_screen(page, 2450, 450))
    page.locator('button[data-tool="outline"]').click()
    page.locator("#new-class").select_option("normal")
    for x, y in ((1850, 1150), (2000, 1150), (2000, 1300), (1850, 1300)):
        page.mouse.click(*on_screen(page, x, y))
    page.locator("#finish-outline").click()
    n_normal, n_scl = data["analysed"]["n_normal"], data["analysed"]["n_sclerosed"]
    assert page.evaluate("document.body.dataset.reviewedCounts") == f"{n_normal - 2 + 1},{n_scl + 1 + 1}"
    assert page.locator("#reviewed-percent").inner_text() == f"{sclerosis_summary(n_normal - 1, n_scl + 2)[0]:g} %"

    with page.expect_download() as download:
        page.locator("#export").click()
    assert download.value.suggested_filename == "case01.geojson"
    truth = tmp_path / "truth"
    truth.mkdir()
    download.value.save_as(truth / "case01.geojson")
    fc = json.loads((truth / "case01.geojson").read_text())
    reviews = [f["properties"]["glomscan"]["review"] for f in fc["features"]]
    assert sorted(reviews) == sorted(["class changed", "false detection", "added", "added"]
                                     + ["unchanged"] * (len(TEST_GLOMERULI) - 2))
    assert {f["geometry"]["type"] for f in fc["features"]} == {"Polygon", "Point"}
    _, skipped = read_qupath_geojson(truth / "case01.geojson", DEFAULT_CLASS_MAP)
    assert skipped == {}  # every classification name is one prepare knows

    res = CliRunner().invoke(main, ["prepare", "--slides", str(small_slide.path.parent), "--annotations", str(truth),
                                    "--out", str(tmp_path / "set"), "--tile", "512", "--stride", "512"])
    assert res.exit_code == 0, res.output
    assert prepared_label_at(tmp_path / "set", *centre(changed)) == 2
    assert prepared_label_at(tmp_path / "set", *centre(rejected)) == 0
    assert prepared_label_at(tmp_path / "set", 1925, 1225) == 1
    assert prepared_label_at(tmp_path / "set", 2450, 450) is None  # next to the point: left out
    res = CliRunner().invoke(main, ["evaluate", "results", "--results", str(out), "--truth", str(truth),
                                    "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(tmp_path / "eval.csv").iloc[0]
    assert (row.n_true, row.matched) == (len(TEST_GLOMERULI) + 1, len(TEST_GLOMERULI) - 1)
    assert row.sclerosis_pct_true == pytest.approx(100 * (n_scl + 2) / (n_normal + n_scl + 1))


@pytest.fixture(scope="module")
def verified(out, tmp_path_factory):
    """The slide as if the verifier had rejected its first normal glomerulus: (folder, the
    candidate's page entry)."""
    data = page_data(out / "case01" / VIEWER_PAGE)
    gid = next(g["id"] for g in data["glomeruli"] if g["class"] == "normal")
    folder = tmp_path_factory.mktemp("viewer-verified") / "case01"
    new_id, _ = reject_by_verifier(out / "case01", folder, gid)
    return folder, next(g for g in page_data(folder / VIEWER_PAGE)["glomeruli"] if g["id"] == new_id)


@pytest.fixture
def verified_page(browser, verified):
    context, page = open_viewer(browser, verified[0])
    yield page
    context.close()


def export(page, folder):
    """The page's corrections file, downloaded into ``folder``: (path, features by glomscan id)."""
    with page.expect_download() as download:
        page.locator("#export").click()
    path = folder / download.value.suggested_filename
    download.value.save_as(path)
    fc = json.loads(path.read_text())
    return path, {f["properties"]["glomscan"].get("id"): f for f in fc["features"]}


def stored_changes(page):
    return page.evaluate("""() => { const d = JSON.parse(document.getElementById('glomscan-data').textContent);
        return JSON.parse(localStorage.getItem('glomscan-review:' + d.path + ':' + d.model_sha256) || '[]'); }""")


def test_a_candidate_the_verifier_rejected_is_shown_uncounted_and_exported_as_such(verified_page, verified, tmp_path):
    page, (folder, cand) = verified_page, verified
    data = page_data(folder / VIEWER_PAGE)
    n_normal, n_scl = data["analysed"]["n_normal"], data["analysed"]["n_sclerosed"]
    key = f"g{cand['id']}"
    # drawn (in the rejected grey, dashed) and listed as rejected by the verifier, not counted
    assert int(page.evaluate("document.body.dataset.outlines")) == len(TEST_GLOMERULI)
    outline = page.locator(f'svg.overlay polygon[data-key="{key}"]')
    assert set(outline.get_attribute("class").split()) >= {"glomerulus", "rejected", "verifier"}
    assert outline.get_attribute("stroke") == "rgb({},{},{})".format(*REJECTED_COLOUR)
    item = page.locator(f'#list li[data-key="{key}"]')
    assert "rejected" in item.get_attribute("class").split()
    assert item.locator(".label").inner_text() == f"#{cand['id']} rejected by verifier (would be normal)"
    assert page.evaluate("document.body.dataset.reviewedCounts") == f"{n_normal},{n_scl}"
    assert page.locator("#reviewed-n").inner_text() == str(n_normal + n_scl)
    assert page.locator("#reviewed-percent").inner_text() == f"{sclerosis_summary(n_normal, n_scl)[0]:g} %"
    # no reviewer's change: not in the changes line, nothing stored
    changes = page.locator("#changes").inner_text()
    assert changes.startswith("0 class change(s), 0 false detection(s), 0 restored, 0 added"), changes
    assert "1 of 1 candidate(s) rejected by the verifier" in changes
    item.click()
    details = page.locator("#details").inner_text()
    assert f"Candidate #{cand['id']}" in details and "would be normal" in details
    assert "verifier: not a glomerulus p" in details and f"{VERIFIER_P['verifier_p_not_glomerulus']:.3f}" in details
    assert f"{VERIFIER_P['verifier_p_normal']:.3f} / {VERIFIER_P['verifier_p_sclerosed']:.3f}" in details
    assert page.locator("#reject").inner_text() == "is a glomerulus"
    assert stored_changes(page) == []
    # the export: "Not glomerulus", rejected by the verifier, which prepare reads as background
    path, features = export(page, tmp_path)
    f = features[cand["id"]]
    assert f["properties"]["classification"]["name"] == CORRECTION_CLASS_NAMES["rejected"] == "Not glomerulus"
    g = f["properties"]["glomscan"]
    assert (g["review"], g["reviewed_class"], g["candidate_class"], g["rejected_by"]) == (
        "rejected by verifier", None, "normal", "verifier")
    assert sorted(x["properties"]["glomscan"]["review"] for x in features.values()) == sorted(
        ["rejected by verifier"] + ["unchanged"] * (len(TEST_GLOMERULI) - 1))
    assert f["geometry"]["coordinates"] == [cand["ring"]]
    polygons, skipped = read_qupath_geojson(path, DEFAULT_CLASS_MAP)
    assert skipped == {} and DEFAULT_CLASS_MAP["not glomerulus"] == 0 and len(polygons) == len(TEST_GLOMERULI) - 1
    assert page.errors == []


def test_restoring_a_candidate_the_verifier_rejected_counts_it_and_exports_it_restored(verified_page, verified,
                                                                                        tmp_path):
    page, (folder, cand) = verified_page, verified
    data = page_data(folder / VIEWER_PAGE)
    n_normal, n_scl = data["analysed"]["n_normal"], data["analysed"]["n_sclerosed"]
    key = f"g{cand['id']}"
    page.locator(f'#list li[data-key="{key}"]').click()
    page.keyboard.press("x")  # restore: "is a glomerulus"
    pct, lo, hi = sclerosis_summary(n_normal + 1, n_scl)
    assert page.evaluate("document.body.dataset.reviewedCounts") == f"{n_normal + 1},{n_scl}"
    assert page.locator("#reviewed-percent").inner_text() == f"{pct:g} %" != f"{sclerosis_summary(n_normal, n_scl)[0]:g} %"
    assert page.locator("#reviewed-ci").inner_text() == f"{lo:g}–{hi:g} %"
    assert page.locator("#changes").inner_text().startswith("0 class change(s), 0 false detection(s), 1 restored, 0 added")
    assert "restored" in page.locator(f'#list li[data-key="{key}"] .label').inner_text()
    assert "rejected" not in page.locator(f'svg.overlay polygon[data-key="{key}"]').get_attribute("class").split()
    assert page.locator("#reject").inner_text() == "not a glomerulus"
    assert [(s["key"], s["rejected"], s["cls"]) for s in stored_changes(page)] == [(key, False, "normal")]
    path, features = export(page, tmp_path)
    f = features[cand["id"]]
    assert f["properties"]["classification"]["name"] == QUPATH_CLASS_NAMES["normal"]
    assert (f["properties"]["glomscan"]["review"], f["properties"]["glomscan"]["reviewed_class"]) == ("restored", "normal")
    polygons, skipped = read_qupath_geojson(path, DEFAULT_CLASS_MAP)
    assert skipped == {} and len(polygons) == len(TEST_GLOMERULI)
    # the restoration survives a reload; undo returns it to rejected (no change again)
    page.reload()
    page.wait_for_function("document.body.dataset.ready === '1'")
    assert page.evaluate("[document.body.dataset.restored, document.body.dataset.reviewedCounts]") == [
        "1", f"{n_normal + 1},{n_scl}"]
    page.locator(f'#list li[data-key="{key}"]').click()
    page.keyboard.press("u")
    assert page.evaluate("document.body.dataset.reviewedCounts") == f"{n_normal},{n_scl}"
    assert stored_changes(page) == []
    assert page.locator(f'#list li[data-key="{key}"] .label').inner_text().endswith("rejected by verifier (would be normal)")
    # restored as sclerosed (key 2), rejected again (x): the toggle undoes the restoration
    page.keyboard.press("2")
    assert page.evaluate("document.body.dataset.reviewedCounts") == f"{n_normal},{n_scl + 1}"
    assert page.locator("#reviewed-percent").inner_text() == f"{sclerosis_summary(n_normal, n_scl + 1)[0]:g} %"
    _, features = export(page, tmp_path)
    assert features[cand["id"]]["properties"]["glomscan"]["review"] == "restored"
    assert features[cand["id"]]["properties"]["classification"]["name"] == QUPATH_CLASS_NAMES["sclerosed"]
    page.keyboard.press("x")
    assert page.evaluate("document.body.dataset.reviewedCounts") == f"{n_normal},{n_scl}"
    assert page.locator("#changes").inner_text().startswith("0 class change(s), 0 false detection(s), 0 restored")
    _, features = export(page, tmp_path)
    assert features[cand["id"]]["properties"]["glomscan"]["review"] == "rejected by verifier"
    assert page.errors == []
