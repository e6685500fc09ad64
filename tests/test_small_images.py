"""What pathologists export: ROIs and crops that are all tissue or smaller than a tile are
analysed whole; a blank image fails with its reason. And the one decision rule: analyze and
evaluate classify a glomerulus the same way."""

import json

import numpy as np
import pandas as pd
import pyvips
import pytest

from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings
from glomscan.engines.base import Engine, EngineChoice
from glomscan.model import ModelCard
from glomscan.postprocess import glomerulus_class
from glomscan.imaging import image_to_array
from glomscan.imaging import write_png
from glomscan.train.evaluation.evaluate import predicted_labels

from conftest import ConstantEngine, oracle_model

CHOICE = EngineChoice("fake", "test engine")


class ColourEngine(Engine):
    """p_normal = red / 255, p_sclerosed = blue / 255 of each pixel."""

    backend = "colour"

    def __init__(self):
        self.card = ModelCard(name="colour")

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        x = tiles.astype(np.float32) / 255.0
        return np.stack([x[..., 0], x[..., 2]], axis=1)


def _pink_texture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.array([205, 130, 180]) + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(180, 220), (700, 600)])
def test_all_tissue_image_smaller_than_a_tile_is_analysed_whole(tmp_path, size):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_png(slides / "roi.png", _pink_texture(*size))
    settings = AnalysisSettings(mpp_override=1.0, tile=512, overlap=256, workers=1, batch_size=1)
    outcome = run_batch(slides, tmp_path / "out", oracle_model(), ConstantEngine((0.8, 0.1)), CHOICE, settings,
                        quiet=True)
    report = json.loads((tmp_path / "out" / "roi" / "report.json").read_text())
    assert report["status"] == "ok", report["reason"]
    assert report["tiles_tissue"] == report["tiles_total"] >= 1
    # the constant engine calls everything one normal glomerulus: the whole image was inferred
    mask = image_to_array(pyvips.Image.tiffload(str(tmp_path / "out" / "roi" / "mask.tif"), page=0))[..., 0]
    assert (mask[: size[0], : size[1]] == 1).all()
    assert not outcome.failed


def test_blank_small_image_fails_with_its_reason(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_png(slides / "blank.png", np.full((200, 200, 3), 243, np.uint8))
    outcome = run_batch(slides, tmp_path / "out", oracle_model(), ConstantEngine(), CHOICE,
                        AnalysisSettings(mpp_override=1.0, tile=512, overlap=256), quiet=True)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert outcome.failed and summary.status.tolist() == ["failed"]
    assert "blank" in summary.reason[0]


def test_glomerulus_class_rule():
    assert glomerulus_class((0.6, 0.4)) == 0
    assert glomerulus_class((0.3, 0.7)) == 1
    assert glomerulus_class((0.5, 0.5)) == 0  # a tie is normal


def test_analyze_and_evaluate_classify_alike(tmp_path):
    """A glomerulus whose pixels are half 'sclerosed' by per-pixel argmax but normal by the
    mean probabilities: analyze's mask and evaluate's labels both call it normal."""
    image = np.zeros((240, 240, 3), np.uint8)
    image[..., 1] = 60  # background: p_normal = p_sclerosed = 0
    yy, xx = np.mgrid[:240, :240]
    disc = (yy - 120) ** 2 + (xx - 90) ** 2 < 50**2
    image[disc & (xx < 90)] = (230, 0, 25)   # p_n 0.90, p_s 0.10
    image[disc & (xx >= 90)] = (140, 0, 204)  # p_n 0.55, p_s 0.80 (pixel argmax: sclerosed)
    disc2 = (yy - 120) ** 2 + (xx - 200) ** 2 < 25**2
    image[disc2] = (100, 0, 200)  # a clearly sclerosed one
    slides = tmp_path / "slides"
    slides.mkdir()
    write_png(slides / "rule.png", image)
    settings = AnalysisSettings(mpp_override=1.0, tile=256, overlap=128, min_glomerulus_area_um2=100)
    run_batch(slides, tmp_path / "out", oracle_model(), ColourEngine(), CHOICE, settings, quiet=True)
    mask = image_to_array(pyvips.Image.tiffload(str(tmp_path / "out" / "rule" / "mask.tif"), page=0))[..., 0]
    probabilities = ColourEngine().predict(image[None])[0]
    evaluated = predicted_labels(probabilities, min_area_px=100)
    assert (mask == evaluated).all()
    assert (mask[disc] == 1).all() and (mask[disc2] == 2).all()
    table = pd.read_csv(tmp_path / "out" / "rule" / "glomeruli.csv")
    assert sorted(table["class"]) == ["normal", "sclerosed"]
    # the per-pixel argmax would have split the first glomerulus
    assert (probabilities.argmax(axis=0)[disc] == 1).any()
