"""Dataset preparation, loss, metrics and the segmentation training loop (tiny sizes)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from glomscan.checkpoint import read_checkpoint_file
from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings
from glomscan.engines.torch_engine import TorchEngine
from glomscan.engines.base import EngineChoice
from glomscan.model import load_checkpoint
from glomscan.synthetic import SyntheticGlomerulus, write_synthetic_slide
from glomscan.qupath import PolygonAnnotation, read_qupath_geojson
from glomscan.train.dataset.data import (
    PrepareSettings,
    load_patch,
    parse_class_map,
    prepare_dataset,
    rasterise_polygons,
    split_slides,
)
from glomscan.train.evaluation.metrics import instance_matches, pixel_metrics, sclerosis_percent
from glomscan.train.fit.segment import PartialLabelLoss, SegmentSettings, targets_from_labels, train_segmentation
from glomscan.labels import UNKNOWN_CLASS

TINY = dict(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8))


def square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)


def test_rasterise_square_with_hole_at_downsample():
    poly = PolygonAnnotation(2, [square(20, 40, 60, 80), square(30, 50, 40, 60)])
    labels = rasterise_polygons([poly], x0=0, y0=0, width=50, height=50, downsample=2.0)
    # outline covers analysis px 10..29 x 20..39, the hole 15..19 x 25..29
    expected = np.zeros((50, 50), np.uint8)
    expected[20:40, 10:30] = 2
    expected[25:30, 15:20] = 0
    assert np.array_equal(labels, expected)
    # window offset: the same polygon seen from level-0 (20, 40) starts at the corner
    assert rasterise_polygons([poly], 20, 40, 5, 5, 2.0)[0, 0] == 2


def test_sclerosed_wins_overlaps():
    polys = [PolygonAnnotation(2, [square(0, 0, 10, 10)]), PolygonAnnotation(1, [square(0, 0, 20, 20)])]
    labels = rasterise_polygons(polys, 0, 0, 20, 20, 1.0)
    assert (labels[:10, :10] == 2).all() and (labels[15:, 15:] == 1).all()


def test_qupath_geojson_reading_and_class_map(tmp_path):
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 5, 5).tolist()]},
         "properties": {"classification": {"name": "Glomerulus sclerosed", "color": [1, 2, 3]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square(0, 0, 5, 5).tolist()],
                                                                                 [square(9, 9, 12, 12).tolist()]]},
         "properties": {"classification": {"name": "Glomerulus"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 5, 5).tolist()]},
         "properties": {"classification": {"name": "Tubule"}}},
    ]}
    (tmp_path / "a.geojson").write_text(json.dumps(gj))
    polys, skipped = read_qupath_geojson(tmp_path / "a.geojson", parse_class_map(None))
    assert [p.label for p in polys] == [2, 1, 1] and skipped == {"Tubule": 1}
    polys, skipped = read_qupath_geojson(tmp_path / "a.geojson", parse_class_map("Tubule=sclerosed,Glomerulus=ignore"))
    assert [p.label for p in polys] == [2] and "Glomerulus sclerosed" in skipped
    with pytest.raises(ValueError):
        parse_class_map("Glomerulus=kidney")


def test_slide_level_split():
    names = [f"s{i}" for i in range(10)]
    split = split_slides(names, 0.2, seed=0)
    assert sum(v == "val" for v in split.values()) == 2
    assert split == split_slides(list(reversed(names)), 0.2, seed=0)  # order independent, deterministic
    assert list(split_slides(["a", "b"], 0.2, 0).values()).count("val") == 1
    assert split_slides(["a"], 0.2, 0) == {"a": "train"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    (root / "slides").mkdir()
    (root / "ann").mkdir()
    slides = []
    for i in range(3):
        g = [SyntheticGlomerulus(400 + 300 * i, 500, 120, sclerosed=False), SyntheticGlomerulus(900, 1100, 100, sclerosed=True)]
        s = write_synthetic_slide(root / "slides" / f"s{i}.tif", 1600, 1400, g, [(100, 100, 1500, 1300)], mpp=0.5, seed=i)
        (root / "ann" / f"s{i}.geojson").write_text(json.dumps(s.qupath_geojson()))
        slides.append(s)
    settings = PrepareSettings(tile=256, stride=128, validation_fraction=0.34)
    manifest = prepare_dataset(root / "slides", root / "ann", root / "out", settings)
    return root / "out", manifest, slides


def test_prepare_cuts_patches_at_stride_with_true_masks(dataset):
    out, manifest, slides = dataset
    assert set(manifest.slide) == {"s0", "s1", "s2"}
    assert manifest.groupby("slide").split.nunique().max() == 1  # no slide in two splits
    assert (manifest.x % 128 == 0).all() and (manifest.y % 128 == 0).all()
    assert (manifest.x0 == manifest.x * 2).all()
    truth = slides[0].label_image(2.0)
    for _, row in manifest[manifest.slide == "s0"].iterrows():
        image, mask = load_patch(out, row)
        assert image.shape == (256, 256, 3) and mask.shape == (256, 256)
        window = np.zeros((256, 256), np.uint8)
        part = truth[row.y:row.y + 256, row.x:row.x + 256]
        window[:part.shape[0], :part.shape[1]] = part
        assert (mask != window).mean() < 0.01  # 64-gon vs disc: boundary pixels only
        assert row.n_normal_px == (mask == 1).sum() and row.n_sclerosed_px == (mask == 2).sum()
    # 800 x 700 analysis px with tissue 50..750 x 50..650: every grid tile touches tissue
    assert (manifest.slide == "s0").sum() == 6 * 5


def _paper_loss(logits, labels):
    """0.5 * BCE + (1 - mean class Dice), written out independently of the product."""
    target = targets_from_labels(labels)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((0, 2, 3))
    dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + target.sum((0, 2, 3)) + 1)
    return 0.5 * bce + 1 - dice.mean()


def test_loss_is_the_papers_with_full_labels():
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 2:8, 2:8] = 1
    labels[1, 5:12, 5:12] = 2
    target = targets_from_labels(labels)
    perfect = (target * 2 - 1) * 30.0
    loss = PartialLabelLoss()
    assert loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(-perfect, labels).item() > 1.0
    logits = torch.randn(2, 2, 16, 16)
    assert loss(logits, labels).item() == pytest.approx(_paper_loss(logits, labels).item(), rel=1e-6)


def test_unknown_class_pixels_supervise_only_glomerulus_vs_background():
    torch.manual_seed(0)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 2:8, 2:8] = 1
    labels[0, 9:15, 9:15] = UNKNOWN_CLASS
    unknown = labels[0] == UNKNOWN_CLASS
    loss = PartialLabelLoss()
    logits = torch.randn(1, 2, 16, 16, requires_grad=True)
    loss(logits, labels).backward()
    g = logits.grad[0]
    # Along the direction that keeps the union 1 - (1-pn)(1-ps) fixed, the loss does not change:
    # on unknown pixels the gradient is orthogonal to that direction.
    pn, ps = torch.sigmoid(logits[0, 0]).detach(), torch.sigmoid(logits[0, 1]).detach()
    # d(union)/dl_n = (1-ps) pn (1-pn), d(union)/dl_s = (1-pn) ps (1-ps); the split direction
    # keeping the union fixed is (du/dl_s, -du/dl_n).
    du_n, du_s = (1 - ps) * pn * (1 - pn), (1 - pn) * ps * (1 - ps)
    split = g[0] * du_s - g[1] * du_n
    assert split[unknown].abs().max().item() < 1e-9
    assert g[:, unknown].abs().sum().item() > 0  # but they are supervised (towards glomerulus)
    # Swapping the two class logits on unknown pixels leaves the loss unchanged.
    swapped = logits.detach().clone()
    swapped[0, :, unknown] = swapped[0, :, unknown].flip(0)
    assert loss(swapped, labels).item() == pytest.approx(loss(logits.detach(), labels).item(), rel=1e-6)
    # Raising both class probabilities on unknown pixels lowers the loss (they are glomerulus).
    raised = logits.detach().clone()
    raised[0, :, unknown] += 3.0
    assert loss(raised, labels).item() < loss(logits.detach(), labels).item()
    # Known-class pixels still get the class split: a normal pixel pushes sclerosed down.
    normal = labels[0] == 1
    assert (g[1][normal] > 0).all() and (g[0][normal] < 0).all()


def test_pixel_metrics_hand_computed():
    m = pixel_metrics(np.array([8, 0]), np.array([2, 0]), np.array([8, 4]))
    assert m["precision_normal"] == 0.8 and m["recall_normal"] == 0.5
    assert m["dice_normal"] == pytest.approx(16 / 26) and m["f1_normal"] == pytest.approx(2 * 0.4 / 1.3)
    assert m["dice_sclerosed"] == 0.0 and np.isnan(m["precision_sclerosed"])
    assert m["dice_mean"] == pytest.approx(8 / 26)


def test_instance_matching_and_sclerosis_percent():
    truth = np.zeros((40, 40), np.uint8)
    truth[2:12, 2:12] = 1
    truth[20:30, 20:30] = 2
    truth[2:6, 30:34] = 1
    pred = np.zeros_like(truth)
    pred[3:12, 2:12] = 1  # IoU 0.9 -> match
    pred[20:30, 25:35] = 2  # IoU 50/150 -> no match
    m = instance_matches(pred, truth)
    assert (m["n_true"], m["n_predicted"], m["matched"]) == (3, 2, 1)
    assert m["detection_precision"] == 0.5 and m["detection_recall"] == pytest.approx(1 / 3)
    assert sclerosis_percent(truth) == pytest.approx(100 / 3)


def test_training_checkpoint_resume_and_analyze(dataset, tmp_path):
    out, manifest, _ = dataset
    config = SegmentSettings(epochs=1, batch_size=2, crop=128, max_steps_per_epoch=2, name="tiny-trained", **TINY)
    best = train_segmentation(out, tmp_path / "m.pt", config, quiet=True)
    assert 0.0 <= best["dice_mean"] <= 1.0
    metrics = pd.read_csv(tmp_path / "m.metrics.csv")
    assert list(metrics.epoch) == [1] and {"train_loss", "val_dice_mean", "lr"} <= set(metrics.columns)
    assert "scaler" in read_checkpoint_file(tmp_path / "m.last.pt", "training-state").state_dict  # fp16 loss scale kept on CUDA
    # resume: a longer run continues from the last epoch instead of starting over
    resumed = train_segmentation(out, tmp_path / "m.pt", SegmentSettings(**{**config.__dict__, "epochs": 2}), quiet=True)
    assert list(pd.read_csv(tmp_path / "m.metrics.csv").epoch) == [1, 2]
    model = load_checkpoint(tmp_path / "m.pt")
    assert model.card.encoder == "resnet18" and model.card.tile == 256
    assert model.card.metrics["epoch"] in (1, 2) and "dice_mean" in model.card.metrics
    # a resumed run returns the best epoch's metrics, whichever run found them
    assert {"epoch": model.card.metrics["epoch"], **resumed} == model.card.metrics
    assert "s" in model.card.trained_on
    outcome = run_batch(out.parent / "slides", tmp_path / "res", model, TorchEngine(model), EngineChoice("torch", "test"),
                        AnalysisSettings(tile=256, overlap=128), quiet=True)
    assert not outcome.failed


def test_a_crash_between_the_csv_and_the_resume_state_leaves_one_row_per_epoch(dataset, tmp_path, monkeypatch):
    from test_train_harness import Crash, crash_on_next

    out, manifest, _ = dataset
    rows = pd.concat([manifest[manifest.split == "train"].head(2), manifest[manifest.split == "val"].head(2)])
    out = tmp_path / "small"  # four patches of the set: fast epochs
    out.mkdir()
    rows.assign(image=[str(dataset[0] / p) for p in rows.image], mask=[str(dataset[0] / p) for p in rows["mask"]]
                ).to_csv(out / "manifest.csv", index=False)
    config = SegmentSettings(epochs=1, batch_size=2, crop=64, max_steps_per_epoch=1, bn_recalibration_steps=0, **TINY)
    train_segmentation(out, tmp_path / "m.pt", config, quiet=True)
    first = pd.read_csv(tmp_path / "m.metrics.csv")
    crash_on_next(monkeypatch, "save_checkpoint_file")
    with pytest.raises(Crash):  # killed after epoch 2's CSV row, before its resume state
        train_segmentation(out, tmp_path / "m.pt", SegmentSettings(**{**config.__dict__, "epochs": 3}), quiet=True)
    assert list(pd.read_csv(tmp_path / "m.metrics.csv").epoch) == [1, 2]
    train_segmentation(out, tmp_path / "m.pt", SegmentSettings(**{**config.__dict__, "epochs": 3}), quiet=True)
    metrics = pd.read_csv(tmp_path / "m.metrics.csv")
    assert list(metrics.epoch) == [1, 2, 3]
    assert metrics.iloc[0].equals(first.iloc[0])  # the finished epoch's row is kept as it was


def test_batchnorm_recalibration_gives_exact_statistics():
    from torch.utils.data import DataLoader, TensorDataset

    from glomscan.train.fit.harness import TrainingDevice
    from glomscan.train.fit.segment import recalibrate_batchnorm

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=0.01)
    data = torch.randn(16, 3, 8, 8) * 2 + 5
    loader = DataLoader(TensorDataset(data, torch.zeros(16)), batch_size=4)
    recalibrate_batchnorm(torch.nn.Sequential(bn), loader, TrainingDevice("cpu", "fp32", False, "test"), steps=4)
    assert torch.allclose(bn.running_mean, data.mean(dim=(0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.01  # restored


@pytest.mark.parametrize("style", ["labels", "per-class"])
def test_prepare_from_mask_images_matches_geojson(dataset, tmp_path, style):
    import pyvips

    out, manifest, slides = dataset
    truth = slides[0].label_image(1.0)  # level-0 resolution; prepare scales it (nearest) itself
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "s0.tif").symlink_to(slides[0].path)
    ann = tmp_path / "ann"
    ann.mkdir()
    if style == "labels":
        pyvips.Image.new_from_array(truth).write_to_file(str(ann / "s0_labels.png"))
    else:
        pyvips.Image.new_from_array(((truth == 1) * 255).astype(np.uint8)).write_to_file(str(ann / "s0_normal.png"))
        pyvips.Image.new_from_array(((truth == 2) * 255).astype(np.uint8)).write_to_file(str(ann / "s0_sclerosed.png"))
    mine = prepare_dataset(tmp_path / "slides", ann, tmp_path / "out", PrepareSettings(tile=256, stride=128))
    theirs = manifest[manifest.slide == "s0"].set_index("patch_id")
    assert len(mine) == len(theirs)
    for _, row in mine.iterrows():
        _, a = load_patch(tmp_path / "out", row)
        _, b = load_patch(out, theirs.loc[row.patch_id])
        assert (a != b).mean() < 0.01


def test_evaluate_patch_set_cli(dataset, tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from glomscan.cli import main

    out, manifest, _ = dataset
    res = CliRunner().invoke(main, ["evaluate", "segment", "--model", str(tiny_checkpoint), "--data", str(out), "--split", "all",
                                    "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "ev.csv")
    assert len(table) == len(manifest) + 1 and table.iloc[-1]["item"] == "ALL"
    assert "| mean |" in (tmp_path / "ev.md").read_text()


def test_training_device_choice(monkeypatch):
    from glomscan.train.fit import harness

    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(harness, "cpu_supports_bf16", lambda: True)
    d = harness.choose_training_device("auto")
    assert (d.device, d.precision, d.channels_last, d.dtype) == ("cpu", "bf16", True, torch.bfloat16)
    assert harness.choose_training_device("fp32").precision == "fp32"
    monkeypatch.setattr(harness, "cpu_supports_bf16", lambda: False)
    d = harness.choose_training_device("auto")
    assert (d.precision, d.channels_last, d.dtype) == ("fp32", False, None)
    assert harness.choose_training_device("bf16").precision == "fp32"  # no emulated bf16
    with pytest.raises(ValueError, match="CUDA"):
        harness.choose_training_device("fp16")
    d = harness.choose_training_device("auto", device="cuda")
    assert (d.device, d.precision, d.dtype) == ("cuda", "fp16", torch.float16)


def test_unknown_class_outlines_rasterise_below_graded_ones():
    unknown = PolygonAnnotation(3, [square(0, 0, 20, 20)])
    normal = PolygonAnnotation(1, [square(10, 10, 30, 30)])
    labels = rasterise_polygons([normal, unknown], 0, 0, 32, 32, 1.0)
    assert labels[5, 5] == 3 and labels[15, 15] == 1 and labels[25, 25] == 1 and labels[31, 31] == 0
    assert parse_class_map("Glom=unknown")["glom"] == 3


def test_edge_patch_labels_are_mirrored_like_their_pixels():
    from glomscan.train.dataset.data import mirror_past_edge

    labels = np.zeros((8, 8), np.uint8)
    labels[4:6, 1:3] = 2
    mirrored = mirror_past_edge(labels, width=6, height=6)
    assert np.array_equal(mirrored[:6, :6], labels[:6, :6])
    assert np.array_equal(mirrored[6:, :6], labels[4:6, :6][::-1])
    assert np.array_equal(mirrored[:6, 6:], labels[:6, 4:6][:, ::-1])
    assert mirror_past_edge(labels, 20, 20) is labels


def test_jpeg_augmentation_compresses_with_chroma_subsampling():
    from glomscan.train.fit.segment import jpeg_roundtrip

    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = (200, 40, 160)  # a sharp colour edge: 4:2:0 smears the colour over 2 px
    out = jpeg_roundtrip(image, 90)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).max() > 20  # the edge's chroma is smeared
    assert np.abs(out[:, :28].astype(int) - image[:, :28]).mean() < 3  # flat areas survive


def test_patch_loader_processes_draw_different_augmentations(dataset):
    from torch.utils.data import DataLoader

    from glomscan.model import ModelCard
    from glomscan.train.fit.segment import PatchDataset, seed_worker

    out, manifest, _ = dataset
    rows = pd.concat([manifest[manifest.split == "train"].head(1)] * 4)  # the same patch four times
    ds = PatchDataset(out, rows, ModelCard(name="t"), augment=True, crop=64, stain_jitter=0.1, jpeg_min_quality=50)
    loader = DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=seed_worker,
                        generator=torch.Generator().manual_seed(0), multiprocessing_context="forkserver")
    first = [x for x, _ in loader]
    assert not torch.equal(first[0], first[1])  # one from each process: different draws
    again = [x for x, _ in DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=seed_worker,
                                      generator=torch.Generator().manual_seed(0), multiprocessing_context="forkserver")]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded: repeatable


def test_training_starts_from_a_glomscan_checkpoint(dataset, tmp_path, tiny_checkpoint):
    out, _, _ = dataset
    config = SegmentSettings(epochs=1, batch_size=2, crop=128, max_steps_per_epoch=1, name="ft", **TINY)
    # loader processes, in a process that has run libvips (prepare) before: must not hang
    train_segmentation(out, tmp_path / "a.pt", SegmentSettings(**{**config.__dict__, "workers": 2}), quiet=True)
    start = load_checkpoint(tmp_path / "a.pt")
    # one step at a tiny learning rate from those weights: the result stays close to them
    tuned = train_segmentation(out, tmp_path / "b.pt", SegmentSettings(**{**config.__dict__, "init": str(tmp_path / "a.pt"),
                                                                      "lr": 1e-9, "min_lr": 1e-9,
                                                                      "bn_recalibration_steps": 0}), quiet=True)
    assert tuned is not None
    after = load_checkpoint(tmp_path / "b.pt").module.state_dict()
    for key, value in start.module.state_dict().items():
        if value.dtype.is_floating_point and "running" not in key:
            torch.testing.assert_close(after[key], value, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="architecture"):
        train_segmentation(out, tmp_path / "c.pt", SegmentSettings(epochs=1, batch_size=2, crop=128, max_steps_per_epoch=1,
                                                               init=str(tmp_path / "a.pt")), quiet=True)


def test_resident_batches_keep_pixels_and_labels_aligned(dataset):
    """Crops, flips and rotations cut on the training device move labels with their pixels."""
    from glomscan.train.dataset.resident import ResidentPatches

    out, manifest, _ = dataset
    rows = manifest[manifest.split == "train"].head(3)
    patches = ResidentPatches(out, rows, "cpu", mean=(0, 0, 0), std=(1, 1, 1), seed=0)
    # make each pixel's red value tell its label, then check the pairing survives augmentation
    patches.images[..., 0] = patches.labels * 60
    x, labels = patches.batch(6, crop=96)
    assert x.shape == (6, 3, 96, 96) and labels.shape == (6, 96, 96) and labels.dtype == torch.int64
    assert torch.equal((x[:, 0] * 255).round().long(), labels * 60)
    again = ResidentPatches(out, rows, "cpu", mean=(0, 0, 0), std=(1, 1, 1), seed=0)
    again.images[..., 0] = again.labels * 60
    assert torch.equal(again.batch(6, crop=96)[0], x)  # seeded: repeatable
    turned = [torch.equal(x[i, 0], (patches.images[j, :96, :96, 0].float() / 255)) for i in range(6) for j in range(3)]
    assert not all(turned)


def test_resident_jpeg_and_stain_change_pixels_not_labels(dataset):
    from glomscan.train.dataset.resident import ResidentPatches, jpeg_batch

    out, manifest, _ = dataset
    rows = manifest[manifest.split == "train"].head(2)
    patches = ResidentPatches(out, rows, "cpu", mean=(0, 0, 0), std=(1, 1, 1), seed=1)
    image = patches.images[:1].permute(0, 3, 1, 2)
    compressed = jpeg_batch(image, 60)
    assert compressed.shape == image.shape and compressed.dtype == torch.uint8
    assert 0 < (compressed.int() - image.int()).abs().float().mean() < 8
    plain = ResidentPatches(out, rows, "cpu", mean=(0, 0, 0), std=(1, 1, 1), seed=1).batch(8, crop=64)
    jittered = patches.batch(8, crop=64, stain_jitter=0.2, jpeg_min_quality=50)
    assert torch.equal(plain[1], jittered[1])  # same draws of place and orientation
    assert not torch.equal(plain[0], jittered[0])


def test_training_with_the_data_on_the_device(dataset, tmp_path):
    out, _, _ = dataset
    config = SegmentSettings(epochs=1, batch_size=2, crop=128, max_steps_per_epoch=2, data_on_device=True,
                             stain_jitter=0.1, jpeg_min_quality=60, bn_recalibration_steps=2, name="resident", **TINY)
    best = train_segmentation(out, tmp_path / "m.pt", config, quiet=True)
    assert np.isfinite(best["selection_score"])
    assert load_checkpoint(tmp_path / "m.pt").card.name == "resident"


def test_resident_scale_augmentation_keeps_labels_on_their_pixels(dataset):
    from scipy import ndimage

    from glomscan.train.dataset.resident import ResidentPatches

    out, manifest, _ = dataset
    rows = manifest[(manifest.split == "train") & (manifest.n_normal_px + manifest.n_sclerosed_px > 0)].head(3)
    patches = ResidentPatches(out, rows, "cpu", mean=(0, 0, 0), std=(1, 1, 1), seed=3)
    patches.images[..., 0] = patches.labels * 60
    for _ in range(4):
        x, labels = patches.batch(4, crop=96, scale_jitter=0.5)
        assert x.shape == (4, 3, 96, 96) and labels.shape == (4, 96, 96)
        red = (x[:, 0] * 255).round().long().numpy()
        lab = labels.numpy()
        inner = np.stack([ndimage.minimum_filter(l, 5) == ndimage.maximum_filter(l, 5) for l in lab])
        assert inner.mean() > 0.5
        assert np.abs(red[inner] - lab[inner] * 60).max() <= 1
    with pytest.raises(ValueError, match="data-on-device"):
        train_segmentation(out, out / "x.pt", SegmentSettings(epochs=1, scale_jitter=0.2, **TINY), quiet=True)


def test_device_jpeg_subsamples_chroma_like_a_scanner():
    """The device JPEG smears a sharp colour edge over 2 px as 4:2:0 does, and keeps flat areas
    (nvJPEG through torchvision encodes 4:4:4 only, so the chroma is subsampled before it)."""
    from glomscan.train.dataset.resident import jpeg_batch, subsample_chroma

    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 33:] = (200, 40, 160)  # an edge at an odd column: inside a 2 x 2 chroma block
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    smeared = subsample_chroma(x)[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(smeared[:, 32:34] - image[:, 32:34]).max() > 20
    assert np.abs(smeared[:, :28] - image[:, :28]).max() <= 1 and np.abs(smeared[:, 38:] - image[:, 38:]).max() <= 1
    out = jpeg_batch(x, 90)[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(out[:, :28] - image[:, :28]).mean() < 3 and np.abs(out[:, 32:34] - image[:, 32:34]).max() > 20
