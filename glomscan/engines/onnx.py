"""ONNX export of the U-Net and the ONNX Runtime backend.

The exported graph takes normalised float32 NCHW input named ``image`` and returns per-class
probabilities (sigmoid included) named ``probabilities``; batch, height and width are dynamic
(height and width must be multiples of 32 for the U-Net). The model card and checksum are kept
in the ONNX metadata so an export can be matched to its checkpoint, and so that analyze can run
an ONNX model file without torch (``model.load_onnx_model``).

``model_file=True`` writes a glomscan ONNX model file, which is both a runnable graph and the
checkpoint's network: no constant folding, so the initializers keep the checkpoint's parameter
names (as ``network.<name>``), and float32 tensors stored as float16 where that is exact (a
checkpoint packed by ``pack-model`` holds float16 values) with a Cast to float32 in front of
their users, which both runtimes fold once at load. State-dict entries the graph does not use
(an encoder's unused classifier head, BatchNorm step counters) are listed in the metadata, not
stored. The file is the checkpoint's size, and ``LoadedModel.torch_module`` rebuilds the torch
network from it (the same outputs). Only the export imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..model import (ONNX_CARD_KEY, ONNX_FLOAT16_SUFFIX, ONNX_OMITTED_KEY, ONNX_SHA256_KEY, ONNX_STATE_PREFIX,
                     LoadedModel)
from .base import Engine, normalise

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
OPSET = 17


def probability_model(network):
    """The segmentation network followed by the sigmoid, as exported (a torch module)."""
    import torch

    class ProbabilityModel(torch.nn.Module):
        def __init__(self, network: torch.nn.Module):
            super().__init__()
            self.network = network

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.network(image))

    return ProbabilityModel(network).eval()


def export_onnx(model: LoadedModel, out_path: Path, opset: int = OPSET, sample_size: int = 256,
                model_file: bool = False) -> Path:
    """Export atomically to ``out_path``. smp >= 0.5 builds EfficientNet with nn.SiLU, the
    export-friendly swish; the older memory-efficient swish is switched off if present.
    ``model_file``: a glomscan ONNX model file (see above)."""
    import torch

    if opset < 17:
        raise ValueError("opset must be >= 17")
    network = model.torch_module().eval().cpu()
    encoder = getattr(network, "encoder", None)
    if hasattr(encoder, "set_swish"):
        encoder.set_swish(memory_efficient=False)
    wrapped = probability_model(network)
    sample = torch.zeros(1, 3, sample_size, sample_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about shape inference
            torch.onnx.export(
                wrapped, (sample,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=False, do_constant_folding=not model_file,
                dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                              OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
            )
        import onnx

        proto = onnx.load(tmp)
        metadata = {ONNX_CARD_KEY: json.dumps(asdict(model.card)), ONNX_SHA256_KEY: model.sha256}
        if model_file:
            metadata[ONNX_OMITTED_KEY] = json.dumps(omitted_state(proto, network.state_dict()))
            store_weights_as_float16(proto)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


def omitted_state(proto, state_dict: dict) -> list[str]:
    """State-dict entries that the traced graph does not hold (unused by inference)."""
    present = {initializer.name for initializer in proto.graph.initializer}
    return [name for name in state_dict if ONNX_STATE_PREFIX + name not in present]


def store_weights_as_float16(proto) -> int:
    """Float32 initializers whose values float16 holds exactly are stored as float16 and cast
    back to float32 by a Cast node in front of their users; returns how many were converted."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    used = {name for node in graph.node for name in node.input}
    casts, converted = [], 0
    for initializer in graph.initializer:
        if initializer.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(initializer)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        name = initializer.name
        initializer.CopyFrom(numpy_helper.from_array(half, f"{name}{ONNX_FLOAT16_SUFFIX}"))
        if name in used:
            casts.append(helper.make_node("Cast", [f"{name}{ONNX_FLOAT16_SUFFIX}"], [name], to=TensorProto.FLOAT,
                                          name=f"{name}.to_float32"))
        converted += 1
    for node in reversed(casts):
        graph.node.insert(0, node)
    return converted


def onnx_parity(model: LoadedModel, onnx_path: Path, size: int = 256, batch: int = 2, seed: int = 0) -> float:
    """Max absolute difference between ONNX Runtime (CPU) and torch probabilities on random input."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        reference = probability_model(model.torch_module().eval().cpu())(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float(np.abs(got - reference).max())


def onnx_model_sha256(path: Path) -> str | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}.get(ONNX_SHA256_KEY)


def cached_onnx(model: LoadedModel, engine_dir: Path) -> Path:
    """The ONNX graph of ``model``: its own file for an ONNX model file, else its export in
    ``engine_dir``, exported on first use."""
    if model.onnx_path is not None:
        return model.onnx_path
    path = Path(engine_dir) / f"{_slug(model.card.name)}-{model.sha256[:12]}.onnx"
    if path.is_file() and onnx_model_sha256(path) == model.sha256:
        return path
    log.info("exporting %s to %s", model.model_id, path)
    return export_onnx(model, path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:60]


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def usable_onnxruntime_providers() -> list[str]:
    """CUDA (where onnxruntime-gpu is installed and an NVIDIA GPU is visible: onnxruntime-gpu
    lists its CUDA provider on any machine) then the CPU."""
    from .cuda_runtime import nvidia_driver_loaded

    available = onnxruntime_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return wanted if nvidia_driver_loaded() else [p for p in wanted if p != "CUDAExecutionProvider"]


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, model: LoadedModel, onnx_path: Path, providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.card = model.card
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        wanted = providers or usable_onnxruntime_providers()
        if "CUDAExecutionProvider" in wanted and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels that onnxruntime-gpu[cuda,cudnn] installs
        self.session = ort.InferenceSession(str(onnx_path), options, providers=wanted)
        self.providers = self.session.get_providers()

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: normalise(tiles, self.card)})[0]

    @property
    def description(self) -> str:
        return f"onnxruntime ({self.providers[0]})"

    @property
    def preferred_batch_size(self) -> int:
        return 8 if self.providers[0] == "CUDAExecutionProvider" else 1
