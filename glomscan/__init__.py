"""glomscan: whole-slide glomerulus segmentation and percent global glomerulosclerosis.

Data flow: slides -> tiling -> engines -> merge -> postprocess -> report; `pipeline` runs it
per slide, `batch` over a folder, `cli` is a thin click layer over both.
"""

__version__ = "0.1.0"

from .labels import CLASS_NAMES  # noqa: E402,F401  (the model's output channels, re-exported)

# OpenSlide 4 (the openslide-bin wheel, for DICOM) must be loaded before libvips, whose own
# system OpenSlide 3 and libraries otherwise break it: see glomscan/dicom.py.
import sys as _sys

OPENSLIDE_LOADED_BEFORE_VIPS = "pyvips" not in _sys.modules
if OPENSLIDE_LOADED_BEFORE_VIPS:
    try:
        import openslide as _openslide  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency; DICOM then reports it is unavailable
        pass
