"""OpenVINO backend for CPUs: the model's ONNX export compiled by OpenVINO, with the bf16
inference-precision hint where the CPU has bf16 instructions (AVX512-BF16 or AMX) and f32
elsewhere. Compiled models are cached in the engine folder. On first use on a machine, the bf16
engine is checked against OpenVINO f32 on real tissue tiles (the shipped sample): mask Dice
below 0.99 means a warning and f32. The check's result is kept beside the cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..model import LoadedModel
from .base import Engine, normalise
from .parity import MIN_PARITY_DICE, mask_dice, parity_check_tiles

log = logging.getLogger(__name__)

OPENVINO_PRECISIONS = ("auto", "bf16", "f32")


def openvino_status() -> tuple[bool, str]:
    """(usable, why): OpenVINO installed and a CPU device present."""
    try:
        import openvino as ov
    except ImportError:
        return False, "the openvino package is not installed (pip install openvino)"
    devices = ov.Core().available_devices
    if "CPU" not in devices:
        return False, f"OpenVINO sees no CPU device ({devices})"
    return True, f"OpenVINO {ov.__version__.split('-')[0]}"


def cpu_has_bf16(core) -> bool:
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoEngine(Engine):
    backend = "openvino"

    def __init__(self, model: LoadedModel, onnx_path: Path, cache_dir: Path, precision: str = "auto",
                 threads: int | None = None, parity_tiles: np.ndarray | None = None):
        import openvino as ov

        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(OPENVINO_PRECISIONS)}, got {precision!r}")
        self.card = model.card
        self._ov = ov
        self._core = ov.Core()
        self._cache_dir = Path(cache_dir)
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        self._core.set_property({"CACHE_DIR": str(self._cache_dir / "openvino-cache")})
        self._onnx_path, self._threads = Path(onnx_path), threads
        bf16 = cpu_has_bf16(self._core)
        if precision == "bf16" and not bf16:
            log.warning("this CPU has no bf16 instructions: OpenVINO runs f32")
        self.precision = "bf16" if precision in ("auto", "bf16") and bf16 else "f32"
        self.reason = "CPU has bf16 instructions" if self.precision == "bf16" else (
            "requested" if precision == "f32" else "CPU has no bf16 instructions")
        self._compile(self.precision)
        self.parity_dice: float | None = None
        if self.precision == "bf16":
            self._check_parity(model, parity_tiles)

    def _compile(self, precision: str) -> None:
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if self._threads:
            config["INFERENCE_NUM_THREADS"] = int(self._threads)
        self._compiled = self._core.compile_model(str(self._onnx_path), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self.precision = precision

    def _check_parity(self, model: LoadedModel, tiles: np.ndarray | None) -> None:
        """bf16 vs f32 masks, once per model, OpenVINO version and CPU; f32 when they differ."""
        record = self._cache_dir / f"{self._onnx_path.stem}.openvino-parity.json"
        key = {"model_sha256": model.sha256, "openvino": self._ov.__version__,
               "cpu": self._core.get_property("CPU", "FULL_DEVICE_NAME")}
        known = json.loads(record.read_text()) if record.is_file() else {}
        if {k: known.get(k) for k in key} == key and "mask_dice" in known:
            dice = float(known["mask_dice"])
        else:
            if tiles is None:
                tiles, source = parity_check_tiles(self.card.tile, self.card.analysis_mpp)
            else:
                source = "the tiles given"
            fast = self.predict(tiles)
            self._compile("f32")
            dice = mask_dice(fast, self.predict(tiles))
            atomic_write_text(record, json.dumps({**key, "mask_dice": dice, "tiles": source}, indent=1))
            self._compile("bf16")
            log.info("OpenVINO bf16 vs f32 mask Dice on %d %s: %.4f", len(tiles), source, dice)
        self.parity_dice = dice
        if dice < MIN_PARITY_DICE:
            log.warning("OpenVINO bf16 masks differ from f32 (Dice %.4f < %.2f): using f32", dice, MIN_PARITY_DICE)
            self._compile("f32")
            self.reason = f"bf16 failed the parity check (mask Dice {dice:.4f})"

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: normalise(tiles, self.card)})
        return np.asarray(result[self._compiled.output(0)], dtype=np.float32)

    @property
    def description(self) -> str:
        return f"openvino (CPU, {self.precision})"
