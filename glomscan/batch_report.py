"""OUT/index.html: a static batch report a pathologist opens from the file system.

One self-contained page (inline CSS and a few lines of inline script, no server, nothing
fetched from elsewhere): one row per slide with its overview thumbnail, counts, percent global
glomerulosclerosis with its 95 % CI, status and reason, and relative links to the slide's
files. Every text from outside (slide names, reasons) is HTML-escaped and every link
URL-quoted, so a slide called ``<b>&"x".svs`` shows as exactly that.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from urllib.parse import quote

from . import __version__
from .atomic import atomic_write_text
from .pipeline import SlideReport
from .report import CLASS_COLOURS, THUMBNAIL_NAME
from .viewer import VIEWER_PAGE

LINKED_FILES = (("glomeruli.csv", "CSV"), ("glomeruli.geojson", "GeoJSON"), ("mask.tif", "mask TIFF"),
                ("report.json", "report"))

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
p.meta{color:#555;margin:.2em 0 1em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.4em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed{background:#fff1f0}
span.status-ok{color:#11772e;font-weight:600}
span.status-failed{color:#b3261e;font-weight:600}
img.overview{max-width:220px;max-height:160px;border:1px solid #ccc;display:block}
.reason{color:#b3261e;max-width:32em;overflow-wrap:anywhere}
.legend span{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 .8em;vertical-align:-.1em}
"""

# After load, each thumbnail records whether it really decoded (naturalWidth > 0) so a browser
# test (or a curious user with the inspector) can see broken images; nothing else runs.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img.overview"), ok = 0;
  imgs.forEach(function (img) {
    img.setAttribute("data-natural-width", String(img.naturalWidth));
    if (img.complete && img.naturalWidth > 0) { ok += 1; } else { img.setAttribute("data-broken", "1"); }
  });
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _href(folder: str, file: str) -> str:
    return _esc(f"{quote(folder, safe='')}/{quote(file)}")


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _num(value, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:g}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def _row(out_dir: Path, r: SlideReport, skipped: bool) -> str:
    folder = out_dir / r.slide
    has = {name: (folder / name).is_file() for name in ("overview.png", THUMBNAIL_NAME, *dict(LINKED_FILES))}
    shown = THUMBNAIL_NAME if has[THUMBNAIL_NAME] else "overview.png"  # results of older versions: no thumbnail
    thumb = (f'<a href="{_href(r.slide, "overview.png")}"><img class="overview" '
             f'src="{_href(r.slide, shown)}" alt="overview of {_esc(r.slide)}"></a>'
             if has["overview.png"] else "–")
    ci = (f"{_num(r.ci95_low)}–{_num(r.ci95_high)} %" if r.ci95_low is not None and r.ci95_high is not None else "–")
    status = f'<span class="status-{_esc(r.status)}">{_esc(r.status)}</span>'
    if skipped:
        status += " (up to date, not redone)"
    links = " · ".join(f'<a href="{_href(r.slide, name)}">{label}</a>' for name, label in LINKED_FILES if has[name])
    if (folder / VIEWER_PAGE).is_file():
        links = f'<a class="viewer" href="{_href(r.slide, VIEWER_PAGE)}"><b>open viewer</b></a> · ' + links
    reason = f'<div class="reason">{_esc(r.reason)}</div>' if r.reason else ""
    return (f'<tr class="slide {_esc(r.status)}" data-slide="{_esc(r.slide)}" data-status="{_esc(r.status)}">'
            f'<td>{thumb}</td><td class="name">{_esc(r.slide)}<div class="meta">{_esc(r.path)}</div></td>'
            f'<td class="num">{_num(r.n_glomeruli)}</td><td class="num">{_num(r.n_normal)}</td>'
            f'<td class="num">{_num(r.n_sclerosed)}</td>'
            f'<td class="num">{_num(r.percent_global_glomerulosclerosis, " %")}</td><td class="num">{ci}</td>'
            f"<td>{status}{reason}</td><td>{links or '–'}</td></tr>")


def render_index(out_dir: Path, reports: list[SlideReport], skipped: set[str], interrupted: bool = False) -> str:
    n_failed = sum(r.status != "ok" for r in reports)
    state = "interrupted (rerun the same command to finish; finished slides are kept)" if interrupted else "finished"
    rows = "\n".join(_row(out_dir, r, r.slide in skipped) for r in reports)
    model_ids = sorted({r.model_id for r in reports if r.model_id})
    uses = sorted({r.model_intended_use for r in reports if r.model_intended_use})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>glomscan batch report: {_esc(out_dir.name)}</title>
<style>{_CSS}</style>
</head>
<body data-slides="{len(reports)}" data-failed="{n_failed}">
<h1>glomscan batch report</h1>
<p class="meta">{len(reports)} slide(s): {len(reports) - n_failed} ok, {n_failed} failed; batch {_esc(state)};
written {_esc(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} by glomscan {_esc(__version__)};
model {_esc(", ".join(model_ids) or "–")}. Percent global glomerulosclerosis with its 95 % Wilson
interval. Research tool, not a medical device.</p>
<p class="meta" id="intended-use">Model intended use: {_esc("; ".join(uses) or "not stated")}
<span class="legend">Overview: <span style="background:{_hex(CLASS_COLOURS["normal"])}"></span>normal
<span style="background:{_hex(CLASS_COLOURS["sclerosed"])}"></span>sclerosed</span></p>
<table>
<thead><tr><th>overview</th><th>slide</th><th>glomeruli</th><th>normal</th><th>sclerosed</th>
<th>sclerosed %</th><th>95 % CI</th><th>status</th><th>files</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<p class="meta">Table data: <a href="summary.csv">summary.csv</a></p>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_index(out_dir: Path, reports: list[SlideReport], skipped: set[str], interrupted: bool = False) -> Path:
    path = Path(out_dir) / "index.html"
    atomic_write_text(path, render_index(Path(out_dir), reports, skipped, interrupted))
    return path
