"""ONNX export and ONNX Runtime parity, backend selection, and TensorRT's pure-Python parts.

TensorRT itself needs a CUDA GPU and the tensorrt package: those tests skip with the reason."""

import json
from pathlib import Path

import numpy as np
import onnx
import pyvips
import pytest
import torch
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.engines import EngineOptions, create_engine
from glomscan.engines.onnx import OnnxRuntimeEngine, cached_onnx, export_onnx, onnx_parity
from glomscan.engines.tensorrt import (
    EngineMismatch,
    EngineSidecar,
    EngineSpec,
    TensorRTUnavailable,
    check_cached_engine,
    engine_paths,
    find_other_engines,
    prepare_tensorrt,
    tensorrt_status,
)
from glomscan.engines.base import normalise
from glomscan.engines.parity import mask_dice, parity_check, parity_check_tiles
from glomscan.engines.torch_engine import CudaTransfer, TorchEngine, normalisation_tensors, normalise_tensor
from glomscan.model import ModelCard, build_model, load_checkpoint, save_checkpoint

from conftest import copy_slide

TRT_OK, TRT_WHY = tensorrt_status()


@pytest.fixture(scope="module")
def b3_checkpoint(tmp_path_factory):
    import torch

    torch.manual_seed(1)
    card = ModelCard(name="b3-test")
    path = tmp_path_factory.mktemp("b3") / "b3.pt"
    save_checkpoint(path, build_model(card), card)
    return path


def test_efficientnet_b3_onnx_export_matches_torch(b3_checkpoint, tmp_path):
    model = load_checkpoint(b3_checkpoint)
    path = export_onnx(model, tmp_path / "b3.onnx")
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["glomscan.model_sha256"] == model.sha256
    assert json.loads(meta["glomscan.card"])["encoder"] == "efficientnet-b3"
    assert onnx_parity(model, path, size=256, batch=2) <= 1e-4
    # also at the paper's tile size through the engine interface (uint8 tiles in)
    tiles = np.random.default_rng(0).integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    ort_out = OnnxRuntimeEngine(model, path).predict(tiles)
    torch_out = TorchEngine(model, "cpu").predict(tiles)
    assert ort_out.shape == (1, 2, 512, 512) and np.abs(ort_out - torch_out).max() <= 1e-4


