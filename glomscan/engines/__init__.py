"""Inference backends behind one small interface (see ``base.Engine``)."""

from __future__ import annotations

import logging

from ..model import LoadedModel
from .base import Engine, EngineChoice
from .torch_engine import TorchEngine

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def create_engine(backend: str, model: LoadedModel) -> tuple[Engine, EngineChoice]:
    """Instantiate ``backend`` for ``model``. ``auto`` picks the fastest available and says why."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        choice = EngineChoice("torch", f"auto: torch on {device} (the only backend built so far)")
        return TorchEngine(model, device=device), choice
    if backend == "torch":
        engine = TorchEngine(model)
        return engine, EngineChoice("torch", f"requested: torch on {engine.device}")
    raise NotImplementedError(
        f"backend {backend!r} is not available in this build yet; use --backend torch"
    )
