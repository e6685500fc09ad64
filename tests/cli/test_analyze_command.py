"""The command line as a hospital batch would use it (real model checkpoints, subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.model import load_checkpoint

from conftest import copy_slide

FAST = ["--tile", "256", "--overlap", "128", "--batch-size", "4", "--quiet"]


def glomscan(*args, **kw):
    return subprocess.run([sys.executable, "-m", "glomscan.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def test_missing_or_invalid_checkpoint_fails_before_any_slide(small_slide, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    runner = CliRunner()
    res = runner.invoke(main, ["analyze", str(slides), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "nope.pt")])
    assert res.exit_code == 2 and "model checkpoint not found" in res.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    res = runner.invoke(main, ["analyze", str(slides), "--out", str(tmp_path / "out"), "--model", str(bad)])
    assert res.exit_code == 2 and "not a readable torch checkpoint" in res.output
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    res = runner.invoke(main, ["analyze", str(slides), "--out", str(tmp_path / "out"), "--model", str(plain)])
    assert res.exit_code == 2 and "not a glomscan checkpoint" in res.output
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_usage_errors(small_slide, tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(main, ["analyze", str(small_slide.path.parent), "--model", str(tiny_checkpoint),
                                    "--tile", "256", "--overlap", "256", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "overlap < tile" in res.output


def test_init_model_round_trip(tmp_path):
    res = CliRunner().invoke(main, ["init-model", "--out", str(tmp_path / "m.pt"), "--encoder", "resnet18"])
    assert res.exit_code == 0, res.output
    model = load_checkpoint(tmp_path / "m.pt")
    assert model.card.encoder == "resnet18" and model.card.classes == ("normal", "sclerosed")
    assert "random" in model.card.trained_on


def test_analyze_cli_end_to_end_with_real_model_and_exit_codes(small_slide, tiny_checkpoint, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    res = glomscan("analyze", slides, "--out", tmp_path / "out", "--model", tiny_checkpoint, *FAST)
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "out" / "case01"
    for name in ("mask.tif", "glomeruli.csv", "glomeruli.geojson", "overview.png", "report.json"):
        assert (folder / name).is_file()
    report = json.loads((folder / "report.json").read_text())
    assert report["model_id"].startswith("tiny-test@") and report["backend_reason"].startswith("auto:")
    # no GPU here: auto picks OpenVINO (else onnxruntime) on the CPU, having passed over TensorRT
    if not torch.cuda.is_available():
        from glomscan.engines.openvino import openvino_status

        assert report["backend"] == ("openvino" if openvino_status()[0] else "onnxruntime")
        assert "tensorrt" in report["backend_reason"]
    # a broken file in the batch: the good slide is skipped as done, the bad one fails, exit 1
    (slides / "broken.svs").write_bytes(b"\x00" * 1000)
    res = glomscan("analyze", slides, "--out", tmp_path / "out", "--model", tiny_checkpoint, *FAST)
    assert res.returncode == 1
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("slide")
    assert summary.loc["broken", "status"] == "failed" and summary.loc["case01", "skipped"] == "yes"


def test_sigkill_mid_batch_then_resume(small_slide, tiny_checkpoint, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides, "a.tif")
    copy_slide(small_slide.path, slides, "b.tif")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "glomscan.cli", "analyze", str(slides), "--out", str(out),
                             "--model", str(tiny_checkpoint), "--tile", "256", "--overlap", "128",
                             "--batch-size", "1", "--readers", "1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill while slide b is being analysed (a is published, b's staging folder exists)
    deadline = time.time() + 300
    while time.time() < deadline:
        staging = out / ".glomscan-staging"
        if (out / "a" / "report.json").exists() and staging.exists() and any(p.name.startswith("b.") for p in staging.iterdir()):
            break
        if proc.poll() is not None:
            pytest.fail("analyze finished before it could be killed")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "b" / "report.json").exists()
    assert json.loads((out / "a" / "report.json").read_text())["status"] == "ok"
    res = glomscan("analyze", slides, "--out", out, "--model", tiny_checkpoint, *FAST[:-1])
    assert res.returncode == 0, res.stderr
    assert "a: outputs complete and up to date, skipping" in res.stderr
    assert "removing leftover" in res.stderr
    assert json.loads((out / "b" / "report.json").read_text())["status"] == "ok"
    assert not any((out / ".glomscan-staging").glob("*"))
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.status) == ["ok", "ok"] and list(summary.skipped) == ["yes", "no"]


def test_tile_defaults_to_the_model_card_and_must_suit_the_encoder(small_slide, tiny_checkpoint, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    res = CliRunner().invoke(main, ["analyze", str(slides), "--model", str(tiny_checkpoint), "--tile", "260",
                                    "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "multiples of 8 px" in res.output and not (tmp_path / "bad").exists()
    res = CliRunner().invoke(main, ["analyze", str(slides), "--model", str(tiny_checkpoint), "--quiet",
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    from glomscan.config import AnalysisSettings

    settings = json.loads((tmp_path / "out" / "case01" / "report.json").read_text())["fingerprint"]["settings"]
    # the tiny model's card: 256 px tiles, overlapping by a quarter
    assert settings == AnalysisSettings(tile=256, overlap=64).fingerprint()


def test_merge_workers_option_reaches_the_settings_and_leaves_results_unchanged(small_slide, tiny_checkpoint, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    masks = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(out), "--model", str(tiny_checkpoint),
                                        *FAST, "--merge-workers", str(n), "--no-viewer"])
        assert res.exit_code == 0, res.output
        masks.append((out / "case01" / "glomeruli.csv").read_bytes())
    assert masks[0] == masks[1]
    bad = CliRunner().invoke(main, ["analyze", str(slides), "--merge-workers", "-1"])
    assert bad.exit_code == 2
