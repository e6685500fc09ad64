"""OUT/index.html: written after every batch, escaped, self-contained, and rendered by a real
headless Chromium (Debian package `chromium`; CI installs it in .ci/run)."""

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import pyvips

from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings

from conftest import ORACLE_CHOICE, TEST_GLOMERULI, OracleEngine, copy_slide, oracle_model

FAST = AnalysisSettings(tile=256, overlap=128, batch_size=4, workers=2)
ODD_NAME = 'we<i>rd & "quoted" #1?'
BAD_NAME = "broken <img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def report_dir(small_slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    slides = root / "slides"
    copy_slide(small_slide.path, slides, "case01.tif")
    copy_slide(small_slide.path, slides, ODD_NAME + ".tif")
    (slides / f"{BAD_NAME}.svs").write_bytes(b"\x00" * 500)
    outcome = run_batch(slides, root / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE, FAST, quiet=True)
    assert len(outcome.failed) == 1
    return root / "out"


class Rows(HTMLParser):
    """Collects <tr class="slide ..."> rows: their data attributes, text, links and images."""

    def __init__(self):
        super().__init__()
        self.rows, self.current, self.body = [], None, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "tr" and "slide" in (a.get("class") or "").split():
            self.current = {"attrs": a, "text": "", "links": [], "imgs": []}
            self.rows.append(self.current)
        elif self.current is not None and tag == "a":
            self.current["links"].append(a["href"])
        elif self.current is not None and tag == "img":
            self.current["imgs"].append(a)

    def handle_endtag(self, tag):
        if tag == "tr":
            self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"] += data


def parse(text):
    p = Rows()
    p.feed(text)
    return p


def test_index_has_one_escaped_row_per_slide_with_relative_links(report_dir):
    text = (report_dir / "index.html").read_text()
    assert "<img src=x" not in text and "we<i>rd" not in text  # escaped, not markup
    assert not re.search(r'(src|href)="(https?:|file:|/)', text), "only relative links"
    assert "<link" not in text and "@import" not in text  # no external resources
    rows = {r["attrs"]["data-slide"]: r for r in parse(text).rows}
    assert set(rows) == {"case01", ODD_NAME, BAD_NAME}
    ok = rows[ODD_NAME]
    assert ok["attrs"]["data-status"] == "ok" and ODD_NAME in ok["text"]
    n_scl = sum(g.sclerosed for g in TEST_GLOMERULI)
    cells = ok["text"]
    assert f"{len(TEST_GLOMERULI)}" in cells and f"{100 * n_scl / len(TEST_GLOMERULI):.2f}".rstrip("0") in cells
    quoted = "we%3Ci%3Erd%20%26%20%22quoted%22%20%231%3F"
    assert ok["imgs"][0]["src"] == f"{quoted}/thumbnail.png"  # the small copy: a page of slides loads fast
    assert f"{quoted}/overview.png" in ok["links"]  # the full overview one click away
    thumb = pyvips.Image.new_from_file(str(report_dir / ODD_NAME / "thumbnail.png"))
    overview = pyvips.Image.new_from_file(str(report_dir / ODD_NAME / "overview.png"))
    assert max(thumb.width, thumb.height) == min(440, max(overview.width, overview.height))
    for name in ("glomeruli.csv", "glomeruli.geojson", "mask.tif"):
        assert f"{quoted}/{name}" in ok["links"]
    bad = rows[BAD_NAME]
    assert bad["attrs"]["data-status"] == "failed" and "cannot open slide" in bad["text"] and not bad["imgs"]


def test_index_is_rewritten_after_a_resumed_run(report_dir, small_slide):
    before = (report_dir / "index.html").stat().st_mtime_ns
    outcome = run_batch(report_dir.parent / "slides", report_dir, oracle_model(), OracleEngine(), ORACLE_CHOICE,
                        FAST, quiet=True)
    assert sorted(outcome.skipped) == sorted(["case01", ODD_NAME])
    text = (report_dir / "index.html").read_text()
    assert (report_dir / "index.html").stat().st_mtime_ns > before and "up to date, not redone" in text


def test_index_renders_in_headless_chromium_with_images_loaded(report_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    url = (report_dir / "index.html").as_uri()
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    page = parse(dom)
    # the page's own script ran after load and counted the thumbnails that really decoded
    assert page.body.get("data-images-total") == "2" and page.body.get("data-images-loaded") == "2", page.body
    rows = {r["attrs"]["data-slide"]: r for r in page.rows}
    assert len(page.rows) == 3 and ODD_NAME in rows
    for name in ("case01", ODD_NAME):
        img = rows[name]["imgs"][0]
        assert int(img["data-natural-width"]) > 100 and "data-broken" not in img
    assert "alert(1)" in rows[BAD_NAME]["text"]  # shown as text
    shot = tmp_path / "index.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1280,900", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
