"""The model that ships inside the package (none yet: see the training issue)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = Path(__file__).parent / "models" / "default.pt"


def default_model_path() -> Path | None:
    return SHIPPED_MODEL if SHIPPED_MODEL.is_file() else None
