"""Inpainting networks and losses (issue #5): shapes and parameter counts, AOT gate, self-attention,
every loss term on known inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from glomscan.augment.inpaint_losses import (IMAGENET_STD, VGG_LAYERS, GeneratorLoss, InpaintLossWeights, VGGFeatures,
                                           masked_ssim,
                                           gram_matrix, load_vgg19_features, lsgan_discriminator_loss,
                                           lsgan_generator_loss)
from glomscan.augment.inpaint_models import (AOTBlock, InpaintGenerator, PatchDiscriminator, SelfAttention,
                                           count_parameters, generator_input, local_view)


def conv(cin, cout, k):
    return cin * cout * k * k + cout


def bn(c):
    return 2 * c


@pytest.mark.parametrize("upsampling", ["resize", "transposed"])
def test_generator_shape_and_parameter_count_at_256(upsampling):
    c, blocks = 64, 8
    big = 4 * c
    aot = 4 * conv(big, big // 4, 3) + conv(big, big, 3) + conv(big, big, 3)
    attention = 2 * conv(big, big // 8, 1) + conv(big, big, 1) + 1
    up_kernel = 16 if upsampling == "transposed" else 9  # 4x4 transposed conv, or bilinear x2 + 3x3 conv
    expected = (conv(4, c, 7) + bn(c) + conv(c, 2 * c, 4) + bn(2 * c) + conv(2 * c, big, 4) + bn(big)
                + blocks * aot + attention
                + (8 * c) * (2 * c) * up_kernel + 2 * c + bn(2 * c)  # [4c ++ 4c] -> 2c
                + (4 * c) * c * up_kernel + c + bn(c)  # [2c ++ 2c] -> c
                + conv(2 * c, 3, 7))
    g = InpaintGenerator(base_channels=c, n_aot_blocks=blocks, upsampling=upsampling).eval()
    assert count_parameters(g) == expected
    seen = {}
    g.attention.register_forward_hook(lambda m, i, o: seen.update(attention=tuple(i[0].shape)))
    with torch.no_grad():
        y = g(torch.cat([torch.rand(1, 3, 256, 256) * 2 - 1, torch.zeros(1, 1, 256, 256)], 1))
    assert y.shape == (1, 3, 256, 256)
    assert seen["attention"] == (1, big, 64, 64)  # the SAGAN block works on the 64 x 64 features
    assert y.abs().max() <= 1  # tanh


def test_discriminator_shape_and_parameter_count_at_256():
    d = PatchDiscriminator(64).eval()
    expected = (conv(3, 64, 4) + conv(64, 128, 4) + bn(128) + conv(128, 256, 4) + bn(256) + conv(256, 512, 4)
                + bn(512) + conv(512, 1, 4))
    assert count_parameters(d) == expected
    with torch.no_grad():
        assert d(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError):
        d(torch.zeros(1, 3, 16, 16))


def test_generator_rejects_bad_inputs():
    g = InpaintGenerator(base_channels=4, n_aot_blocks=1)
    with pytest.raises(ValueError):
        g(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError):
        g(torch.zeros(1, 4, 66, 64))
    with pytest.raises(ValueError):
        g(torch.zeros(1, 4, 32, 32))  # 8 x 8 features cannot be reflection-padded by 8


def test_aot_gate_math_on_hand_set_block():
    torch.manual_seed(0)
    block = AOTBlock(4)
    fused_value = torch.tensor([0.5, -1.0, 2.0, 0.25])
    with torch.no_grad():
        block.fuse[1].weight.zero_()
        block.fuse[1].bias.copy_(fused_value)  # fused == a constant per channel
        block.gate[1].weight.zero_()
        block.gate[1].bias.zero_()
        for i in range(4):
            block.gate[1].weight[i, i, 1, 1] = 1.0  # gate pre-activation == x
    x = torch.randn(1, 4, 12, 12, dtype=torch.float64).float()
    out = block(x).detach().numpy()

    xn = x.numpy().astype(np.float64)
    mean = xn.mean(axis=(2, 3), keepdims=True)
    std = xn.std(axis=(2, 3), ddof=1, keepdims=True)
    g = 1 / (1 + np.exp(-5 * (2 * (xn - mean) / std - 1)))
    expected = xn * (1 - g) + fused_value.numpy().reshape(1, 4, 1, 1) * g
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.allclose(block.gate_values(x).detach().numpy(), g, atol=1e-5)


def test_aot_block_needs_divisible_channels():
    with pytest.raises(ValueError):
        AOTBlock(6)


def test_self_attention_keeps_shape_starts_as_identity_and_attends():
    torch.manual_seed(0)
    block = SelfAttention(16)
    x = torch.randn(2, 16, 5, 7)
    assert block.gamma.item() == 0
    y = block(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    q = torch.einsum("oc,nchw->nohw", block.query.weight[:, :, 0, 0], x) + block.query.bias.view(1, -1, 1, 1)
    k = torch.einsum("oc,nchw->nohw", block.key.weight[:, :, 0, 0], x) + block.key.bias.view(1, -1, 1, 1)
    v = torch.einsum("oc,nchw->nohw", block.value.weight[:, :, 0, 0], x) + block.value.bias.view(1, -1, 1, 1)
    q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
    a = torch.softmax(torch.einsum("ncp,ncq->npq", q, k), dim=-1)  # query p attends to key q
    expected = x + 0.5 * torch.einsum("ncq,npq->ncp", v, a).view_as(x)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_generator_input_and_local_view():
    image = torch.full((1, 3, 4, 4), -0.5)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    x = generator_input(image, mask)
    assert x.shape == (1, 4, 4, 4)
    assert torch.all(x[:, :3][mask.expand(1, 3, 4, 4) > 0] == 0)
    assert torch.all(x[:, :3][mask.expand(1, 3, 4, 4) == 0] == -0.5)
    assert torch.equal(x[:, 3:], mask)
    r = local_view(image, mask)
    assert torch.all(r[mask.expand(1, 3, 4, 4) > 0] == -0.5)
    assert torch.all(r[mask.expand(1, 3, 4, 4) == 0] == 1)  # white background is +1 in [-1, 1]


# --- losses -------------------------------------------------------------------------------------------

def test_lsgan_on_constant_discriminator_outputs():
    real, fake = torch.full((2, 1, 8, 8), 0.8), torch.full((2, 1, 8, 8), 0.3)
    assert lsgan_discriminator_loss(real, fake).item() == pytest.approx(0.2 ** 2 + 0.3 ** 2)
    assert lsgan_generator_loss(fake).item() == pytest.approx(0.7 ** 2)
    assert lsgan_discriminator_loss(torch.ones(3), torch.zeros(3)).item() == 0
    assert lsgan_generator_loss(torch.ones(3)).item() == 0


def test_gram_matrix_known_values():
    f = torch.ones(1, 3, 2, 5)
    np.testing.assert_allclose(gram_matrix(f).numpy(), np.full((1, 3, 3), 1 / 3), rtol=1e-6)
    f = torch.zeros(1, 2, 1, 2)
    f[0, 0] = torch.tensor([1.0, 2.0])
    f[0, 1] = torch.tensor([3.0, 0.0])
    np.testing.assert_allclose(gram_matrix(f)[0].numpy(), np.array([[5, 3], [3, 9]]) / 4, rtol=1e-6)


def _batch(seed=0, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    ori = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(n, 1, size, size)
    mask[..., 8:24, 8:20] = 1
    return ori, mask


def test_l1_terms_and_total_without_vgg(caplog):
    ori, mask = _batch()
    scores = torch.full((2, 1, 1, 1), 0.5)
    with caplog.at_level(logging.WARNING):
        loss = GeneratorLoss(InpaintLossWeights(l1_local=2.0))
    assert "disabled" in caplog.text and "disabled" in loss.vgg_status
    same = loss(ori.clone(), ori, mask, scores, scores)
    assert same["l1_global"].item() == 0 and same["l1_local"].item() == 0
    assert torch.isnan(same["perceptual"]) and torch.isnan(same["style"])
    rec = ori + 0.5
    terms = loss(rec, ori, mask, scores, torch.full((2, 1, 1, 1), 0.9))
    frac = mask.mean().item()
    assert terms["l1_global"].item() == pytest.approx(0.5, rel=1e-5)
    assert terms["l1_local"].item() == pytest.approx(0.5 * frac, rel=1e-5)  # outside the mask both are white
    assert terms["adv_global"].item() == pytest.approx(0.25)
    assert terms["adv_local"].item() == pytest.approx(0.01)
    expected = 0.02 * (0.25 + 0.01) + 1 * 0.5 + 2.0 * 0.5 * frac
    assert terms["total"].item() == pytest.approx(expected, rel=1e-5)


def test_perceptual_and_style_on_an_injected_identity_extractor():
    """With the 'features' being the normalised image itself, the terms have closed forms."""
    vgg = VGGFeatures(nn.Sequential(nn.Identity()), layers={"image": 0})
    loss = GeneratorLoss(InpaintLossWeights(), vgg)
    ori, mask = _batch()
    scores = torch.ones(2, 1, 1, 1)
    same = loss(ori.clone(), ori, mask, scores, scores)
    assert same["perceptual"].item() == 0 and same["style"].item() == 0 and same["total"].item() == 0
    terms = loss(ori + 0.2, ori, mask, scores, scores)
    # [-1, 1] -> [0, 1] halves the shift, then / std per channel
    expected_per = np.mean([0.1 / s for s in IMAGENET_STD])
    assert terms["perceptual"].item() == pytest.approx(expected_per, rel=1e-4)
    f = vgg(ori + 0.2)[0]
    g = vgg(ori)[0]
    expected_sty = (gram_matrix(f) - gram_matrix(g)).abs().mean().item()
    assert terms["style"].item() == pytest.approx(expected_sty, rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["l1_global"].item() + terms["l1_local"].item()
                                                  + 0.1 * expected_per + 150 * expected_sty, rel=1e-4)


def test_perceptual_and_style_with_random_vgg19_features():
    torch.manual_seed(0)
    vgg = VGGFeatures(make_layers(cfgs["E"]))  # the layout of torchvision vgg19().features, random weights
    assert len(vgg.features) == VGG_LAYERS["relu5_1"] + 1
    assert not any(p.requires_grad for p in vgg.parameters())
    loss = GeneratorLoss(InpaintLossWeights(), vgg)
    ori, mask = _batch(size=64)
    scores = torch.ones(2, 1, 4, 4)
    same = loss(ori.clone(), ori, mask, scores, scores)
    assert same["perceptual"].item() == 0 and same["style"].item() == 0
    other = loss(_batch(seed=1, size=64)[0], ori, mask, scores, scores)
    assert other["perceptual"].item() > 0 and other["style"].item() > 0


def test_vgg_weights_load_from_a_state_dict_file(tmp_path):
    torch.manual_seed(0)
    features = make_layers(cfgs["E"])
    full = {f"features.{k}": v for k, v in features.state_dict().items()}
    full["classifier.0.bias"] = torch.zeros(3)  # torchvision layout: the classifier is ignored
    torch.save(full, tmp_path / "vgg19.pth")
    torch.save(features.state_dict(), tmp_path / "features.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    reference = VGGFeatures(features)(x)
    for name in ("vgg19.pth", "features.pth"):
        loaded = load_vgg19_features(tmp_path / name)
        for a, b in zip(loaded(x), reference):
            torch.testing.assert_close(a, b)
    torch.save({"0.weight": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="VGG19"):
        load_vgg19_features(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError):
        load_vgg19_features(tmp_path / "junk.pth")


def test_masked_ssim_equals_the_evaluation_ssim_inside_the_mask():
    """The loss's SSIM is skimage's map (what `evaluate inpaint` scores) averaged over the mask,
    wherever the mask keeps 3 px from the border."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    b[10:20, 10:30] = 128  # a flat patch: low-variance windows too
    mask = np.zeros((40, 48), bool)
    mask[6:30, 5:40] = True
    _, ssim_map = structural_similarity(a, b, channel_axis=2, data_range=255, full=True)
    expected = ssim_map[mask].mean()
    to_tensor = lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].double() / 127.5 - 1  # noqa: E731
    got = masked_ssim(to_tensor(a), to_tensor(b), torch.from_numpy(mask)[None, None].double())
    assert got.item() == pytest.approx(expected, abs=1e-5)
    same = masked_ssim(to_tensor(a), to_tensor(a), torch.from_numpy(mask)[None, None].double())
    assert same.item() == pytest.approx(1.0, abs=1e-6)


def test_ssim_term_is_logged_always_and_in_the_total_only_with_a_weight():
    ori, mask = _batch(size=32)
    scores = torch.ones(2, 1, 1, 1)
    rec = (ori + 0.3 * torch.randn(ori.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    off = GeneratorLoss(InpaintLossWeights())(rec, ori, mask, scores, scores)
    on = GeneratorLoss(InpaintLossWeights(ssim=2.0))(rec.clone().requires_grad_(True), ori, mask, scores, scores)
    expected = 1 - masked_ssim(rec, ori, mask).item()
    assert 0 < off["ssim"].item() == pytest.approx(expected, rel=1e-6)
    assert on["total"].item() == pytest.approx(off["total"].item() + 2.0 * expected, rel=1e-5)
