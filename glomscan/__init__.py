"""glomscan: whole-slide glomerulus segmentation and percent global glomerulosclerosis.

Data flow: slides -> tiling -> engines -> merge -> postprocess -> report; `pipeline` runs it
per slide, `batch` over a folder, `cli` is a thin click layer over both.
"""

__version__ = "0.1.0"

CLASS_NAMES = ("normal", "sclerosed")
"""Model output channels, in order. Mask label value = channel index + 1 (0 is background)."""
