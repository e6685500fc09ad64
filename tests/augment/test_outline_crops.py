"""Inpainting crops from a crop set with real outlines (issue #15, item 1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from glomscan.augment.crops import component_circle, read_crops
from glomscan.imaging import write_png
from glomscan.train.dataset.data import split_slides
from glomscan.augment.outline_crops import OutlineCropSettings, fit_scale, make_outline_crops

from conftest import SHARED_DATA


def ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w] + 0.5
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def make_crop_set(folder, side=60, slides=("s1", "s2", "s3", "s4", "s5"), seed=0):
    """Tight crops (the outline touches the crop border) of a purple ellipse on pink tissue; per
    slide one sclerosed and one normal crop, plus a slide with normal glomeruli only."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = []
    for slide in list(slides) + ["normal_only"]:
        for k, label in enumerate((1, 0) if slide == "normal_only" else (1, 0)):
            if slide == "normal_only":
                label = 0
            name = f"{slide}-{k}.png"
            image = (np.array((225, 185, 210)) + rng.integers(-20, 20, (side, side, 3))).clip(0, 255).astype(np.uint8)
            outline = ellipse(side, side, side / 2, side / 2, side / 2, side / 2 * 0.8)
            image[outline] = (rng.integers(100, 200, (int(outline.sum()), 3))).astype(np.uint8)
            write_png(folder / "images" / name, image)
            write_png(folder / "masks" / name, outline.astype(np.uint8) * 255)
            rows.append({"image": name, "slide": slide, "globally_sclerosed": label})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


