"""TensorRT backend: ONNX -> serialized engine (cached in the engine folder) -> inference.

The engine runs without torch: GPU buffers, pinned host buffers and the stream come from the CUDA
runtime bindings (``cuda_runtime``, ``pip install "glomscan[gpu]"``), tiles are normalised on the
host into a pinned float32 buffer and copied asynchronously; the reference for the parity check
is ONNX Runtime at fp32 on the same ONNX file.

An engine is only valid for the model checksum, TensorRT version, GPU (name and compute
capability), precision and batch profile it was built for. Each ``.engine`` file has a JSON
sidecar recording those; ``select_engine`` uses an engine only when every field matches and
otherwise rebuilds (or refuses, with the mismatch spelled out).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..model import LoadedModel
from ..atomic import atomic_write_bytes, atomic_write_text
from .base import Engine, normalise
from .onnx import INPUT_NAME, OUTPUT_NAME, _slug, cached_onnx
from .parity import parity_check, parity_check_tiles

log = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing."""


class EngineMismatch(RuntimeError):
    """A cached engine does not fit this model/GPU/TensorRT and rebuilding was not allowed."""


@dataclass(frozen=True)
class EngineSpec:
    """What an engine was (or must be) built for. Equality of these fields = reusable."""

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str  # "fp16" or "fp32"
    tile: int
    min_batch: int
    opt_batch: int
    max_batch: int

    def file_stem(self, model_name: str) -> str:
        gpu = _slug(self.gpu_name.replace(" ", "-"))
        return (f"{_slug(model_name)}-{self.model_sha256[:12]}-{gpu}-sm{self.compute_capability.replace('.', '')}"
                f"-trt{self.tensorrt_version}-{self.precision}-b{self.max_batch}-t{self.tile}")

    def mismatches(self, other: "EngineSpec") -> list[str]:
        return [f"{f.name}: engine has {getattr(other, f.name)!r}, need {getattr(self, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass
class EngineSidecar:
    spec: EngineSpec
    built_at: str
    build_seconds: float
    workspace_gb: float
    host: str
    parity_mask_dice: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "EngineSidecar":
        data = json.loads(text)
        data["spec"] = EngineSpec(**data["spec"])
        return cls(**data)


def engine_paths(engine_dir: Path, spec: EngineSpec, model_name: str) -> tuple[Path, Path]:
    stem = spec.file_stem(model_name)
    return Path(engine_dir) / f"{stem}.engine", Path(engine_dir) / f"{stem}.json"


def check_cached_engine(engine_path: Path, sidecar_path: Path, wanted: EngineSpec) -> tuple[bool, list[str]]:
    """(usable, reasons). Usable only when both files exist and every spec field matches."""
    if not engine_path.is_file():
        return False, [f"no engine at {engine_path}"]
    if not sidecar_path.is_file():
        return False, [f"engine {engine_path.name} has no sidecar {sidecar_path.name}; its origin is unknown"]
    try:
        sidecar = EngineSidecar.from_json(sidecar_path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        return False, [f"sidecar {sidecar_path.name} is unreadable: {exc}"]
    problems = wanted.mismatches(sidecar.spec)
    return not problems, problems


def find_other_engines(engine_dir: Path, model_sha256: str, wanted: EngineSpec) -> list[str]:
    """Explain engines for the same model that do not fit this machine (for the log)."""
    notes = []
    for sidecar_path in sorted(Path(engine_dir).glob("*.json")):
        try:
            spec = EngineSidecar.from_json(sidecar_path.read_text()).spec
        except (ValueError, TypeError, KeyError, OSError):
            continue
        if spec.model_sha256 == model_sha256 and spec != wanted:
            notes.append(f"{sidecar_path.stem}: " + "; ".join(wanted.mismatches(spec)))
    return notes


# -- GPU side --------------------------------------------------------------------------------
def tensorrt_status() -> tuple[bool, str]:
    """(available, reason)."""
    from .cuda_runtime import NO_GPU_HINT, NVIDIA_DRIVER_NODE, CudaRuntime, CudaUnavailable, nvidia_driver_loaded

    if not nvidia_driver_loaded():  # first: on a CPU machine this is the reason, not a missing package
        return False, f"no NVIDIA GPU visible (no {NVIDIA_DRIVER_NODE}); {NO_GPU_HINT}"
    try:
        gpu = CudaRuntime().gpu()
    except CudaUnavailable as exc:
        return False, str(exc)
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"the tensorrt Python package is not installed or not loadable ({exc})"
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        return False, f"TensorRT {trt.__version__} found, 10 or newer is needed"
    return True, f"TensorRT {trt.__version__} on {gpu.name}"


def current_spec(model: LoadedModel, precision: str, tile: int, max_batch: int, opt_batch: int | None = None) -> EngineSpec:
    import tensorrt as trt

    from .cuda_runtime import CudaRuntime

    gpu = CudaRuntime().gpu()
    return EngineSpec(model_sha256=model.sha256, tensorrt_version=trt.__version__,
                      gpu_name=gpu.name, compute_capability=gpu.compute_capability,
                      precision=precision, tile=tile, min_batch=1, opt_batch=opt_batch or max_batch,
                      max_batch=max_batch)


def build_engine(onnx_path: Path, spec: EngineSpec, engine_path: Path, sidecar_path: Path,
                 workspace_gb: float = 4.0, timing_cache: Path | None = None) -> EngineSidecar:
    """ONNX -> serialized TensorRT engine with one optimisation profile (batch min/opt/max at the
    spec's tile size), FP16 when asked, and a persisted timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if spec.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    t = spec.tile
    profile.set_shape(INPUT_NAME, (spec.min_batch, 3, t, t), (spec.opt_batch, 3, t, t), (spec.max_batch, 3, t, t))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    elapsed = time.perf_counter() - started
    atomic_write_bytes(engine_path, bytes(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    sidecar = EngineSidecar(spec=spec, built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), build_seconds=round(elapsed, 1),
                            workspace_gb=workspace_gb, host=platform.node())
    atomic_write_text(sidecar_path, sidecar.to_json())
    return sidecar


def stream_handle(stream) -> int:
    """The integer handle TensorRT takes for a CUDA runtime bindings stream."""
    try:
        return int(stream)
    except TypeError:
        return int(stream.getPtr())


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(self, model: LoadedModel, engine_path: Path, max_batch: int, cuda=None, trt_module=None):
        """``cuda`` (a ``CudaRuntime``) and ``trt_module`` default to the real ones; tests pass
        stand-ins to check the buffer handling without a GPU."""
        from .cuda_runtime import CudaRuntime

        trt = trt_module
        if trt is None:
            import tensorrt as trt
        self.card = model.card
        self.max_batch = max_batch
        self._cuda = cuda or CudaRuntime()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda.stream()
        self._buffers: dict[str, object] = {}
        self._batch = 0

    def _ensure_buffers(self, batch: int, height: int, width: int) -> None:
        """Pinned and device buffers for the largest batch seen so far at this tile size: a
        smaller batch (a slide's last) is padded to it, so the engine always runs one shape."""
        classes = len(self.card.classes)
        current = self._buffers.get("host_in")
        if current is not None and current.shape[0] >= batch and current.shape[2:] == (height, width):
            return
        for buffer in self._buffers.values():
            buffer.free()
        in_shape, out_shape = (batch, 3, height, width), (batch, classes, height, width)
        self._buffers = {"host_in": self._cuda.pinned_array(in_shape), "host_out": self._cuda.pinned_array(out_shape)}
        self._buffers["device_in"] = self._cuda.device_buffer(self._buffers["host_in"].nbytes)
        self._buffers["device_out"] = self._cuda.device_buffer(self._buffers["host_out"].nbytes)
        self._batch = batch

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        outputs = [self._predict_chunk(tiles[i:i + self.max_batch]) for i in range(0, len(tiles), self.max_batch)]
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def _predict_chunk(self, tiles: np.ndarray) -> np.ndarray:
        n, height, width, _ = tiles.shape
        self._ensure_buffers(n, height, width)
        b = self._buffers
        b["host_in"].array[:n] = normalise(tiles, self.card)
        self._cuda.copy_to_device(b["device_in"], b["host_in"], self._stream)
        self._context.set_input_shape(INPUT_NAME, (self._batch, 3, height, width))
        self._context.set_tensor_address(INPUT_NAME, b["device_in"].address)
        self._context.set_tensor_address(OUTPUT_NAME, b["device_out"].address)
        if not self._context.execute_async_v3(stream_handle(self._stream)):
            raise RuntimeError("TensorRT execution failed")
        self._cuda.copy_to_host(b["host_out"], b["device_out"], self._stream)
        self._cuda.synchronize(self._stream)
        return b["host_out"].array[:n].copy()  # the caller may keep it while the next batch runs

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers = {}

    @property
    def description(self) -> str:
        return "tensorrt (cuda)"

    @property
    def preferred_batch_size(self) -> int:
        return self.max_batch

    @property
    def gpu_memory_peak_mib(self) -> float | None:
        """The engine's activation memory plus the input and output buffers (the weights, held
        by the deserialized engine, are not counted)."""
        activation = getattr(self._engine, "device_memory_size_v2", None) or getattr(self._engine, "device_memory_size", 0)
        buffers = sum(b.nbytes for name, b in self._buffers.items() if name.startswith("device"))
        return round((int(activation) + buffers) / 2 ** 20, 1)


def prepare_tensorrt(model: LoadedModel, engine_dir: Path, precision: str = "fp16", tile: int | None = None,
                     max_batch: int = 8, workspace_gb: float = 4.0, rebuild: bool = True,
                     parity_tiles: np.ndarray | None = None) -> tuple[TensorRTEngine, str]:
    """Find a matching cached engine or build one; returns the engine and a sentence saying which."""
    ok, why = tensorrt_status()
    if not ok:
        raise TensorRTUnavailable(why)
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    tile = tile or model.card.tile
    spec = current_spec(model, precision, tile, max_batch)
    engine_path, sidecar_path = engine_paths(engine_dir, spec, model.card.name)
    usable, reasons = check_cached_engine(engine_path, sidecar_path, spec)
    if usable:
        return TensorRTEngine(model, engine_path, max_batch), f"cached engine {engine_path.name}"
    for note in find_other_engines(engine_dir, model.sha256, spec):
        log.warning("not using engine %s", note)
    if not rebuild:
        raise EngineMismatch("no matching TensorRT engine (" + "; ".join(reasons) + "); run `glomscan build-engine`")
    log.info("building TensorRT engine %s (%s): %s", engine_path.name, precision, "; ".join(reasons))
    onnx_path = cached_onnx(model, engine_dir)
    sidecar = build_engine(onnx_path, spec, engine_path, sidecar_path, workspace_gb,
                           timing_cache=engine_dir / f"timing-sm{spec.compute_capability.replace('.', '')}-trt{spec.tensorrt_version}.cache")
    engine = TensorRTEngine(model, engine_path, max_batch)
    from .onnx import OnnxRuntimeEngine

    if parity_tiles is None:
        parity_tiles, _ = parity_check_tiles(tile, model.card.analysis_mpp)
    sidecar.parity_mask_dice = parity_check(engine, OnnxRuntimeEngine(model, onnx_path), parity_tiles)
    atomic_write_text(sidecar_path, sidecar.to_json())
    return engine, f"built engine {engine_path.name} in {sidecar.build_seconds:.0f} s"
