"""OUT/<slide>/viewer.html: a zoomable review page per slide, static files only.

The slide at the analysis resolution becomes a Deep Zoom pyramid written by libvips
(``dzsave``: ``viewer/tiles_files/<level>/<col>_<row>.jpg``) and is shown with OpenSeadragon
(vendored in ``glomscan/viewer_assets``, copied next to each page so a slide folder works on its
own). The glomeruli (outlines in level-0 pixels, measurements, probabilities) and the slide's
counts are embedded in the page as JSON, and OpenSeadragon is given the pyramid as an inline
tile source: a page opened from the file system (``file://``) loads nothing but ``<script>``
files and image tiles, which browsers allow there, and no XHR, which Chromium refuses.

In the page a pathologist can step through the glomeruli, change a class, mark a false
detection or a missed glomerulus (point or outline), see the counts and percent global
glomerulosclerosis with its 95 % Wilson interval follow, and download the corrections as
``<slide stem>.geojson``: a QuPath-compatible FeatureCollection that ``glomscan prepare
--annotations`` and ``glomscan evaluate results --truth`` read (``glomscan.train.dataset.data``).

Candidates the verifier rejected (``rejected.geojson``, when analyze wrote one) are on the page
too, marked ``rejected_by: "verifier"``: drawn and listed as rejected and not counted until the
pathologist restores one (then it counts in its class, and is exported as "restored"); one left
rejected is no reviewer's change and is exported as "Not glomerulus" ("rejected by verifier").
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyvips

from .atomic import OUTPUT_ERRNOS, atomic_write_text
from .labels import QUPATH_CLASS_NAMES
from .qupath import classification_name
from .report import CLASS_COLOURS, REJECTED_CLASS_NAME, REJECTED_COLOUR, REJECTED_FILE, Z_95
from .slides import Slide

log = logging.getLogger(__name__)

VIEWER_PAGE = "viewer.html"
VIEWER_DIR = "viewer"
"""Per slide: ``viewer.html`` and ``viewer/`` (scripts, licence, the tile pyramid)."""
ASSETS = ("openseadragon.min.js", "LICENSE-openseadragon.txt", "VENDORED.md", "viewer.js", "viewer.css")
TILE_SIZE = 254
TILE_OVERLAP = 1
JPEG_QUALITY = 80
CORRECTION_CLASS_NAMES = {**QUPATH_CLASS_NAMES, "rejected": REJECTED_CLASS_NAME}
"""Classification names of the corrections file: the analysis' own two, and false detections
(kept in the file so the review can be traced; ``prepare`` reads them as background)."""


@dataclass(frozen=True)
class ViewerInfo:
    seconds: float
    bytes: int
    tiles: int


def glomeruli_for_page(geojson: dict, rejected_by: str | None = None) -> list[dict]:
    """The page's glomeruli from ``glomeruli.geojson``: id, class, probabilities, measurements
    and the outline (level-0 pixels). With ``rejected_by`` (``"verifier"``), the candidates of
    ``rejected.geojson``: their class is the one they get when restored
    (``glomscan.candidate_class``) and each says who rejected them (``rejected_by``; ``None``
    for accepted glomeruli)."""
    by_name = {v: k for k, v in QUPATH_CLASS_NAMES.items()}
    out = []
    for feature in geojson.get("features", []):
        props = feature.get("properties", {})
        m = dict(props.get("measurements", {}))
        if rejected_by is None:
            cls = by_name.get(classification_name(feature), "normal")
        else:
            cls = (props.get("glomscan") or {}).get("candidate_class", "normal")
            cls = cls if cls in QUPATH_CLASS_NAMES else "normal"
        geometry = feature.get("geometry") or {}
        if geometry.get("type") != "Polygon":
            continue
        out.append({
            "id": int(m.pop("glomscan id", len(out) + 1)),
            "feature_id": feature.get("id"),
            "class": cls,
            "rejected_by": rejected_by,
            "ring": [[round(x, 1), round(y, 1)] for x, y in geometry["coordinates"][0]],
            "measurements": m,
        })
    return out


def page_glomeruli(folder: Path) -> list[dict]:
    """The accepted glomeruli of ``folder/glomeruli.geojson``, then the candidates the verifier
    rejected (``folder/rejected.geojson``, when there is one); ids are unique across both."""
    folder = Path(folder)
    glomeruli = glomeruli_for_page(json.loads((folder / "glomeruli.geojson").read_text()))
    if (folder / REJECTED_FILE).is_file():
        rejected = glomeruli_for_page(json.loads((folder / REJECTED_FILE).read_text()), rejected_by="verifier")
        taken = {g["id"] for g in glomeruli}
        clashing = [g["id"] for g in rejected if g["id"] in taken]
        if clashing:
            log.warning("%s: rejected candidates %s share an id with a glomerulus; not shown", folder.name, clashing)
        glomeruli += [g for g in rejected if g["id"] not in taken]
    return glomeruli


def page_data(folder: Path, report, width: int, height: int) -> dict:
    """Everything the page shows, as JSON: the slide, the tile pyramid, the glomeruli and the
    candidates the verifier rejected (``rejected_by``), the counts and %GS with its interval as
    analysed (report.json's numbers: rejected candidates are not in them)."""
    return {
        "slide": report.slide,
        "stem": Path(report.path).stem,
        "path": report.path,
        "width": width, "height": height,
        "downsample": report.analysis_downsample,
        "mpp": report.mpp, "analysis_mpp": report.analysis_mpp,
        "model_id": report.model_id, "model_sha256": report.model_sha256,
        "verifier_id": getattr(report, "verifier_id", "") or "",
        "tiles": {"url": f"{VIEWER_DIR}/tiles_files/", "format": "jpg", "overlap": TILE_OVERLAP, "size": TILE_SIZE},
        "analysed": {"n_normal": report.n_normal, "n_sclerosed": report.n_sclerosed,
                     "percent": report.percent_global_glomerulosclerosis,
                     "ci95_low": report.ci95_low, "ci95_high": report.ci95_high},
        "z": Z_95,
        "class_names": CORRECTION_CLASS_NAMES,
        "colours": {**{k: list(v) for k, v in CLASS_COLOURS.items()}, "rejected": list(REJECTED_COLOUR)},
        "glomeruli": page_glomeruli(folder),
    }


def render_page(data: dict) -> str:
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"glomscan viewer: {data['slide']}", quote=True)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="{VIEWER_DIR}/viewer.css">
</head>
<body>
<div id="osd" aria-label="zoomable slide"></div>
<aside id="panel"></aside>
<script id="glomscan-data" type="application/json">{payload}</script>
<script src="{VIEWER_DIR}/openseadragon.min.js"></script>
<script src="{VIEWER_DIR}/viewer.js"></script>
</body></html>
"""


def viewer_image(image: pyvips.Image) -> pyvips.Image:
    """The slide at its analysis resolution (as analyze reads it) as 8-bit sRGB without alpha."""
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    if image.bands == 1:
        image = image.colourspace("srgb")
    return image.cast("uchar")


def analysis_image(report, mpp_override: float | None) -> pyvips.Image:
    """The slide at its analysis resolution, as analyze read it (``write_viewer_tiles`` makes it
    8-bit sRGB)."""
    slide = Slide(Path(report.path), mpp_override=mpp_override)
    return slide.image_at(report.analysis_downsample)[0]


def write_viewer_tiles(folder: Path, image: pyvips.Image) -> None:
    """``folder/viewer/``: the page's scripts and the tile pyramid of ``image`` (the slide at
    the analysis resolution). Needs no analysis result, so ``analyze`` runs it beside the
    slide's last outputs."""
    target = Path(folder) / VIEWER_DIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    assets = resources.files("glomscan") / "viewer_assets"
    for name in ASSETS:
        (target / name).write_bytes((assets / name).read_bytes())
    viewer_image(image).dzsave(str(target / "tiles"), tile_size=TILE_SIZE, overlap=TILE_OVERLAP,
                               suffix=f".jpg[Q={JPEG_QUALITY}]")


