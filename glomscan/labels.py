"""Label values and class names: one place for analysis, review and training alike.

Mask label values: 0 background, 1 normal, 2 globally sclerosed (a model's output channel + 1);
training masks also carry ``UNKNOWN_CLASS`` for glomerulus pixels whose class is not known.
"""

from __future__ import annotations

BACKGROUND = 0
NORMAL = 1
SCLEROSED = 2
UNKNOWN_CLASS = 3
"""Label value of pixels known to be glomerulus whose class (normal/sclerosed) is unknown: they
supervise glomerulus vs background only."""

CLASS_NAMES = ("normal", "sclerosed")
"""Model output channels, in order. Mask label value = channel index + 1 (0 is background)."""
LABEL_OF_CLASS = {"normal": NORMAL, "sclerosed": SCLEROSED}

QUPATH_CLASS_NAMES = {"normal": "Glomerulus normal", "sclerosed": "Glomerulus sclerosed"}
"""The QuPath classification names glomscan writes (GeoJSON, review page corrections)."""
