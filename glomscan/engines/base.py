"""The engine interface: uint8 RGB tiles in, per-class probabilities out."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model import ModelCard


@dataclass(frozen=True)
class EngineChoice:
    backend: str
    reason: str


class Engine(ABC):
    """``predict`` maps (N, H, W, 3) uint8 tiles to (N, C, H, W) float32 probabilities in [0, 1],
    C = len(card.classes) (independent sigmoid per class, as trained with BCE + Dice)."""

    backend: str = "abstract"
    card: ModelCard

    @abstractmethod
    def predict(self, tiles: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # pragma: no cover - default no-op
        pass

    @property
    def preferred_batch_size(self) -> int:
        """Tiles per call when the user does not say: 1 on a CPU (same speed, half the memory
        of 2 for a 1024 px EfficientNet-B3 U-Net), more on a GPU."""
        return 1

    @property
    def description(self) -> str:
        return self.backend

    @property
    def gpu_memory_peak_mib(self) -> float | None:
        """GPU memory this process's engine has allocated at most so far (None: not known, or
        no GPU)."""
        return None


def normalise(tiles: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised with the card's mean/std."""
    scale = (1.0 / (255.0 * np.asarray(card.std, np.float32))).reshape(1, 3, 1, 1)
    offset = (-np.asarray(card.mean, np.float32) / np.asarray(card.std, np.float32)).reshape(1, 3, 1, 1)
    x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32)  # one pass: layout + type
    x *= scale
    x += offset
    return x


def cuda_available() -> bool:
    """A CUDA GPU that torch can use. torch is asked only where an NVIDIA driver is loaded
    (``/dev/nvidiactl``), so a CPU-only analysis never imports torch (about 730 MiB per worker)."""
    from .cuda_runtime import nvidia_driver_loaded

    if not nvidia_driver_loaded():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    """CUDA GPUs this process may use, without torch where the CUDA runtime bindings are
    installed (the GPU analysis install), else through torch; 0 without an NVIDIA driver."""
    from .cuda_runtime import CudaRuntime, CudaUnavailable, nvidia_driver_loaded

    if not nvidia_driver_loaded():
        return 0
    try:
        return CudaRuntime().device_count()
    except CudaUnavailable:
        pass
    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


def default_engine_dir() -> Path:
    """Where ONNX exports, OpenVINO's compiled models and TensorRT engines are cached:
    $GLOMSCAN_ENGINE_DIR (Docker sets /engines, a volume), else the user's cache folder
    ($XDG_CACHE_HOME/glomscan/engines, by default ~/.cache/glomscan/engines)."""
    if os.environ.get("GLOMSCAN_ENGINE_DIR"):
        return Path(os.environ["GLOMSCAN_ENGINE_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "glomscan" / "engines"