def write_viewer_page(folder: Path, report, width: int, height: int, started: float) -> ViewerInfo:
    """``folder/viewer.html`` over the tiles of ``write_viewer_tiles`` (``report`` and
    ``glomeruli.geojson`` complete); what the viewer cost since ``started`` (perf_counter)."""
    folder = Path(folder)
    atomic_write_text(folder / VIEWER_PAGE, render_page(page_data(folder, report, width, height)))
    files = [p for p in (folder / VIEWER_DIR).rglob("*") if p.is_file()] + [folder / VIEWER_PAGE]
    tiles = sum(p.suffix == ".jpg" for p in files)
    return ViewerInfo(round(time.perf_counter() - started, 3), sum(p.stat().st_size for p in files), tiles)


def write_viewer(folder: Path, report, mpp_override: float | None = None) -> ViewerInfo:
    """Write ``folder/viewer.html`` and ``folder/viewer/`` for an analysed slide whose outputs
    (report fields, ``glomeruli.geojson``) are in ``folder``. The page is written last."""
    started = time.perf_counter()
    image = analysis_image(report, mpp_override)
    write_viewer_tiles(folder, image)
    return write_viewer_page(folder, report, image.width, image.height, started)


def finish_viewer(folder: Path, report, width: int, height: int, started: float,
                  tiles_error: BaseException | None) -> None:
    """The page over tiles written since ``started``; the analysis stands without it: a failure
    (``tiles_error`` from ``write_viewer_tiles`` or one writing the page) is logged and the
    slide stays ok without a viewer; only a full or read-only output folder is raised (it fails
    the slide and stops the batch)."""
    try:
        if tiles_error is not None:
            raise tiles_error
        info = write_viewer_page(folder, report, width, height, started)
    except Exception as exc:  # pyvips.Error and the like: the results stand
        if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
            raise
        shutil.rmtree(Path(folder) / VIEWER_DIR, ignore_errors=True)
        (Path(folder) / VIEWER_PAGE).unlink(missing_ok=True)
        log.warning("%s: no viewer (%s: %s); the analysis is complete", report.slide, type(exc).__name__, exc)
    else:
        log.info("%s: viewer %.1f MB (%d tiles) in %.1f s", report.slide, info.bytes / 1e6, info.tiles, info.seconds)
