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


class CudaTransfer:
    """Tiles to a CUDA GPU and probabilities back, through pinned host buffers: the uint8 NHWC
    bytes cross the bus as they are (a quarter of the bytes of float32) and are normalised on the
    GPU into channels_last float32; the probabilities come back through a pinned buffer (a
    pageable one cost 57 ms per batch of 8 x 2 x 1024² on an H200, a pinned one 1.2 ms). The batch
    is the largest seen so far: a smaller one (a slide's last) is padded to it, so the GPU always
    sees one shape and cuDNN does not tune its kernels again for every new size. Shared by the
    torch and TensorRT engines; on a CPU device (tests) the same steps run without pinning."""

    def __init__(self, card, device: str):
        self.device = device
        self._cuda = torch.device(device).type == "cuda"
        self._scale, self._offset = normalisation_tensors(card, device)
        self._staging: torch.Tensor | None = None
        self._results: torch.Tensor | None = None

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self._cuda else tensor

    def to_device(self, tiles: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> normalised (B >= N, 3, H, W) float32 on the GPU, channels_last."""
        shape = tiles.shape
        if self._staging is None or self._staging.shape[1:] != shape[1:] or self._staging.shape[0] < shape[0]:
            self._staging = self._host(torch.zeros(shape, dtype=torch.uint8))
        self._staging.numpy()[:len(tiles)] = tiles
        return normalise_tensor(self._staging.to(self.device, non_blocking=self._cuda), self._scale, self._offset)

    def to_host(self, probabilities: torch.Tensor, n: int) -> np.ndarray:
        """The first ``n`` of (B, C, H, W) float32 GPU probabilities as a numpy array of the
        caller's own; waits for the current stream, so both buffers are free again after it."""
        if self._results is None or self._results.shape != probabilities.shape:
            self._results = self._host(torch.empty(probabilities.shape, dtype=torch.float32))
        self._results.copy_(probabilities, non_blocking=self._cuda)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return self._results[:n].numpy().copy()  # the caller may keep it while the next batch runs


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
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # one tile size per run: let cuDNN pick its kernels
            self.module.to(memory_format=torch.channels_last)
            self._transfer = CudaTransfer(self.card, self.device)

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        if not self.cuda:
            with torch.inference_mode():
                logits = self.module(torch.from_numpy(normalise(tiles, self.card)))
            return torch.sigmoid(logits.float()).numpy()
        with torch.inference_mode():
            x = self._transfer.to_device(tiles)
            with torch.autocast("cuda", dtype=TORCH_PRECISIONS[self.precision] or torch.float32,
                                enabled=self.precision != "fp32"):
                logits = self.module(x)
            return self._transfer.to_host(torch.sigmoid(logits.float()), len(tiles))

    @property
    def description(self) -> str:
        return f"torch ({self.device}, {self.precision})"

    @property
    def preferred_batch_size(self) -> int:
        return 8 if self.cuda else 1

    @property
    def gpu_memory_peak_mib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1) if self.cuda else None
