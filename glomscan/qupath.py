"""QuPath GeoJSON, read and written in one place: the outlines glomscan writes (its results, the
synthetic slides' ground truth) and the ones it reads (pathologists' annotations, corrections
exported from the review page). Coordinates are level-0 pixels, as QuPath exports them.

Files QuPath writes come as a FeatureCollection, a list of features or a single feature; a
feature's class is its ``classification`` name (an object or, in old exports, a string), else
its ``name``. Reading maps class names through a caller's ``class_map`` (lower-cased name ->
label) and counts what it skipped, so nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text
from .labels import BACKGROUND, NORMAL, SCLEROSED, UNKNOWN_CLASS


# -- writing --------------------------------------------------------------------------------------
def polygon_feature(rings: list, class_name: str, *, object_type: str = "annotation", colour=None,
                    feature_id: str | None = None, name: str | None = None, properties: dict | None = None) -> dict:
    """A QuPath polygon feature: ``rings`` (outline first, then holes) as [[x, y], ...] lists,
    classified ``class_name`` (with an RGB ``colour`` where given); ``properties`` are added
    after the classification (measurements, locks, glomscan's own keys)."""
    classification = {"name": class_name, **({"color": list(colour)} if colour is not None else {})}
    feature = {"type": "Feature"}
    if feature_id is not None:
        feature["id"] = feature_id
    feature["geometry"] = {"type": "Polygon", "coordinates": rings}
    feature["properties"] = {"objectType": object_type, **({"name": name} if name is not None else {}),
                             "classification": classification, **(properties or {})}
    return feature


def feature_collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}


def write_geojson(collection: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(collection))


# -- reading --------------------------------------------------------------------------------------
def read_features(path: Path) -> list[dict]:
    """The features of a QuPath export (a FeatureCollection, a list of features or one)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return data.get("features", [])
    return data if isinstance(data, list) else [data]


def classification_name(feature: dict) -> str:
    """The feature's class name: its classification's, else its name; '' when it has neither."""
    props = feature.get("properties") or {}
    cls = props.get("classification") or {}
    return (cls.get("name") if isinstance(cls, dict) else str(cls)) or props.get("name") or ""


@dataclass
class PolygonAnnotation:
    label: int
    rings: list[np.ndarray]
    """First ring is the outline, the others holes; (n, 2) arrays of level-0 (x, y)."""


@dataclass
class PointAnnotation:
    label: int
    x: float
    y: float
    """Level-0 pixels: a glomerulus marked by its centre only (a missed one added in the review page)."""


def read_qupath_geojson(path: Path, class_map: dict[str, int]) -> tuple[list[PolygonAnnotation], dict[str, int]]:
    """Polygons (and MultiPolygons) with a mapped classification. Returns them and the count of
    features skipped per unmapped classification name, so nothing is dropped silently; features
    mapped to the background label are left out on purpose (e.g. corrected false detections)."""
    polygons, skipped = [], {}
    for f in read_features(path):
        name = classification_name(f)
        label = class_map.get(name.strip().lower())
        geometry = f.get("geometry") or {}
        if label is None:
            skipped[name or "<unclassified>"] = skipped.get(name or "<unclassified>", 0) + 1
            continue
        if label == BACKGROUND:
            continue
        parts = ([geometry["coordinates"]] if geometry.get("type") == "Polygon"  # points: read_qupath_points
                 else geometry.get("coordinates", []) if geometry.get("type") == "MultiPolygon" else [])
        for rings in parts:
            polygons.append(PolygonAnnotation(label, [np.asarray(r, np.float64)[:, :2] for r in rings]))
    return polygons, skipped


def read_qupath_points(path: Path, class_map: dict[str, int]) -> list[PointAnnotation]:
    """Point (and MultiPoint) features with a mapped glomerulus classification (normal,
    sclerosed or class unknown)."""
    points = []
    for f in read_features(path):
        geometry = f.get("geometry") or {}
        coordinates = ([geometry.get("coordinates")] if geometry.get("type") == "Point"
                       else geometry.get("coordinates", []) if geometry.get("type") == "MultiPoint" else [])
        if not coordinates:
            continue
        label = class_map.get(classification_name(f).strip().lower())
        if label in (NORMAL, SCLEROSED, UNKNOWN_CLASS):
            points += [PointAnnotation(label, float(c[0]), float(c[1])) for c in coordinates]
    return points
