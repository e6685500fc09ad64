"""PyTorch eager backend: the CPU in fp32, or a CUDA GPU with the fast path (uint8 tiles copied
from pinned host memory asynchronously, normalised on the GPU, channels_last, fp16 autocast)."""

from __future__ import annotations

import numpy as np
import torch

from ..model import LoadedModel
from .base import Engine, normalise

TORCH_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def normalisation_tensors(card, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset), each (1, 3, 1, 1): normalised = uint8 value * scale + offset."""
    std = torch.tensor(card.std, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)
    mean = torch.tensor(card.mean, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def normalise_tensor(tiles: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 tensor -> (N, 3, H, W) float32 in channels_last memory (no copy of the
    layout), normalised on the tensor's device; the same values as ``base.normalise``."""
    return tiles.permute(0, 3, 1, 2).float().mul_(scale).add_(offset)


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model: LoadedModel, device: str | None = None, precision: str = "fp16"):
        """``precision`` applies on CUDA (fp16 or bf16 autocast, or fp32); the CPU runs fp32."""
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"torch precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        self.card = model.card
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = torch.device(self.device).type == "cuda"
        self.precision = precision if self.cuda else "fp32"
        self.module = model.torch_module().to(self.device).eval()
        self._staging: torch.Tensor | None = None
        self._results: torch.Tensor | None = None
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # one tile size per run: let cuDNN pick its kernels
            self.module.to(memory_format=torch.channels_last)
            self._scale, self._offset = normalisation_tensors(self.card, self.device)

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        if not self.cuda:
            with torch.inference_mode():
                logits = self.module(torch.from_numpy(normalise(tiles, self.card)))
            return torch.sigmoid(logits.float()).numpy()
        n = len(tiles)
        with torch.inference_mode():
            x = self._to_gpu(tiles)
            with torch.autocast("cuda", dtype=TORCH_PRECISIONS[self.precision] or torch.float32,
                                enabled=self.precision != "fp32"):
                logits = self.module(x)
            probabilities = torch.sigmoid(logits.float())
            if self._results is None or self._results.shape != probabilities.shape:
                self._results = torch.empty(probabilities.shape, dtype=torch.float32).pin_memory()
            self._results.copy_(probabilities, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # staging and results buffers free again
        return self._results[:n].numpy().copy()  # the caller may keep it while the next batch runs

    def _to_gpu(self, tiles: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> normalised (B, 3, H, W) float32 on the GPU in channels_last
        layout (the NHWC bytes as they are: a quarter of the bytes of float32 cross the bus).
        B is the largest batch seen: a smaller one (a slide's last) is padded to it, so the GPU
        always sees one shape and cuDNN does not tune its kernels again for every new size."""
        shape = tiles.shape
        if self._staging is None or self._staging.shape[1:] != shape[1:] or self._staging.shape[0] < shape[0]:
            self._staging = torch.zeros(shape, dtype=torch.uint8).pin_memory()
        self._staging.numpy()[:len(tiles)] = tiles
        return normalise_tensor(self._staging.to(self.device, non_blocking=True), self._scale, self._offset)

    @property
    def description(self) -> str:
        return f"torch ({self.device}, {self.precision})"

    @property
    def preferred_batch_size(self) -> int:
        return 8 if self.cuda else 1
