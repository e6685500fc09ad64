"""Inference backends behind one small interface (see ``base.Engine``).

``auto`` order: tensorrt (CUDA GPU + TensorRT >= 10) -> onnxruntime with CUDA -> torch CUDA ->
openvino (CPU) -> onnxruntime CPU -> torch CPU. The choice and the reason go to the log and into report.json.
The onnxruntime and openvino backends never import torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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


def create_engine(backend: str, model: LoadedModel, options: EngineOptions | None = None) -> tuple[Engine, EngineChoice]:
    """Instantiate ``backend`` for ``model``. Explicit backends fail loudly when unavailable;
    ``auto`` walks the order above and records why each earlier candidate was passed over."""
    from .onnx import OnnxRuntimeEngine, cached_onnx, onnxruntime_providers, usable_onnxruntime_providers
    from .openvino import OpenVinoEngine, openvino_status
    from .tensorrt import prepare_tensorrt, tensorrt_status

    options = options or EngineOptions()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    providers = onnxruntime_providers()

    def torch_engine(device: str | None = None, precision: str = options.precision):
        from .torch_engine import TorchEngine

        return TorchEngine(model, device, precision)

    def onnxruntime_engine() -> OnnxRuntimeEngine:
        return OnnxRuntimeEngine(model, cached_onnx(model, options.engine_dir), threads=options.cpu_threads)

    def openvino_engine() -> OpenVinoEngine:
        return OpenVinoEngine(model, cached_onnx(model, options.engine_dir), options.engine_dir,
                              precision="f32" if options.precision == "fp32" else "auto", threads=options.cpu_threads)

    def tensorrt_engine():
        return prepare_tensorrt(model, options.engine_dir, options.precision, options.tile, options.max_batch,
                                options.workspace_gb)

    if backend == "torch":
        engine = torch_engine()
        return engine, EngineChoice("torch", f"requested; torch on {engine.device} ({engine.precision})")
    if backend == "onnxruntime":
        if not providers:
            raise RuntimeError("--backend onnxruntime: the onnxruntime package is not installed (pip install onnxruntime)")
        engine = onnxruntime_engine()
        return engine, EngineChoice("onnxruntime", f"requested; providers {engine.providers}")
    if backend == "openvino":
        ok, why = openvino_status()
        if not ok:
            raise RuntimeError(f"--backend openvino is not available here: {why}")
        engine = openvino_engine()
        return engine, EngineChoice("openvino", f"requested; {why}, {engine.precision} ({engine.reason})")
    if backend == "tensorrt":
        ok, why = tensorrt_status()
        if not ok:
            raise RuntimeError(f"--backend tensorrt is not available here: {why}")
        engine, how = tensorrt_engine()
        return engine, EngineChoice("tensorrt", f"requested; {why}; {how}")

    passed_over = []
    ok, why = tensorrt_status()
    if ok:
        try:
            engine, how = tensorrt_engine()
            return engine, EngineChoice("tensorrt", f"auto: {why}; {how}")
        except Exception as exc:  # a failed build must not stop the batch: fall back, loudly
            log.warning("TensorRT unusable, falling back: %s", exc)
            why = f"TensorRT failed: {exc}"
    passed_over.append(f"tensorrt ({why})")
    if not nvidia_driver_loaded() and ("CUDAExecutionProvider" in providers or _installed("tensorrt")):
        log.warning("this installation is for a GPU but no NVIDIA GPU is visible (%s); analysing on the CPU. "
                    "%s.", NVIDIA_DRIVER_NODE, NO_GPU_HINT[0].upper() + NO_GPU_HINT[1:])
    if "CUDAExecutionProvider" in usable_onnxruntime_providers():
        return onnxruntime_engine(), EngineChoice("onnxruntime", f"auto: CUDA execution provider; passed over {', '.join(passed_over)}")
    passed_over.append("onnxruntime-cuda (no CUDA execution provider, or no GPU)")
    if cuda_available():
        return torch_engine("cuda"), EngineChoice("torch", f"auto: torch CUDA {options.precision}; passed over {', '.join(passed_over)}")
    passed_over.append("torch-cuda (no CUDA GPU)")
    ok, why = openvino_status()
    if ok:
        engine = openvino_engine()
        return engine, EngineChoice("openvino", f"auto: {why} on the CPU, {engine.precision} ({engine.reason}); "
                                                f"passed over {', '.join(passed_over)}")
    passed_over.append(f"openvino ({why})")
    if providers:
        return onnxruntime_engine(), EngineChoice("onnxruntime", f"auto: onnxruntime CPU; passed over {', '.join(passed_over)}")
    passed_over.append("onnxruntime (not installed)")
    return torch_engine("cpu"), EngineChoice("torch", f"auto: torch CPU; passed over {', '.join(passed_over)}")

