"""The glomscan ONNX model file: one file that ONNX Runtime and OpenVINO run without torch and
from which the torch network is rebuilt; the shipped default model is one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from glomscan.engines.onnx import OnnxRuntimeEngine, cached_onnx, export_onnx
from glomscan.model import CheckpointError, load_checkpoint, load_model, repack_checkpoint
from glomscan.shipped import SAMPLE_DIR, SHIPPED_MODEL, default_model_path, default_verifier_path


@pytest.fixture(scope="module")
def packed(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint packed like the shipped one (float16 weights) and its model file."""
    folder = tmp_path_factory.mktemp("model-file")
    checkpoint = folder / "tiny-half.pt"
    repack_checkpoint(load_checkpoint(tiny_checkpoint), checkpoint, {})
    model_file = export_onnx(load_checkpoint(checkpoint), folder / "tiny.onnx", model_file=True)
    return checkpoint, model_file


def test_model_file_keeps_card_and_identity_and_runs_without_export(packed, tmp_path):
    checkpoint, model_file = packed
    source, model = load_checkpoint(checkpoint), load_model(model_file)
    assert model.module is None and model.onnx_path == model_file
    assert model.card == source.card and model.model_id == source.model_id  # same identity: resume, reports
    assert cached_onnx(model, tmp_path) == model_file and not list(tmp_path.iterdir())  # nothing exported


def test_model_file_stores_float16_weights_exactly_and_rebuilds_the_torch_network(packed, tmp_path):
    import torch

    checkpoint, model_file = packed
    source, model = load_checkpoint(checkpoint), load_model(model_file)
    folded = export_onnx(source, tmp_path / "folded.onnx")
    assert model_file.stat().st_size < 0.6 * folded.stat().st_size  # float16 storage
    rebuilt = model.torch_module()
    omitted = set(json.loads(_metadata(model_file)["glomscan.omitted_state"]))
    for name, value in source.module.state_dict().items():
        if name not in omitted:
            assert torch.equal(rebuilt.state_dict()[name], value), name
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), source.module(x))


def test_model_file_runs_in_onnxruntime_like_the_torch_network(packed):
    checkpoint, model_file = packed
    source = load_checkpoint(checkpoint)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = OnnxRuntimeEngine(source, model_file).predict(tiles)
    from glomscan.engines.torch_engine import TorchEngine

    want = TorchEngine(source, "cpu").predict(tiles)
    assert np.abs(got - want).max() <= 1e-4


def test_a_plain_export_is_not_a_model_file(tiny_checkpoint, tmp_path):
    plain = export_onnx(load_checkpoint(tiny_checkpoint), tmp_path / "plain.onnx")  # folded constants
    model = load_model(plain)
    with pytest.raises(CheckpointError, match="not the whole network"):
        model.torch_module()
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="not a readable ONNX"):
        load_model(tmp_path / "junk.onnx")


def _metadata(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


shipped = pytest.mark.skipif(default_model_path() is None, reason="no default model shipped in this checkout")

NO_TORCH_RUN = """
import sys
from glomscan.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "segmentation_models_pytorch", "torchvision") if m in sys.modules)
    print("IMPORTED:" + ",".join(heavy))
"""


@shipped
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_analyze_with_onnx_backends_never_imports_torch(backend, tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_RUN, "analyze", str(SAMPLE_DIR), "--out", str(tmp_path / "out"),
                           "--backend", backend, "--engine-dir", str(tmp_path / "engines"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED:\n" in proc.stdout, proc.stdout
    report = json.loads(next((tmp_path / "out").glob("aidpath_*/report.json")).read_text())
    assert report["backend"] == backend and report["status"] == "ok"
    if default_verifier_path() is not None:  # both stages ran, the verifier through ONNX Runtime
        assert report["verifier_id"] and report["n_rejected"] is not None


@shipped
def test_shipped_model_file_rebuilds_a_torch_network_that_agrees_with_onnxruntime():
    model = load_model(SHIPPED_MODEL)
    assert model.module is None
    from glomscan.engines.torch_engine import TorchEngine

    tiles = np.random.default_rng(1).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    got = OnnxRuntimeEngine(model, SHIPPED_MODEL).predict(tiles)
    want = TorchEngine(model, "cpu").predict(tiles)
    assert np.abs(got - want).max() <= 1e-4
