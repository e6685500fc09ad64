"""Inference backends behind one small interface (see ``base.Engine``).

``auto`` order: tensorrt (CUDA GPU + TensorRT >= 10) -> onnxruntime with CUDA -> torch CUDA ->
openvino (CPU) -> onnxruntime CPU -> torch CPU. The choice and the reason go to the log and into report.json.
The onnxruntime and openvino backends never import torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from ..config import BACKENDS
from ..model import LoadedModel
from .base import Engine, EngineChoice, cuda_available, default_engine_dir
from .cuda_runtime import NO_GPU_HINT, NVIDIA_DRIVER_NODE, nvidia_driver_loaded

log = logging.getLogger(__name__)



def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class EngineOptions:
    engine_dir: Path = field(default_factory=default_engine_dir)
    """Where ONNX exports, TensorRT engines, sidecars and the timing cache live."""
    precision: str = "fp16"
    max_batch: int = 8
    workspace_gb: float = 4.0
    tile: int | None = None
    """Tile size the TensorRT profile is built for (default: the model card's)."""
    cpu_threads: int | None = None
    """ONNX Runtime CPU threads (default: all cores; a Dask worker sharing the CPU sets its share)."""


@dataclass(frozen=True)
class _Candidate:
    """One way to run the model: whether it can here (and why), and how to build it."""

    backend: str
    status: Callable[[], tuple[bool, str]]
    """(available, what it is or why it is not)."""
    build: Callable[[], tuple[Engine, str]]
    """The engine and what to say about it beyond the status."""


AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "openvino", "onnxruntime", "torch-cpu")
"""What ``auto`` tries, in order (the names in its 'passed over' list)."""


def _candidates(model: LoadedModel, options: EngineOptions) -> dict[str, _Candidate]:
    """Every way to run ``model`` with ``options``, by name; nothing is imported or built until asked."""
    from .onnx import cached_onnx, onnxruntime_providers, usable_onnxruntime_providers
    from .openvino import openvino_status
    from .tensorrt import prepare_tensorrt, tensorrt_status

    def torch_engine(device: str | None):
        def build():
            from .torch_engine import TorchEngine

            engine = TorchEngine(model, device, options.precision)
            return engine, f"torch on {engine.device} ({engine.precision})"
        return build

    def onnxruntime_engine():
        from .onnx import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(model, cached_onnx(model, options.engine_dir), threads=options.cpu_threads)
        return engine, f"providers {engine.providers}"

    def openvino_engine():
        from .openvino import OpenVinoEngine

        engine = OpenVinoEngine(model, cached_onnx(model, options.engine_dir), options.engine_dir,
                                precision="f32" if options.precision == "fp32" else "auto", threads=options.cpu_threads)
        return engine, f"{engine.precision} ({engine.reason})"

    def tensorrt_engine():
        return prepare_tensorrt(model, options.engine_dir, options.precision, options.tile, options.max_batch,
                                options.workspace_gb)

    def torch_status(device: str) -> Callable[[], tuple[bool, str]]:
        def status():
            if not _installed("torch"):
                return False, "torch is not installed (pip install \"glomscan[train]\")"
            if device == "cuda":
                return (True, "torch CUDA") if cuda_available() else (False, "no CUDA GPU")
            return True, "torch"
        return status

    def onnxruntime_status() -> tuple[bool, str]:
        return (True, "onnxruntime") if onnxruntime_providers() else \
            (False, "the onnxruntime package is not installed (pip install onnxruntime)")

    def onnxruntime_cuda_status() -> tuple[bool, str]:
        return (True, "CUDA execution provider") if "CUDAExecutionProvider" in usable_onnxruntime_providers() else \
            (False, "no CUDA execution provider, or no GPU")

    return {
        "tensorrt": _Candidate("tensorrt", tensorrt_status, tensorrt_engine),
        "onnxruntime-cuda": _Candidate("onnxruntime", onnxruntime_cuda_status, onnxruntime_engine),
        "torch-cuda": _Candidate("torch", torch_status("cuda"), torch_engine("cuda")),
        "openvino": _Candidate("openvino", openvino_status, openvino_engine),
        "onnxruntime": _Candidate("onnxruntime", onnxruntime_status, onnxruntime_engine),
        "torch-cpu": _Candidate("torch", torch_status("cpu"), torch_engine("cpu")),
        "torch": _Candidate("torch", torch_status("any"), torch_engine(None)),  # explicit: its GPU if it has one
    }


def create_engine(backend: str, model: LoadedModel, options: EngineOptions | None = None) -> tuple[Engine, EngineChoice]:
    """Instantiate ``backend`` for ``model``. Explicit backends fail loudly when unavailable;
    ``auto`` walks ``AUTO_ORDER`` and records why each earlier candidate was passed over (a
    TensorRT engine that fails to build is passed over too, with a warning: a batch goes on)."""
    from .onnx import onnxruntime_providers

    options = options or EngineOptions()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    candidates = _candidates(model, options)
    if backend != "auto":
        candidate = candidates[backend]
        ok, why = candidate.status()
        if not ok:
            raise RuntimeError(f"--backend {backend} is not available here: {why}")
        engine, how = candidate.build()
        return engine, EngineChoice(candidate.backend, f"requested; {why}; {how}")
    if not nvidia_driver_loaded() and ("CUDAExecutionProvider" in onnxruntime_providers() or _installed("tensorrt")):
        log.warning("this installation is for a GPU but no NVIDIA GPU is visible (%s); analysing on the CPU. "
                    "%s.", NVIDIA_DRIVER_NODE, NO_GPU_HINT[0].upper() + NO_GPU_HINT[1:])
    passed_over = []
    for name in AUTO_ORDER:
        candidate = candidates[name]
        ok, why = candidate.status()
        if ok:
            try:
                engine, how = candidate.build()
            except Exception as exc:
                if name != "tensorrt":
                    raise
                log.warning("TensorRT unusable, falling back: %s", exc)  # a failed build must not stop the batch
                why = f"TensorRT failed: {exc}"
            else:
                skipped = f"; passed over {', '.join(passed_over)}" if passed_over else ""
                return engine, EngineChoice(candidate.backend, f"auto: {why}; {how}{skipped}")
        passed_over.append(f"{name} ({why})")
    raise RuntimeError("no inference backend can run here: " + ", ".join(passed_over))