def make_tile_set(folder, n=6, side=160, seed=1):
    """Tiles of tissue (grey-blue, saturated) with one outlined glomerulus in a corner."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        image = (np.array((170, 140, 200)) + rng.integers(-10, 10, (side, side, 3))).clip(0, 255).astype(np.uint8)
        mask = ellipse(side, side, 20, 20, 15, 15)
        write_png(folder / "images" / f"{100 + 10 * i}.png", image)
        write_png(folder / "masks" / f"{100 + 10 * i}.png", mask.astype(np.uint8) * 255)
    return folder


def test_crops_are_centred_fitted_split_by_slide_and_keep_the_glomerulus_pixels(tmp_path):
    crop_set = make_crop_set(tmp_path / "set")
    settings = OutlineCropSettings(size=64, margin_px=4)
    manifest = make_outline_crops(crop_set, tmp_path / "crops", settings)
    labels = pd.read_csv(crop_set / "labels.csv")
    # only the sclerosed crops, split by slide with prepare's split of ALL the set's slides
    assert sorted(manifest.image) == sorted(labels[labels.globally_sclerosed == 1].image)
    split = split_slides(list(labels.slide), settings.validation_fraction, settings.seed)
    for row in manifest.itertuples():
        assert row.split == ("test" if split[row.slide] == "val" else "train")
    assert set(manifest.split) == {"train", "test"}
    crops = read_crops(tmp_path / "crops", None)
    for (image, mask), row in zip(crops, manifest.itertuples()):
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        cx, cy, radius = component_circle(mask)
        assert abs(cx - 32) <= 1 and abs(cy - 32) <= 1
        assert 2 * radius <= 64 - 2 * 4 + 1.5  # fits with the margin (resampling may add a pixel)
        assert radius == pytest.approx(row.radius, abs=1.5)
        assert row.scale < 1 and row.context == "reflect"
        assert row.mask_px == mask.sum()
        # the hole never touches the canvas border: a ring exists for the trivial fills
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_unscaled_crop_pixels_inside_the_outline_are_the_original_ones(tmp_path):
    crop_set = make_crop_set(tmp_path / "set", side=40)
    settings = OutlineCropSettings(size=64, margin_px=4, classes="all", tiles_mpp=1.0)
    tiles = make_tile_set(tmp_path / "tiles")
    manifest = make_outline_crops(crop_set, tmp_path / "crops", settings, tiles_dir=tiles)
    from glomscan.imaging import read_png

    assert len(manifest) == len(pd.read_csv(crop_set / "labels.csv"))  # classes="all"
    for row in manifest.itertuples():
        assert row.scale == 1.0
        original = read_png(crop_set / "images" / row.image)[..., :3]
        outline = read_png(crop_set / "masks" / row.image)[..., 0] > 127
        image = read_png(tmp_path / "crops" / "images" / f"{row.crop_id}.png")[..., :3]
        mask = read_png(tmp_path / "crops" / "masks" / f"{row.crop_id}.png")[..., 0] > 127
        placed = image[row.y0:row.y0 + 40, row.x0:row.x0 + 40]
        assert np.array_equal(mask[row.y0:row.y0 + 40, row.x0:row.x0 + 40], outline)
        assert np.array_equal(placed[outline], original[outline])  # the target is the real glomerulus
        # context from a tile window whose glomerulus stays clear of the hole (+ clearance)
        tile, xy = row.context.split(":")
        wx, wy = map(int, xy.split(","))
        tile_glom = read_png(tiles / "masks" / f"{tile}.png")[wy:wy + 64, wx:wx + 64, 0] > 127
        from scipy import ndimage

        assert not (tile_glom & ndimage.binary_dilation(mask, iterations=settings.clearance_px)).any()
        assert row.other_glomeruli_px == tile_glom.sum()
        far = np.ones((64, 64), bool)
        far[max(row.y0 - 8, 0):row.y0 + 48, max(row.x0 - 8, 0):row.x0 + 48] = False
        if far.any():  # tile tissue there (blue-ish, stain-moved towards the crop's pink surroundings)
            assert image[far].std(0).max() < 40


def test_tile_context_comes_from_the_same_split(tmp_path):
    crop_set = make_crop_set(tmp_path / "set", side=40)
    tiles = make_tile_set(tmp_path / "tiles", n=6)
    settings = OutlineCropSettings(size=64, margin_px=4, tiles_mpp=1.0)
    manifest = make_outline_crops(crop_set, tmp_path / "crops", settings, tiles_dir=tiles)
    from glomscan.train.dataset.sources import tile_groups

    groups = tile_groups([f"{100 + 10 * i}" for i in range(6)])
    tile_split = split_slides(list(groups.values()), settings.validation_fraction, settings.seed)
    for row in manifest.itertuples():
        tile = row.context.split(":")[0]
        assert tile_split[groups[tile]] == ("val" if row.split == "test" else "train")


def test_fit_scale_and_errors(tmp_path):
    outline = ellipse(100, 100, 50, 50, 50, 30)
    assert fit_scale(outline, 256, 16) == 1.0
    assert fit_scale(outline, 64, 4) == pytest.approx(56 / 100, abs=0.01)
    crop_set = make_crop_set(tmp_path / "set")
    with pytest.raises(ValueError, match="classes"):
        make_outline_crops(crop_set, tmp_path / "c", OutlineCropSettings(classes="tubules"))


AIDPATH = SHARED_DATA / "aidpath_glomeruli"


@pytest.mark.skipif(not (AIDPATH / "labels.csv").is_file(),
                    reason="../shared/data/aidpath_glomeruli (the shared real crop set) is not here")
def test_real_sclerosed_crops_with_tissue_context(tmp_path):
    labels = pd.read_csv(AIDPATH / "labels.csv")
    tiles = SHARED_DATA / "aidpath_tiles"
    manifest = make_outline_crops(AIDPATH, tmp_path / "crops", OutlineCropSettings(),
                                  tiles_dir=tiles if (tiles / "images").is_dir() else None)
    assert len(manifest) == int((labels.globally_sclerosed == 1).sum())
    split = split_slides(list(labels.slide), 0.2, 0)
    val = {s for s, v in split.items() if v == "val"}
    assert set(manifest[manifest.split == "test"].slide) <= val
    assert (manifest.split == "test").sum() == int(((labels.globally_sclerosed == 1) & labels.slide.isin(val)).sum())
    crops = read_crops(tmp_path / "crops", None)
    assert all(i.shape == (256, 256, 3) for i, _ in crops)
    fractions = np.array([m.mean() for _, m in crops])
    assert 0.2 < fractions.min() and fractions.max() < 0.65  # the glomerulus with tissue around it


def test_augment_crops_from_crop_set_then_train_inpaint_cli(tmp_path):
    from click.testing import CliRunner

    from glomscan.cli import main
    from glomscan.model import ModelCard, build_model, save_checkpoint

    crop_set = make_crop_set(tmp_path / "set", side=40)
    runner = CliRunner()
    result = runner.invoke(main, ["augment", "crops", "--from-crop-set", str(crop_set), "--out", str(tmp_path / "crops"),
                                  "--size", "64", "--tiles", str(make_tile_set(tmp_path / "tiles")), "--tiles-mpp", "1.0"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 sclerosed crops" in result.output
    assert runner.invoke(main, ["augment", "crops", "--out", str(tmp_path / "x")]).exit_code != 0  # neither source
    card = ModelCard(name="tiny", encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), tile=256)
    save_checkpoint(tmp_path / "seg.pt", build_model(card), card)
    result = runner.invoke(main, ["train", "inpaint", "--crops", str(tmp_path / "crops"), "--out", str(tmp_path / "g.pt"),
                                  "--epochs", "1", "--batch-size", "4", "--base-channels", "4", "--feature-model",
                                  str(tmp_path / "seg.pt"), "--precision", "fp32", "--style-weight", "10", "--quiet"])
    assert result.exit_code == 0, result.output
    row = pd.read_csv(tmp_path / "g.metrics.csv").iloc[-1]
    assert row.vgg.startswith("enabled: resnet18 encoder of tiny") and row.perceptual > 0
