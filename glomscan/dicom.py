"""DICOM whole-slide images (VL Whole Slide Microscopy, one series = one slide).

A slide in DICOM is a set of instances (usually one file per pyramid level, plus label and
overview images) sharing a Series Instance UID; a single multi-frame file can be a whole slide.
Files are grouped into slides by reading their headers (pydicom, pixels not read); the pixels
are read by OpenSlide 4 through the ``openslide-bin`` wheel, since the distribution's OpenSlide
(3.4 in Debian 12, the one inside libvips) has no DICOM support. mpp comes from the DICOM pixel
spacing (OpenSlide's ``openslide.mpp-x``).

Reading: the pipeline works on lazy pyvips images; a DICOM pyramid level that the pipeline asks
for is streamed once, in bands of rows, from OpenSlide into an uncompressed file in a private
temporary folder, which libvips then reads with random access (memory stays at one band; disk
holds width x height x 3 bytes of each level used, deleted when the slide is closed).

Two OpenSlide libraries in one process: libvips brings the system OpenSlide 3 and the
system's GLib; ``openslide-bin``'s OpenSlide 4 carries its own. Loaded after libvips, OpenSlide 4
fails (seen: every slide's ICC profile size comes back as -1); loaded first, both work in either
order of use. So importing ``glomscan`` loads ``openslide`` before anything imports pyvips
(``glomscan/__init__.py``), and a process that imported pyvips first is told so here.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips

from . import OPENSLIDE_LOADED_BEFORE_VIPS

log = logging.getLogger(__name__)

DICOM_EXTENSIONS = {".dcm", ".dicom"}
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage."""
BAND_ROWS = 512


class DicomError(Exception):
    """A DICOM file is not a usable slide; the message is the reason for the batch summary."""


@dataclass(frozen=True)
class DicomInstance:
    path: Path
    series_uid: str
    sop_class: str
    image_type: tuple[str, ...]

    @property
    def is_volume(self) -> bool:
        """A pyramid level (not a label, overview or thumbnail image)."""
        return len(self.image_type) < 3 or self.image_type[2].upper() == "VOLUME"


def read_instance(path: Path) -> DicomInstance:
    """The header of one file (no pixels); raises DicomError when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():  # non-conformant but harmless headers (e.g. 65-char UIDs)
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return DicomInstance(Path(path), str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPClassUID", "")),
                                 tuple(str(v) for v in (ds.get("ImageType") or ())))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DicomError(f"not a readable DICOM file: {exc}") from exc


def read_slide_instance(path: Path) -> DicomInstance:
    """The header of a file that must be part of a whole-slide image; DicomError otherwise."""
    instance = read_instance(path)
    if instance.sop_class != WSI_SOP_CLASS:
        raise DicomError(f"DICOM file is not a whole-slide image (SOP class {instance.sop_class or 'missing'}; "
                         f"expected VL Whole Slide Microscopy {WSI_SOP_CLASS})")
    return instance


def group_dicom_files(paths: list[Path]) -> tuple[dict[Path, list[Path]], dict[Path, str]]:
    """Group DICOM files into slides by series. Returns {representative file: all files of its
    series} and {file: reason} for files that cannot be part of a slide (not DICOM, not a
    whole-slide image), so that every file is accounted for."""
    series: dict[str, list[DicomInstance]] = {}
    problems: dict[Path, str] = {}
    for path in sorted(paths):
        try:
            instance = read_slide_instance(path)
        except DicomError as exc:
            problems[path] = str(exc)
            continue
        series.setdefault(instance.series_uid or str(path), []).append(instance)
    slides = {}
    for instances in series.values():
        volumes = [i for i in instances if i.is_volume] or instances
        slides[volumes[0].path] = sorted(i.path for i in instances)
    return slides, problems


class DicomSlideReader:
    """One DICOM slide read through OpenSlide 4: levels, mpp, and levels as pyvips images."""

    def __init__(self, path: Path):
        try:
            import openslide
        except ImportError as exc:  # pragma: no cover - the package depends on it
            raise DicomError("DICOM slides need the openslide-bin and openslide-python packages") from exc
        self.path = Path(path)
        read_slide_instance(self.path)
        if not OPENSLIDE_LOADED_BEFORE_VIPS:
            raise DicomError("DICOM reading is unavailable in this process: pyvips was imported before glomscan "
                             "(import glomscan first, so that OpenSlide 4 loads before libvips)")
        if tuple(int(v) for v in openslide.__library_version__.split(".")[:1]) < (4,):
            raise DicomError(f"DICOM slides need OpenSlide >= 4 (found {openslide.__library_version__}); "
                             "install the openslide-bin package")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise DicomError(f"cannot read DICOM slide: {exc}") from exc
        if self._slide.detect_format(str(self.path)) != "dicom":
            self._slide.close()
            raise DicomError("not a DICOM slide")
        self.level_dimensions = list(self._slide.level_dimensions)
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        try:
            self.mpp = float(props["openslide.mpp-x"]) if "openslide.mpp-x" in props else None
        except ValueError:
            self.mpp = None
        self._lock = threading.Lock()
        self._folder: Path | None = None

    def level_image(self, index: int) -> pyvips.Image:
        """The level as a random-access uint8 RGB pyvips image (streamed to disk once)."""
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="glomscan-dicom-"))
            raw = self._folder / f"level{index}.rgb"
            width, height = self.level_dimensions[index]
            if not raw.exists():
                partial = raw.with_suffix(".partial")
                try:
                    with open(partial, "wb") as f:
                        for y in range(0, height, BAND_ROWS):
                            f.write(self._read_band(index, y, width, min(BAND_ROWS, height - y)).tobytes())
                except Exception as exc:
                    partial.unlink(missing_ok=True)
                    raise DicomError(f"read failed in level {index}: {exc}") from exc
                partial.rename(raw)
            return pyvips.Image.rawload(str(raw), width, height, 3).copy(interpretation="srgb")

    def _read_band(self, index: int, y: int, width: int, rows: int) -> np.ndarray:
        """Rows [y, y + rows) of a level as uint8 RGB, transparent pixels on white (glass)."""
        ds = self.level_downsamples[index]
        rgba = np.asarray(self._slide.read_region((0, int(round(y * ds))), index, (width, rows)), np.uint8)
        alpha = rgba[..., 3:4].astype(np.uint16)
        return ((rgba[..., :3] * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
