"""Whole-slide images: discovery, opening, pyramid levels, mpp, tissue detection.

Everything is read through pyvips (libvips built with OpenSlide): vendor formats go through
``openslideload`` (their levels opened and described by OpenSlide; Aperio and generic TIFF pixels
decoded by ``tiffload`` when it gives the same pixels, faster), pyramidal TIFFs through
``tiffload`` page by page, flat images as one level.
Slides are opened read-only; nothing here ever writes to an input.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips
from scipy import ndimage

from .config import TissueSettings
from .dicom import DICOM_EXTENSIONS, DicomError, DicomSlideReader, group_dicom_files
from .imaging import BLACK_MAX, image_to_array, saturation_and_brightness

log = logging.getLogger(__name__)

OPENSLIDE_EXTENSIONS = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
TIFF_EXTENSIONS = {".tif", ".tiff"}
FLAT_EXTENSIONS = {".png", ".jpg", ".jpeg"}
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS | TIFF_EXTENSIONS | FLAT_EXTENSIONS | DICOM_EXTENSIONS

MULTI_FILE_EXTENSIONS = {".mrxs", ".vms", ".vmu"} | DICOM_EXTENSIONS
"""Formats whose pixels live in companion files (the named file alone is small)."""
MAX_PIXELS_PER_FILE_BYTE = 20_000
"""Even blank glass compresses to well under 1000 level-0 pixels per byte (JPEG or deflate tiles);
a header claiming far more pixels than the file could hold is truncated or corrupt, and reading
it would only spin on (or allocate for) pixels that are not there."""

PLAUSIBLE_MPP = (0.05, 20.0)
"""Metadata mpp outside this range is treated as absent (libvips reports 1 px/mm for TIFFs
without resolution tags, i.e. 1000 µm/px)."""


TIFF_LAYOUT_VENDORS = {"aperio", "generic-tiff"}
"""OpenSlide vendors whose levels are pages of a TIFF: their pixels are read through libvips' own
TIFF reader, which reads the same JPEG tiles three to seven times faster per core
(benchmarks/scanner_layouts.py), once a probe shows it gives OpenSlide's pixels exactly (it does
not for JPEG 2000 SVS files, which stay with OpenSlide)."""
TIFF_PROBE_PX = 256
"""Side of the probe regions (centre of the finest and the coarsest level) compared."""

MAX_UPSAMPLING = 2.0
"""Slides scanned more than this factor coarser than the analysis resolution are refused
(upsampling invents no detail)."""


class SlideError(Exception):
    """A slide cannot be used; the message is the reason shown in the batch summary."""


def find_slides(folder: Path, recursive: bool = False) -> list[Path]:
    """Slides in ``folder`` by extension, sorted. MIRAX companion folders are not descended.

    DICOM files are grouped by series, one entry per slide (its first pyramid-level file); a
    ``.dcm`` that is not part of a whole-slide series stays an entry of its own, so that it is
    reported (failed, with the reason) rather than skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"slide folder not found: {folder}")
    pattern = "**/*" if recursive else "*"
    found = [
        p
        for p in folder.glob(pattern)
        if not p.name.startswith(".")
        and ((p.is_file() and (p.suffix.lower() in SLIDE_EXTENSIONS
                               or (p.suffix.lower() not in NOT_SLIDES and sniff_format(p))))
             or (_broken_link(p) and p.suffix.lower() in SLIDE_EXTENSIONS))  # reported, not skipped
    ]
    dicom_folders = {p.parent for p in found if p.exists() and _kind(p) == "dicom"}
    if dicom_folders:
        keep = set()
        for d in dicom_folders:
            series, problems = dicom_series(d)
            keep |= set(series) | set(problems)
        found = [p for p in found if not p.exists() or _kind(p) != "dicom" or p in keep]
    return sorted(found)


NOT_SLIDES = {".md", ".txt", ".csv", ".json", ".geojson", ".xml", ".html", ".py", ".zip", ".npy", ".pdf", ".log"}
"""Extensions never sniffed for slide content (annotations, notes, reports)."""


