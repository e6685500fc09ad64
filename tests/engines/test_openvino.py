"""The OpenVINO backend: matches ONNX Runtime in f32, picks bf16 where the CPU has it, checks
bf16 against f32 once on real tissue tiles and falls back to f32 when they differ."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.engines import EngineOptions, create_engine
from glomscan.engines.onnx import OnnxRuntimeEngine, cached_onnx
from glomscan.engines.openvino import OpenVinoEngine, cpu_has_bf16, openvino_status
from glomscan.model import load_checkpoint

OK, WHY = openvino_status()
pytestmark = pytest.mark.skipif(not OK, reason=f"OpenVINO not usable here: {WHY}")


@pytest.fixture()
def tiny(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def tiles(n=2, size=256, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_f32_matches_onnxruntime(tiny, tmp_path):
    onnx_path = cached_onnx(tiny, tmp_path)
    engine = OpenVinoEngine(tiny, onnx_path, tmp_path, precision="f32")
    assert engine.precision == "f32" and engine.parity_dice is None
    x = tiles()
    got, want = engine.predict(x), OnnxRuntimeEngine(tiny, onnx_path).predict(x)
    assert got.shape == want.shape == (2, 2, 256, 256) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4


def test_bf16_where_the_cpu_has_it_with_a_parity_check_kept_on_disk(tiny, tmp_path, monkeypatch):
    import openvino as ov

    onnx_path = cached_onnx(tiny, tmp_path)
    engine = OpenVinoEngine(tiny, onnx_path, tmp_path, precision="auto", parity_tiles=tiles(seed=1))
    if not cpu_has_bf16(ov.Core()):
        assert engine.precision == "f32" and "no bf16" in engine.reason
        return
    record = json.loads((tmp_path / f"{onnx_path.stem}.openvino-parity.json").read_text())
    assert record["model_sha256"] == tiny.sha256 and 0.0 <= record["mask_dice"] <= 1.0
    assert engine.parity_dice == record["mask_dice"]
    assert engine.precision == ("bf16" if record["mask_dice"] >= 0.99 else "f32")

    # a second engine reads the record instead of checking again
    def no_second_check(*args, **kwargs):
        raise AssertionError("parity checked twice")

    monkeypatch.setattr("glomscan.engines.openvino.mask_dice", no_second_check)
    assert OpenVinoEngine(tiny, onnx_path, tmp_path).parity_dice == record["mask_dice"]


def test_bf16_that_fails_the_parity_check_falls_back_to_f32(tiny, tmp_path, monkeypatch, caplog):
    import openvino as ov

    if not cpu_has_bf16(ov.Core()):
        pytest.skip("this CPU has no bf16 instructions: OpenVINO runs f32 without a check")
    monkeypatch.setattr("glomscan.engines.openvino.mask_dice", lambda a, b: 0.5)
    with caplog.at_level("WARNING"):
        engine = OpenVinoEngine(tiny, cached_onnx(tiny, tmp_path), tmp_path, parity_tiles=tiles())
    assert engine.precision == "f32" and "parity" in engine.reason
    assert "differ from f32" in caplog.text


def test_analyze_reports_openvino_and_why(tiny_checkpoint, small_slide, tmp_path):
    res = CliRunner().invoke(main, ["analyze", str(small_slide.path.parent), "--model", str(tiny_checkpoint),
                                    "--out", str(tmp_path / "out"), "--engine-dir", str(tmp_path / "engines"), "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    assert report["backend"] == "openvino"
    assert report["backend_reason"].startswith("auto: OpenVINO") and "passed over" in report["backend_reason"]


def test_openvino_refused_clearly_when_missing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("glomscan.engines.openvino.openvino_status", lambda: (False, "the openvino package is not installed"))
    with pytest.raises(RuntimeError, match="openvino is not available here: the openvino package"):
        create_engine("openvino", tiny, EngineOptions(engine_dir=tmp_path))
    _, choice = create_engine("auto", tiny, EngineOptions(engine_dir=tmp_path))
    assert choice.backend != "openvino" and "openvino (the openvino package is not installed)" in choice.reason
