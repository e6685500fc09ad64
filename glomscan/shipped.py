"""What ships inside the package: the default model and the real-tissue demo sample."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = Path(__file__).parent / "models" / "default.onnx"
"""A glomscan ONNX model file (``export-onnx --model-file`` of the trained checkpoint): ONNX
Runtime and OpenVINO run it without torch; the torch backends, TensorRT and ``train --init``
rebuild the torch network from it."""
SHIPPED_VERIFIER = Path(__file__).parent / "models" / "verifier.onnx"
"""The candidate verifier paired with the shipped model (``glomscan.verify``; card:
docs/verifier-card.md): ONNX Runtime runs it on the CPU, without torch."""
SAMPLE_DIR = Path(__file__).parent / "sample"
"""Three held-out AIDPATH PAS tiles as one pyramidal TIFF, with their outlines (CC BY 4.0;
see ATTRIBUTION.md there)."""


def default_model_path() -> Path | None:
    return SHIPPED_MODEL if SHIPPED_MODEL.is_file() else None


def default_verifier_path() -> Path | None:
    return SHIPPED_VERIFIER if SHIPPED_VERIFIER.is_file() else None