def test_export_onnx_cli_checks_parity(tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(main, ["export-onnx", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert "max abs difference" in res.output and (tmp_path / "m.onnx").is_file()
    res = CliRunner().invoke(main, ["export-onnx", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"),
                                    "--opset", "13"])
    assert res.exit_code == 2 and "opset must be >= 17" in res.output


def test_onnx_cache_reexports_only_for_another_model(tiny_checkpoint, b3_checkpoint, tmp_path):
    tiny = load_checkpoint(tiny_checkpoint)
    first = cached_onnx(tiny, tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cached_onnx(tiny, tmp_path) == first and first.stat().st_mtime_ns == mtime
    other = cached_onnx(load_checkpoint(b3_checkpoint), tmp_path)
    assert other != first


def test_auto_backend_on_this_cpu_machine(tiny_checkpoint, tmp_path):
    engine, choice = create_engine("auto", load_checkpoint(tiny_checkpoint), EngineOptions(engine_dir=tmp_path))
    if TRT_OK:
        assert choice.backend == "tensorrt"
    else:
        from glomscan.engines.openvino import openvino_status

        assert choice.backend == ("openvino" if openvino_status()[0] else "onnxruntime")
        assert "passed over" in choice.reason and "tensorrt" in choice.reason


def test_tensorrt_backend_refused_clearly_without_gpu(tiny_checkpoint, small_slide, tmp_path):
    if TRT_OK:
        pytest.skip("TensorRT is available here")
    with pytest.raises(TensorRTUnavailable):
        prepare_tensorrt(load_checkpoint(tiny_checkpoint), tmp_path)
    res = CliRunner().invoke(main, ["analyze", str(small_slide.path.parent), "--model", str(tiny_checkpoint),
                                    "--backend", "tensorrt", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--backend tensorrt is not available here" in res.output


def labels_of(folder):
    im = pyvips.Image.tiffload(str(folder / "mask.tif"), page=0)
    return np.frombuffer(im.write_to_memory(), np.uint8).reshape(im.height, im.width)


def test_analyze_onnxruntime_gives_the_torch_mask(small_slide, tiny_checkpoint, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    common = ["--model", str(tiny_checkpoint), "--tile", "256", "--overlap", "128", "--quiet",
              "--engine-dir", str(tmp_path / "engines")]
    for backend in ("torch", "onnxruntime"):
        res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(tmp_path / backend), "--backend", backend, *common])
        assert res.exit_code == 0, res.output
    a, b = labels_of(tmp_path / "torch" / "case01"), labels_of(tmp_path / "onnxruntime" / "case01")
    fa, fb = a > 0, b > 0
    dice = 2 * (fa & fb).sum() / max(fa.sum() + fb.sum(), 1)
    assert dice >= 0.999
    assert json.loads((tmp_path / "onnxruntime" / "case01" / "report.json").read_text())["backend"] == "onnxruntime"


# -- TensorRT engine cache: pure Python ------------------------------------------------------
SPEC = EngineSpec(model_sha256="ab" * 32, tensorrt_version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3",
                  compute_capability="9.0", precision="fp16", tile=1024, min_batch=1, opt_batch=8, max_batch=8)


def write_engine(tmp_path, spec, sidecar=True):
    engine, side = engine_paths(tmp_path, spec, "model")
    engine.write_bytes(b"serialized")
    if sidecar:
        side.write_text(EngineSidecar(spec, "2026-11-24T00:00:00", 12.0, 4.0, "host").to_json())
    return engine, side


def test_engine_file_names_carry_the_key():
    stem = SPEC.file_stem("glom net")
    assert stem == "glom-net-abababababab-NVIDIA-H100-80GB-HBM3-sm90-trt10.7.0-fp16-b8-t1024"


def test_matching_engine_is_used(tmp_path):
    engine, side = write_engine(tmp_path, SPEC)
    assert check_cached_engine(engine, side, SPEC) == (True, [])


@pytest.mark.parametrize("change", [{"gpu_name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"},
                                    {"tensorrt_version": "10.3.0"}, {"model_sha256": "cd" * 32},
                                    {"precision": "fp32"}, {"max_batch": 4}])
def test_mismatched_engine_is_never_used(tmp_path, change):
    from dataclasses import replace

    other = replace(SPEC, **change)
    engine, _ = write_engine(tmp_path, other)
    # the wanted engine's own file names differ, so even a forced lookup at the other files fails
    ok, reasons = check_cached_engine(engine, engine.with_suffix(".json"), SPEC)
    assert not ok and all(any(k in r for k in change) for r in reasons)
    notes = find_other_engines(tmp_path, other.model_sha256, SPEC) if "model_sha256" not in change else []
    if "model_sha256" not in change:
        assert notes and all(k in notes[0] for k in change)


def test_engine_without_sidecar_or_with_broken_sidecar_is_not_used(tmp_path):
    engine, side = write_engine(tmp_path, SPEC, sidecar=False)
    ok, reasons = check_cached_engine(engine, side, SPEC)
    assert not ok and "no sidecar" in reasons[0]
    side.write_text("{not json")
    ok, reasons = check_cached_engine(engine, side, SPEC)
    assert not ok and "unreadable" in reasons[0]


def test_sidecar_round_trip():
    sidecar = EngineSidecar(SPEC, "2026-11-24T00:00:00", 12.0, 4.0, "host", parity_mask_dice=0.998)
    assert EngineSidecar.from_json(sidecar.to_json()) == sidecar


def test_mask_dice():
    a = np.zeros((1, 2, 4, 4), np.float32)
    b = a.copy()
    assert mask_dice(a, b) == 1.0
    a[0, 0, :2] = 0.9
    b[0, 0, :1] = 0.8
    assert mask_dice(a, b) == pytest.approx(2 * 4 / (8 + 4))


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT path needs a CUDA GPU and TensorRT >= 10: {TRT_WHY}")
def test_tensorrt_engine_builds_caches_and_matches_torch(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    engine, how = prepare_tensorrt(model, tmp_path, "fp32", tile=256, max_batch=2)
    assert how.startswith("built")
    tiles = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    assert mask_dice(engine.predict(tiles), TorchEngine(model, "cuda", "fp32").predict(tiles)) > 0.99
    _, how = prepare_tensorrt(model, tmp_path, "fp32", tile=256, max_batch=2)
    assert how.startswith("cached")
    with pytest.raises(EngineMismatch):
        prepare_tensorrt(model, tmp_path, "fp16", tile=256, max_batch=2, rebuild=False)


class FakeCudart:
    """The CUDA runtime bindings' calls as the engine makes them, on host memory: device and
    pinned allocations are ctypes buffers, copies are memmoves, every call returns (error, ...)."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self, fail_malloc: bool = False):
        self.blocks, self.copies, self.fail_malloc = {}, [], fail_malloc

    def _allocate(self, nbytes):
        import ctypes

        if self.fail_malloc:
            return 2, 0
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    cudaMalloc = cudaMallocHost = _allocate

    def cudaFree(self, address):
        del self.blocks[address]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import ctypes

        ctypes.memmove(dst, src, nbytes)
        self.copies.append(kind)
        return (0,)

    def cudaGetErrorString(self, error):
        return 0, b"out of memory (stand-in)"

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, device):
        import types

        return 0, types.SimpleNamespace(name=b"NVIDIA H200\x00\x00", major=9, minor=0, totalGlobalMem=141 * 2 ** 30)


def test_tensorrt_engine_buffers_with_a_stand_in_runtime(tiny_checkpoint, tmp_path):
    """TensorRTEngine's own code on the CPU: stand-ins for the tensorrt module, whose execution
    context reads the input at the address it is given, as TensorRT does, and writes the first
    normalised channel into every class, and for the CUDA runtime (host memory). Checks what
    TensorRT would see (NCHW contiguous float32 input, a batch padded to the largest seen, within
    max_batch) and what comes back (the caller's rows, chunked by max_batch, in order), and that
    the buffers are freed."""
    import ctypes
    import types

    from glomscan.engines import tensorrt as trt_module
    from glomscan.engines.cuda_runtime import CudaRuntime

    class Context:
        def __init__(self):
            self.shapes, self.addresses, self.streams = [], {}, []

        def set_input_shape(self, name, shape):
            self.shapes.append(tuple(shape))

        def set_tensor_address(self, name, address):
            self.addresses[name] = address

        def execute_async_v3(self, stream):
            self.streams.append(stream)
            b, c, h, w = self.shapes[-1]
            k = len(card.classes)
            image = self.at(trt_module.INPUT_NAME, b * c * h * w).reshape(b, c, h, w)
            self.at(trt_module.OUTPUT_NAME, b * k * h * w).reshape(b, k, h, w)[:] = image[:, :1]
            return True

        def at(self, name, count):  # float32 memory at the address given for ``name``
            return np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses[name]))

    context = Context()
    engine_stub = types.SimpleNamespace(create_execution_context=lambda: context, device_memory_size_v2=2 ** 20)
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda serialized: engine_stub)
    fake_trt = types.SimpleNamespace(Logger=type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None}),
                                     Runtime=lambda logger: runtime)
    cudart = FakeCudart()
    model = load_checkpoint(tiny_checkpoint)
    card = model.card
    (tmp_path / "x.engine").write_bytes(b"engine")
    engine = trt_module.TensorRTEngine(model, tmp_path / "x.engine", max_batch=3, cuda=CudaRuntime(cudart),
                                       trt_module=fake_trt)
    tiles = np.random.default_rng(5).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    out = engine.predict(tiles)  # chunks of 3 and 2, the second padded to 3
    assert context.shapes == [(3, 3, 32, 48), (3, 3, 32, 48)] and context.streams == [7, 7]
    expected = np.repeat(normalise(tiles, card)[:, :1], len(card.classes), axis=1)
    assert out.shape == (5, len(card.classes), 32, 48)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    first = out.copy()
    np.testing.assert_allclose(engine.predict(tiles[:1]), expected[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, first)  # a result stays as it was while the next batch goes through
    assert cudart.copies[:2] == [1, 2] and len(cudart.blocks) == 4  # pinned in/out, device in/out
    buffers = 3 * (3 + len(card.classes)) * 32 * 48 * 4
    assert engine.gpu_memory_peak_mib == round((2 ** 20 + buffers) / 2 ** 20, 1)
    engine.close()
    assert cudart.blocks == {}


def test_cuda_runtime_errors_and_gpu_info(monkeypatch):
    """Without an NVIDIA driver the reason names --gpus all; a failed call raises CUDA's own
    message; the GPU's name and compute capability come from the device properties."""
    from glomscan.engines import cuda_runtime
    from glomscan.engines.cuda_runtime import CudaRuntime, CudaUnavailable

    monkeypatch.setattr(cuda_runtime, "nvidia_driver_loaded", lambda: False)
    with pytest.raises(CudaUnavailable, match="--gpus all"):
        CudaRuntime(FakeCudart()).gpu()
    assert CudaRuntime(FakeCudart()).device_count() == 0
    monkeypatch.setattr(cuda_runtime, "nvidia_driver_loaded", lambda: True)
    gpu = CudaRuntime(FakeCudart()).gpu()
    assert (gpu.name, gpu.compute_capability, gpu.memory_total_mib) == ("NVIDIA H200", "9.0", 141 * 1024)
    with pytest.raises(CudaUnavailable, match="CUDA error 2: out of memory"):
        CudaRuntime(FakeCudart(fail_malloc=True)).device_buffer(16)


def test_no_gpu_visible_is_said_and_analysis_runs_on_the_cpu(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """A GPU install (onnxruntime-gpu lists its CUDA provider on any machine) in a container
    started without --gpus: TensorRT's reason and a warning say so, and the CPU backend runs."""
    from glomscan.engines import cuda_runtime, onnx as onnx_module

    if TRT_OK:
        pytest.skip("a GPU is visible here")
    monkeypatch.setattr(cuda_runtime, "nvidia_driver_loaded", lambda: False)
    monkeypatch.setattr(onnx_module, "onnxruntime_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_module.usable_onnxruntime_providers() == ["CPUExecutionProvider"]
    with caplog.at_level("WARNING", logger="glomscan.engines"):
        engine, choice = create_engine("auto", load_checkpoint(tiny_checkpoint), EngineOptions(engine_dir=tmp_path))
    assert choice.backend in ("openvino", "onnxruntime") and "CUDA" not in engine.description
    assert "no NVIDIA GPU is visible" in caplog.text and "--gpus all" in caplog.text
    assert "--gpus all" in tensorrt_status()[1] or "tensorrt" in tensorrt_status()[1]


def test_gpu_normalisation_matches_the_cpu_one():
    """The CUDA fast path normalises uint8 tiles on the device: same values, channels_last."""
    card = ModelCard(name="n", tile=64)
    tiles = np.random.default_rng(3).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    x = normalise_tensor(torch.from_numpy(tiles), *normalisation_tensors(card, "cpu"))
    assert x.shape == (2, 3, 64, 48) and x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(x.numpy(), normalise(tiles, card), rtol=1e-5, atol=1e-5)


def test_gpu_transfer_pads_to_the_largest_batch_and_hands_back_copies():
    """The pinned-buffer steps of the CUDA fast path (torch and TensorRT), run on the CPU: a
    smaller batch is padded to the largest seen (one shape for the GPU) and only its own rows
    come back; a result stays as it was while the next batch goes through."""
    card = ModelCard(name="n", tile=32)
    transfer = CudaTransfer(card, "cpu")
    rng = np.random.default_rng(4)
    first, last = (rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8) for k in (3, 2))
    x = transfer.to_device(first)
    assert x.shape == (3, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(x.numpy(), normalise(first, card), rtol=1e-5, atol=1e-5)
    kept = transfer.to_host(x[:, :2] * 1.0, 3)
    x = transfer.to_device(last)
    assert x.shape == (3, 3, 32, 32)  # padded to the first batch's 3
    np.testing.assert_allclose(x[:2].numpy(), normalise(last, card), rtol=1e-5, atol=1e-5)
    out = transfer.to_host(x[:, :2] * 1.0, 2)
    assert out.shape == (2, 2, 32, 32)
    np.testing.assert_allclose(out, normalise(last, card)[:, :2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept, normalise(first, card)[:, :2], rtol=1e-5, atol=1e-5)  # not overwritten
    assert transfer.to_device(rng.integers(0, 256, (4, 64, 32, 3), dtype=np.uint8)).shape == (4, 3, 64, 32)


def test_parity_check_tiles_are_real_tissue_else_random(monkeypatch, tmp_path):
    """OpenVINO's and TensorRT's parity checks run on the shipped sample's real tissue; random
    tiles only where the sample is not installed, and the check says which."""
    tiles, source = parity_check_tiles(512, 1.0)
    assert tiles.shape == (3, 512, 512, 3) and tiles.dtype == np.uint8 and "real tissue" in source
    assert tiles.std() > 10  # tissue, not blank padding
    monkeypatch.setattr("glomscan.shipped.SAMPLE_DIR", tmp_path / "not-installed")
    tiles, source = parity_check_tiles(64, 1.0)
    assert tiles.shape == (2, 64, 64, 3) and "random" in source


def test_torch_engine_precision_is_checked_and_cpu_runs_fp32(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="precision"):
        TorchEngine(model, "cpu", precision="int8")
    engine = TorchEngine(model, "cpu", precision="fp16")
    assert engine.precision == "fp32" and "fp32" in engine.description


def test_parity_check_warns_when_masks_differ(tiny_checkpoint, caplog):
    model = load_checkpoint(tiny_checkpoint)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    reference = TorchEngine(model, "cpu")
    assert parity_check(reference, reference, tiles) == 1.0

    class Inverted(TorchEngine):
        def predict(self, t):
            return 1.0 - super().predict(t)

    with caplog.at_level("WARNING"):
        assert parity_check(Inverted(model, "cpu"), reference, tiles) < 0.99
    assert "differs" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the torch CUDA fast path needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_cuda_fast_path_matches_fp32(tiny_checkpoint, precision):
    model = load_checkpoint(tiny_checkpoint)
    tiles = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    fast = TorchEngine(model, "cuda", precision)
    assert mask_dice(fast.predict(tiles), TorchEngine(load_checkpoint(tiny_checkpoint), "cuda", "fp32").predict(tiles)) >= 0.99
    assert fast.predict(tiles[:2]).shape == (2, len(model.card.classes), 256, 256)  # padded to 3, sliced


def test_engine_cache_defaults_to_the_users_cache_folder(monkeypatch, tmp_path):
    from glomscan.engines.base import default_engine_dir

    monkeypatch.delenv("GLOMSCAN_ENGINE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_engine_dir() == tmp_path / "xdg" / "glomscan" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_engine_dir() == tmp_path / "home" / ".cache" / "glomscan" / "engines"
    monkeypatch.setenv("GLOMSCAN_ENGINE_DIR", "/engines")  # Docker's volume
    assert default_engine_dir() == Path("/engines") and EngineOptions().engine_dir == Path("/engines")