def sniff_format(path: Path) -> str | None:
    """The image format of a file by its first bytes (tiff, dicom, png, jpeg), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return None


def _broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _kind(path: Path) -> str:
    """How a slide file is opened: openslide, dicom, tiff or flat (by extension, else content)."""
    ext = path.suffix.lower()
    if ext in OPENSLIDE_EXTENSIONS:
        return "openslide"
    if ext in DICOM_EXTENSIONS:
        return "dicom"
    if ext in TIFF_EXTENSIONS:
        return "tiff"
    if ext in FLAT_EXTENSIONS:
        return "flat"
    sniffed = sniff_format(path)
    return {"tiff": "tiff", "dicom": "dicom"}.get(sniffed, "flat")


def slide_files(path: Path) -> list[Path]:
    """Every file a slide reads: itself, or for DICOM all instances of its series (same folder)."""
    path = Path(path)
    if _kind(path) != "dicom":
        return [path]
    series, _ = dicom_series(path.parent)
    for files in series.values():
        if path in files:
            return files
    return [path]


def dicom_series(folder: Path) -> tuple[dict[Path, list[Path]], dict[Path, str]]:
    """``group_dicom_files`` of a folder's DICOM files, read once per state of the folder (the
    batch lists slides, then fingerprints each: the headers are not read again each time)."""
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NOT_SLIDES
                   and _kind(p) == "dicom")
    return _grouped(tuple((p, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=64)
def _grouped(files: tuple[tuple[Path, int, int], ...]) -> tuple[dict[Path, list[Path]], dict[Path, str]]:
    return group_dicom_files([p for p, _, _ in files])


@dataclass(frozen=True)
class Level:
    index: int
    width: int
    height: int
    downsample: float
    """Level-0 pixels per pixel of this level."""


def colour_problem(image: pyvips.Image) -> str:
    """Why the pixels of ``image`` cannot be analysed as a colour stain, or '' when they can
    (RGB or CMYK, 8 or 16 bit, with or without alpha, palette images expanded by the loader)."""
    what = f"{image.bands} band{'s' if image.bands > 1 else ''}, {image.format}, {image.interpretation}"
    if image.bands <= 2 or image.interpretation in ("b-w", "grey16"):
        return (f"greyscale image ({what}): glomscan analyses colour (RGB) images of PAS-stained tissue; "
                "rescan or export in colour")
    if image.bands > 4 and image.interpretation != "cmyk":
        return (f"multichannel image ({what}): glomscan analyses colour (RGB) images of PAS-stained tissue "
                "(fluorescence and multispectral images are not supported)")
    return ""


def _to_rgb(image: pyvips.Image) -> pyvips.Image:
    """uint8 sRGB, 3 bands: CMYK converted through libvips' colour management, 16-bit scaled
    to 8 (not stretched per image), alpha flattened onto white (glass)."""
    if image.interpretation == "cmyk":
        image = image.colourspace("srgb")
    elif image.format in ("ushort", "short"):
        image = (image.cast("ushort") >> 8).cast("uchar")  # the top 8 bits: stain intensities kept
    elif image.format != "uchar":
        image = image.cast("uchar") if image.format == "char" else image.scaleimage()
    if image.bands == 4:
        image = image.flatten(background=[255, 255, 255])
    if image.bands == 1:
        image = image.bandjoin([image, image])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
    return image.copy(interpretation="srgb")


class Slide:
    """An opened whole-slide image.

    ``levels[0]`` is full resolution. ``mpp`` is level-0 micrometres per pixel or None when the
    file does not say (and no override was given).
    """

    def __init__(self, path: Path, mpp_override: float | None = None):
        self.path = Path(path)
        if _broken_link(self.path):
            raise SlideError(f"link points nowhere: {self.path} -> {os.readlink(self.path)} does not exist")
        if not self.path.exists():
            raise SlideError(f"file not found: {self.path}")
        if self.path.stat().st_size == 0:
            raise SlideError("empty file (0 bytes)")
        kind = _kind(self.path)
        self._dicom: DicomSlideReader | None = None
        self.colour_problem = ""  # OpenSlide and DICOM (through OpenSlide) deliver 8-bit RGB(A)
        try:
            if kind == "openslide":
                self._open_openslide()
            elif kind == "dicom":
                self._open_dicom()
            elif kind == "tiff":
                self._open_tiff()
            else:
                self._open_flat()
        except pyvips.Error as exc:
            raise SlideError(f"cannot open slide: {_vips_reason(exc)}") from exc
        except DicomError as exc:
            raise SlideError(str(exc)) from exc
        if self.levels[0].width < 1 or self.levels[0].height < 1:
            raise SlideError("slide has no pixels")
        _refuse_implausible_size(self.path, self.levels[0])
        self.mpp_from_metadata = self.mpp
        if self.mpp is None and mpp_override is not None:
            self.mpp = float(mpp_override)
        self._lock = threading.Lock()
        self._level_images: dict[int, pyvips.Image] = {}

    # -- opening -----------------------------------------------------------------------------
    def _open_openslide(self) -> None:
        base = pyvips.Image.openslideload(str(self.path), level=0)
        self.vendor = base.get("openslide.vendor") if "openslide.vendor" in base.get_fields() else "openslide"
        count = int(base.get("openslide.level-count"))
        w0 = base.width
        self.levels = []
        for i in range(count):
            w = int(base.get(f"openslide.level[{i}].width"))
            h = int(base.get(f"openslide.level[{i}].height"))
            ds = float(base.get(f"openslide.level[{i}].downsample"))
            self.levels.append(Level(i, w, h, ds if ds > 0 else w0 / w))
        mpp = None
        if "openslide.mpp-x" in base.get_fields():
            try:
                mpp = float(base.get("openslide.mpp-x"))
            except ValueError:
                mpp = None
        self.mpp = _plausible(mpp)
        self._loader = "openslide"
        pages = _tiff_pages_of_levels(self.path, self.levels) if self.vendor in TIFF_LAYOUT_VENDORS else None
        if pages is not None:  # OpenSlide's levels, decoded as the pages of a pyramidal TIFF are
            self._pages, self._loader = pages, "tiff"

    def _open_dicom(self) -> None:
        reader = DicomSlideReader(self.path)
        self._dicom = reader
        weakref.finalize(self, reader.close)
        self.levels = [Level(i, w, h, ds) for i, ((w, h), ds) in
                       enumerate(zip(reader.level_dimensions, reader.level_downsamples))]
        self.vendor = "dicom"
        self.mpp = _plausible(reader.mpp)
        self._loader = "dicom"

    def _open_tiff(self) -> None:
        first = pyvips.Image.tiffload(str(self.path), page=0)
        n_pages = first.get("n-pages") if "n-pages" in first.get_fields() else 1
        w0, h0 = first.width, first.height
        self.levels = [Level(0, w0, h0, 1.0)]
        self._pages = [0]
        # Keep further pages that continue the pyramid: smaller, same aspect ratio. Label and
        # macro images (other aspect) are skipped.
        for page in range(1, n_pages):
            try:
                im = pyvips.Image.tiffload(str(self.path), page=page)
            except pyvips.Error:
                break
            prev = self.levels[-1]
            ds = w0 / im.width
            if im.width >= prev.width or abs(h0 / im.height - ds) / ds > 0.02:
                continue
            self.levels.append(Level(len(self.levels), im.width, im.height, ds))
            self._pages.append(page)
        self.vendor = "tiff-pyramid" if len(self.levels) > 1 else "tiff-flat"
        self.mpp = _plausible(1000.0 / first.xres if first.xres > 0 else None)
        self._loader = "tiff"
        self.colour_problem = colour_problem(first)

    def _open_flat(self) -> None:
        im = pyvips.Image.new_from_file(str(self.path))
        self.levels = [Level(0, im.width, im.height, 1.0)]
        self.vendor = "flat-image"
        self.mpp = _plausible(1000.0 / im.xres if im.xres > 0 else None)
        self._loader = "flat"
        self.colour_problem = colour_problem(im)

    @property
    def pixel_reader(self) -> str:
        """What decodes the pixels: openslide, tiff (libvips; for OpenSlide's aperio and
        generic-tiff files too, when it gives the same pixels), dicom or flat."""
        return self._loader

    # -- pixels ------------------------------------------------------------------------------
    def level_image(self, index: int) -> pyvips.Image:
        """The level as a lazy uint8 RGB pyvips image (opened once, random access)."""
        with self._lock:
            if index not in self._level_images:
                try:
                    if self._loader == "openslide":
                        im = pyvips.Image.openslideload(str(self.path), level=index)
                    elif self._loader == "dicom":
                        im = self._dicom.level_image(index)
                    elif self._loader == "tiff":
                        im = pyvips.Image.tiffload(str(self.path), page=self._pages[index], access="random")
                    else:
                        im = pyvips.Image.new_from_file(str(self.path), access="random")
                except pyvips.Error as exc:
                    raise SlideError(f"cannot read level {index}: {_vips_reason(exc)}") from exc
                except DicomError as exc:
                    raise SlideError(f"cannot read level {index}: {exc}") from exc
                self._level_images[index] = _to_rgb(im)
            return self._level_images[index]

    def best_level(self, downsample: float) -> Level:
        """Coarsest level that is at least as fine as ``downsample`` (2 % tolerance)."""
        candidates = [lv for lv in self.levels if lv.downsample <= downsample * 1.02]
        return max(candidates, key=lambda lv: lv.downsample) if candidates else self.levels[0]

    def image_at(self, downsample: float) -> tuple[pyvips.Image, Level]:
        """Lazy image at ``downsample`` relative to level 0, read from the best pyramid level
        and resampled only for the residual factor (none when a level matches)."""
        level = self.best_level(downsample)
        image = self.level_image(level.index)
        residual = downsample / level.downsample
        if abs(residual - 1.0) > 0.02:
            image = image.resize(1.0 / residual, kernel="linear" if residual < 4 else "lanczos3")
        return image, level

    def tissue(self, downsample: float, analysis_mpp: float, settings: TissueSettings) -> "TissueMask":
        """Tissue of the image at ``downsample`` (level-0 px per analysis px), detected on a
        thumbnail ``settings.thumbnail_downsample`` times coarser."""
        thumb, _ = self.image_at(downsample * settings.thumbnail_downsample)
        return detect_tissue(image_to_array(thumb), settings.thumbnail_downsample, analysis_mpp, settings)

    def __repr__(self) -> str:
        dims = "x".join(map(str, (self.levels[0].width, self.levels[0].height)))
        return f"Slide({self.path.name}, {dims}, levels={len(self.levels)}, mpp={self.mpp})"


@dataclass(frozen=True)
class Resolution:
    """How a slide is read for analysis (decided once, by ``analysis_resolution``)."""

    downsample: float
    """Level-0 pixels per analysis pixel."""
    analysis_mpp: float | None
    """µm per analysis pixel; None when the slide's mpp is unknown."""
    assumed_mpp: float
    """``analysis_mpp``, or the target when unknown: converts µm settings (tissue fragments,
    minimum glomerulus area) to pixels."""


