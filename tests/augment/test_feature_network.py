"""The perceptual/style feature network choice (issue #15, item 2): VGG19 from a local file or
the encoder of a glomscan segmentation model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from glomscan.checkpoint import read_checkpoint_file
from glomscan.model import ModelCard, build_model, save_checkpoint
from glomscan.augment.inpaint import InpaintSettings, train_inpainting
from glomscan.augment.inpaint_losses import (GeneratorLoss, InpaintLossWeights, SegmentationEncoderFeatures,
                                           gram_matrix, load_segmentation_features)

TINY = dict(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), tile=256)
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "glomscan" / "models" / "default.onnx"


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    card = ModelCard(name="tiny-features", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), **TINY)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, build_model(card), card)
    return path, card


def test_encoder_features_are_the_stages_of_the_normalised_input_and_frozen(tiny_model):
    path, card = tiny_model
    features = load_segmentation_features(path)
    assert isinstance(features, SegmentationEncoderFeatures)
    assert "resnet18" in features.description and "tiny-features" in features.description
    assert not any(p.requires_grad for p in features.parameters())
    features.train()
    assert not features.encoder.training  # BatchNorm statistics stay fixed
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = features(x)
    assert [f.shape[-1] for f in out] == [32, 16, 8]  # stages 1..depth, the input itself left out
    mean, std = torch.tensor(card.mean).view(1, 3, 1, 1), torch.tensor(card.std).view(1, 3, 1, 1)
    expected = features.encoder(((x + 1) / 2 - mean) / std)[1:]
    for a, b in zip(out, expected):
        assert torch.allclose(a, b)


def test_generator_loss_with_encoder_features(tiny_model):
    features = load_segmentation_features(tiny_model[0])
    loss = GeneratorLoss(InpaintLossWeights(), features)
    assert loss.vgg_status.startswith("enabled: resnet18 encoder")
    ori = torch.rand(2, 3, 64, 64) * 2 - 1
    rec = (ori + 0.3 * torch.randn_like(ori)).clamp(-1, 1).requires_grad_(True)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    scores = torch.zeros(2, 1, 4, 4)
    terms = loss(rec, ori, mask, scores, scores)
    with torch.no_grad():
        f_rec, f_ori = features(rec), features(ori)
    per = np.mean([float((a - b).abs().mean()) for a, b in zip(f_rec, f_ori)])
    sty = np.mean([float((gram_matrix(a) - gram_matrix(b)).abs().mean()) for a, b in zip(f_rec, f_ori)])
    assert float(terms["perceptual"].detach()) == pytest.approx(per, rel=1e-5)
    assert float(terms["style"].detach()) == pytest.approx(sty, rel=1e-5)
    terms["total"].backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    same = loss(ori, ori, mask, scores, scores)
    assert float(same["perceptual"]) == 0 and float(same["style"]) == 0


def test_not_a_model_and_two_feature_networks_are_refused(tmp_path, tiny_model):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a glomscan segmentation model"):
        load_segmentation_features(bogus)
    from test_inpaint_train import make_crops

    crops = make_crops(tmp_path / "crops")
    with pytest.raises(ValueError, match="one feature network"):
        train_inpainting(crops, tmp_path / "g.pt", InpaintSettings(epochs=1, size=64, base_channels=4,
                                                                   vgg_weights=str(bogus),
                                                                   feature_model=str(tiny_model[0])), quiet=True)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_train_inpaint_with_segmentation_features(tmp_path, tiny_model, precision):
    from test_inpaint_train import make_crops

    crops = make_crops(tmp_path / "crops")
    out = tmp_path / "g.pt"
    train_inpainting(crops, out, InpaintSettings(epochs=1, batch_size=4, size=64, base_channels=4, n_aot_blocks=1,
                                                 feature_model=str(tiny_model[0]), precision=precision), quiet=True)
    row = pd.read_csv(out.with_suffix(".metrics.csv")).iloc[-1]
    assert row.vgg.startswith("enabled: resnet18 encoder of tiny-features")
    assert math.isfinite(row.perceptual) and math.isfinite(row["style"]) and row.perceptual > 0
    info = read_checkpoint_file(out, "inpaint-generator").card["info"]
    assert info["vgg"] == row.vgg and info["settings"]["feature_model"] == str(tiny_model[0])


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="the shipped model file glomscan/models/default.onnx is absent")
def test_the_shipped_model_encoder_is_a_feature_network():
    features = load_segmentation_features(DEFAULT_MODEL)
    assert "efficientnet-b3" in features.description
    out = features(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in out] == [32, 16, 8, 4, 2]


def test_loss_weights_reach_the_total(tmp_path, tiny_model):
    from test_inpaint_train import make_crops

    crops = make_crops(tmp_path / "crops")
    out = tmp_path / "g.pt"
    train_inpainting(crops, out, InpaintSettings(epochs=1, batch_size=4, size=64, base_channels=4, n_aot_blocks=1,
                                                 feature_model=str(tiny_model[0]), style_weight=7.0,
                                                 perceptual_weight=0.3), quiet=True)
    r = pd.read_csv(out.with_suffix(".metrics.csv")).iloc[-1]
    expected = (0.02 * (r.adv_global + r.adv_local) + r.l1_global + r.l1_local + 0.3 * r.perceptual + 7.0 * r["style"])
    assert r.total == pytest.approx(expected, rel=1e-5)
    assert read_checkpoint_file(out, "inpaint-generator").card["info"]["settings"]["style_weight"] == 7.0
