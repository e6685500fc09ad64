"""analyze's outputs as the evaluations through analyze read them: running analyze on a folder
of images, and per image its label image (mask.tif), report.json and the verifier's rejected
candidates (rejected.geojson), painted back to see what the segmentation model alone found."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyvips
from scipy import ndimage

from ...config import AnalysisSettings
from ...imaging import image_to_array
from ...labels import LABEL_OF_CLASS
from ...model import LoadedModel
from ...postprocess import EIGHT_CONNECTED
from ...report import REJECTED_FILE, polygon_mask


def analyse_folder(model: LoadedModel, images: Path, out_dir: Path, backend: str, settings: AnalysisSettings,
                   quiet: bool) -> None:
    """``analyze`` of the images in ``images`` into ``out_dir/analysis`` (engines cached in
    ``out_dir/engines``): what every evaluation through analyze scores."""
    from ...batch import run_batch
    from ...engines import EngineOptions, create_engine

    engine, choice = create_engine(backend, model, EngineOptions(engine_dir=out_dir / "engines"))
    try:
        run_batch(images, out_dir / "analysis", model, engine, choice, settings, quiet=quiet)
    finally:
        engine.close()


def read_mask(result_dir: Path) -> np.ndarray:
    """analyze's label image (0 background, 1 normal, 2 sclerosed) at analysis resolution."""
    return image_to_array(pyvips.Image.tiffload(str(Path(result_dir) / "mask.tif"), page=0))[..., 0]


def read_report(result_dir: Path) -> dict:
    """analyze's report.json of one image ({} when there is none)."""
    path = Path(result_dir) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_rejected(result_dir: Path) -> list[tuple[np.ndarray, int]]:
    """The verifier's rejected candidates of one image: (ring as (x, y) level-0 pixels, label of
    the class the segmentation model gave it: 1 normal, 2 sclerosed); [] without rejected.geojson."""
    path = Path(result_dir) / REJECTED_FILE
    if not path.is_file():
        return []
    out = []
    for feature in json.loads(path.read_text()).get("features", []):
        geometry = feature.get("geometry") or {}
        if geometry.get("type") != "Polygon" or not geometry.get("coordinates"):
            continue
        properties = feature.get("properties") or {}
        candidate = (properties.get("glomscan") or {}).get("candidate_class")
        if candidate not in LABEL_OF_CLASS:  # older or hand-made file: the class probabilities decide
            m = properties.get("measurements") or {}
            candidate = "sclerosed" if m.get("p_sclerosed", 0.0) > m.get("p_normal", 0.0) else "normal"
        out.append((np.asarray(geometry["coordinates"][0], np.float64).reshape(-1, 2), LABEL_OF_CLASS[candidate]))
    return out


def candidate_labels(pred: np.ndarray, rejected: list[tuple[np.ndarray, int]],
                     downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """What the segmentation stage alone found: analyze's labels with the rejected candidates
    painted back (their candidate class) on background pixels, and an instance image that keeps
    every candidate its own object (a repainted outline touching an accepted glomerulus does not
    merge with it). Rings are level-0 pixel-edge coordinates; ``downsample`` = level-0 pixels per
    analysis pixel."""
    components, n = ndimage.label(pred > 0, structure=EIGHT_CONNECTED)
    labels = pred.copy()
    h, w = pred.shape
    for ring, label in rejected:
        x, y = ring[:, 0] / downsample, ring[:, 1] / downsample
        inside = polygon_mask(y - 0.5, x - 0.5, (h, w)) & (labels == 0)
        if not inside.any():  # smaller than a pixel at this resolution: its centre pixel
            cx, cy = int(np.floor(x.mean())), int(np.floor(y.mean()))
            if not (0 <= cx < w and 0 <= cy < h) or labels[cy, cx]:
                continue
            inside[cy, cx] = True
        n += 1
        components[inside] = n
        labels[inside] = label
    return labels, components


def component_classes(pred: np.ndarray, components: np.ndarray, n: int) -> np.ndarray:
    """Per component 1..n (index 0 unused): the majority label (1 normal, 2 sclerosed; ties normal)."""
    counts = np.bincount(components.ravel().astype(np.int64) * 3 + np.minimum(pred, 2).ravel(),
                         minlength=(n + 1) * 3).reshape(n + 1, 3)
    return counts[:, 1:].argmax(axis=1) + 1