def analysis_resolution(slide: Slide, target_mpp: float, fallback_downsample: float) -> Resolution:
    """The one resolution rule, for analyze, prepare and evaluation alike: with an mpp, read at
    ``target_mpp`` (refusing slides scanned more than MAX_UPSAMPLING times coarser); without
    one, read level 0 / ``fallback_downsample`` and report areas in pixels only."""
    if slide.mpp is None:
        return Resolution(float(fallback_downsample), None, float(target_mpp))
    if slide.mpp > MAX_UPSAMPLING * target_mpp:
        raise SlideError(f"scanned at {slide.mpp:.3g} µm/px, too coarse for analysis at {target_mpp:.3g} µm/px "
                         f"(at most {MAX_UPSAMPLING * target_mpp:.3g} µm/px: scan at 10x or finer)")
    return Resolution(target_mpp / slide.mpp, float(target_mpp), float(target_mpp))


def _tiff_pages_of_levels(path: Path, levels: list[Level]) -> list[int] | None:
    """The TIFF page of each OpenSlide level, in level order (matched by size, one page per
    level), when libvips' TIFF reader gives exactly OpenSlide's pixels on a probe region of the
    finest and the coarsest level; else None (pixels stay with OpenSlide)."""
    try:
        first = pyvips.Image.tiffload(str(path), page=0)
        sizes: dict[tuple[int, int], list[int]] = {}
        for page in range(first.get("n-pages") if "n-pages" in first.get_fields() else 1):
            im = first if page == 0 else pyvips.Image.tiffload(str(path), page=page)
            sizes.setdefault((im.width, im.height), []).append(page)
        pages = []
        for level in levels:
            found = sizes.get((level.width, level.height), [])
            if len(found) != 1:
                return None
            pages.append(found[0])
        for level in {levels[0].index: levels[0], levels[-1].index: levels[-1]}.values():
            side_x, side_y = min(TIFF_PROBE_PX, level.width), min(TIFF_PROBE_PX, level.height)
            box = ((level.width - side_x) // 2, (level.height - side_y) // 2, side_x, side_y)
            by_openslide = _to_rgb(pyvips.Image.openslideload(str(path), level=level.index)).crop(*box).write_to_memory()
            by_tiff = _to_rgb(pyvips.Image.tiffload(str(path), page=pages[level.index])).crop(*box).write_to_memory()
            if by_openslide == by_tiff:
                continue
            if _openslide_python_region(path, level, box) == by_tiff:
                # Debian 12's OpenSlide 3.4.1 with libtiff 4.5.0-6+deb12u4 returns pixels that change from one
                # process to the next for a level held in one partial tile; OpenSlide 4 agrees with libvips
                log.info("%s: level %d as decoded by libvips' OpenSlide differs from OpenSlide %s (openslide-python) "
                         "and libvips' TIFF reader, which agree; decoding as TIFF", path.name, level.index,
                         _openslide_python_version())
                continue
            log.debug("%s: libvips' TIFF reader differs from OpenSlide on level %d; reading through OpenSlide",
                      path.name, level.index)
            return None
        return pages
    except pyvips.Error as exc:
        log.debug("%s: not read as TIFF pages (%s); reading through OpenSlide", path.name, _vips_reason(exc))
        return None


def _openslide_python_version() -> str:
    try:
        import openslide
    except ImportError:
        return "?"
    return getattr(openslide, "__library_version__", "?")


def _openslide_python_region(path: Path, level: Level, box: tuple[int, int, int, int]) -> bytes | None:
    """The probe region of ``level`` as OpenSlide itself decodes it through openslide-python
    (OpenSlide 4 from openslide-bin, with its own libtiff), as RGB bytes; None where it cannot be
    read or is not opaque (then no second opinion is given)."""
    try:
        import openslide

        x, y, width, height = box
        with openslide.OpenSlide(str(path)) as reference:
            downsample = reference.level_downsamples[level.index]
            rgba = np.asarray(reference.read_region((int(round(x * downsample)), int(round(y * downsample))),
                                                    level.index, (width, height)))
    except Exception:  # a second opinion only: any failure leaves the decision to libvips' OpenSlide
        return None
    if rgba.shape != (height, width, 4) or (rgba[..., 3] != 255).any():
        return None
    return np.ascontiguousarray(rgba[..., :3]).tobytes()


def _refuse_implausible_size(path: Path, level0: Level) -> None:
    if path.suffix.lower() in MULTI_FILE_EXTENSIONS or _kind(path) == "dicom":
        return
    size = path.stat().st_size
    if level0.width * level0.height > MAX_PIXELS_PER_FILE_BYTE * size:
        raise SlideError(f"header claims {level0.width} x {level0.height} px but the file has only {size} bytes: "
                         "truncated or corrupt, not read")


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not np.isfinite(mpp):
        return None
    return float(mpp) if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _vips_reason(exc: pyvips.Error) -> str:
    text = (getattr(exc, "detail", "") or str(exc)).strip()
    return " ".join(text.split())[:300]


class TileReader:
    """Reads fixed-size tiles from a lazy image; past the right and bottom edges the image is
    mirrored (a tile wholly outside it is white).

    One pyvips Region per thread, so several reader threads can fetch at once.
    """

    def __init__(self, image: pyvips.Image, tile: int):
        self.image = image
        self.tile = tile
        self._local = threading.local()

    def read(self, x: int, y: int) -> np.ndarray:
        t = self.tile
        out = np.full((t, t, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + t, self.image.width), min(y + t, self.image.height)
        if x1 <= x0 or y1 <= y0:
            return out
        region = getattr(self._local, "region", None)
        if region is None:
            region = self._local.region = pyvips.Region.new(self.image)
        try:
            data = region.fetch(x0, y0, x1 - x0, y1 - y0)
        except pyvips.Error as exc:
            raise SlideError(f"read failed at ({x0},{y0}): {_vips_reason(exc)}") from exc
        block = np.frombuffer(data, np.uint8).reshape(y1 - y0, x1 - x0, 3)
        if (y0, x0) == (y, x):
            # Past the image edge the tile is mirrored, not white: a model trained on tissue
            # sees no artificial glass (measured: a 512 px field padded white to a 1024 px tile
            # lost most of its glomeruli; mirrored it kept them).
            return np.pad(block, ((0, t - block.shape[0]), (0, t - block.shape[1]), (0, 0)), mode="symmetric")
        out[y0 - y : y1 - y, x0 - x : x1 - x] = block
        return out


@dataclass
class TissueMask:
    mask: np.ndarray
    """bool (h, w) at ``downsample`` analysis pixels per mask pixel."""
    downsample: float
    """Analysis pixels per mask pixel."""
    threshold: float
    """Saturation threshold used."""

    def area_px(self) -> float:
        """Tissue area in analysis pixels."""
        return float(self.mask.sum()) * self.downsample**2


def detect_tissue(thumbnail: np.ndarray, downsample: float, analysis_mpp: float,
                  settings: TissueSettings) -> TissueMask:
    """Otsu on HSV saturation, clamped, then closing, hole filling and small-fragment removal.

    ``thumbnail`` is uint8 RGB at ``downsample`` analysis pixels per pixel.
    """
    saturation, brightness = saturation_and_brightness(thumbnail)
    threshold = float(np.clip(otsu_threshold(saturation), settings.min_saturation, settings.max_saturation))
    mask = (saturation > threshold) & (brightness > BLACK_MAX)  # pure black (scanner borders) is not tissue
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    thumb_px_um2 = (downsample * analysis_mpp) ** 2
    min_px = settings.min_tissue_area_um2 / thumb_px_um2
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])  # values above this edge are the upper class


def file_fingerprint(path: Path) -> dict:
    """Identity of an input for resume decisions: size and modification time (ns), summed over
    every file of the slide (a DICOM series has several)."""
    if _broken_link(Path(path)):
        return {"broken_link": os.readlink(path)}
    files = slide_files(path)
    stats = [os.stat(p) for p in files]
    fingerprint = {"size": sum(st.st_size for st in stats), "mtime_ns": max(st.st_mtime_ns for st in stats)}
    if len(files) > 1:
        fingerprint["files"] = len(files)
    return fingerprint
