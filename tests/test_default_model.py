"""The shipped demo model: loads with no flags, is small, and finds the glomeruli of a synthetic
slide it never saw (the synthetic test slide, not its training slides)."""

import json

import pytest
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.model import load_checkpoint
from glomscan.shipped import SHIPPED_MODEL, default_model_path

from conftest import TEST_GLOMERULI, copy_slide

pytestmark = pytest.mark.skipif(default_model_path() is None, reason="no default model shipped in this checkout")


def test_shipped_model_card_and_size():
    assert SHIPPED_MODEL.stat().st_size <= 30 * 2**20
    model = load_checkpoint(SHIPPED_MODEL)
    assert model.card.encoder == "efficientnet-b3" and model.card.classes == ("normal", "sclerosed")
    assert "DEMO ONLY" in model.card.trained_on and model.card.metrics["dice_mean"] > 0.9


def test_analyze_without_model_flag_finds_the_glomeruli(small_slide, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "case01" / "report.json").read_text())
    assert report["model_id"].startswith("glomscan-demo-synthetic@")
    assert report["n_glomeruli"] == len(TEST_GLOMERULI)
    assert report["n_sclerosed"] == sum(g.sclerosed for g in TEST_GLOMERULI)
