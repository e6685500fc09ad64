"""PyTorch eager backend (CPU, or CUDA with fp16 autocast)."""

from __future__ import annotations

import numpy as np
import torch

from ..model import LoadedModel
from .base import Engine, normalise


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model: LoadedModel, device: str | None = None):
        self.card = model.card
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.module = model.module.to(self.device).eval()

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalise(tiles, self.card)).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.device == "cuda"):
            logits = self.module(x)
        return torch.sigmoid(logits.float()).cpu().numpy()

    @property
    def description(self) -> str:
        return f"torch ({self.device})"

    @property
    def preferred_batch_size(self) -> int:
        return 8 if self.device == "cuda" else 1
