"""Tile sets, glomerulus crop sets and their compositing into tissue (``prepare --tiles --crops``)."""

import numpy as np
import pandas as pd
import pytest

from glomscan.train.dataset.composite import CompositeSettings, paste_glomeruli, scaled_crop, tissue_map
from glomscan.imaging import write_png
from glomscan.labels import NORMAL, SCLEROSED
from glomscan.train.dataset.data import PrepareSettings, load_patch, prepare_dataset
from glomscan.train.dataset.sources import (
    UNKNOWN_CLASS,
    GlomerulusCrop,
    SourceError,
    crop_label,
    glomerulus_mask,
    read_crop_set,
    read_labels_csv,
    read_tile_set,
    tile_groups,
)


def _tissue_background(size=256, seed=0):
    """Pink textured tissue on the left 3/4, white glass on the right, one labelled glomerulus."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 245, np.uint8)
    w = size * 3 // 4
    image[:, :w] = np.clip(np.array([200, 120, 170]) + rng.normal(0, 12, (size, w, 3)), 0, 255).astype(np.uint8)
    labels = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    labels[(yy - 60) ** 2 + (xx - 60) ** 2 < 30**2] = UNKNOWN_CLASS
    return image, labels


def _disc_crop(name, slide, label, size=64, radius=24, colour=(120, 60, 140)):
    yy, xx = np.mgrid[:size, :size]
    outline = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    image = np.full((size, size, 3), 230, np.uint8)
    image[outline] = colour
    return GlomerulusCrop(name, slide, label, image, outline)


def test_scale_maths_gives_the_drawn_equivalent_diameter():
    crop = _disc_crop("a", "s", 1, size=64, radius=24)
    assert crop.equivalent_diameter_px == pytest.approx(48, rel=0.03)
    for diameter_um, mpp in ((150.0, 1.0), (100.0, 0.5), (240.0, 2.0)):
        _, outline = scaled_crop(crop, diameter_um, mpp)
        measured = 2 * np.sqrt(outline.sum() / np.pi) * mpp
        assert measured == pytest.approx(diameter_um, rel=0.03)


def test_pasted_glomeruli_lie_on_tissue_away_from_labels_and_match_their_outlines():
    image, labels = _tissue_background()
    crops = [_disc_crop(f"c{i}", "s", 1 + i % 2) for i in range(6)]
    settings = CompositeSettings(diameter_range_um=(30.0, 40.0), clearance_px=6, stain_match=0.0, stain_jitter=0.0)
    rng = np.random.default_rng(3)
    out, out_labels, placed, unplaced = paste_glomeruli(image, labels, crops, 1.0, settings, rng)
    assert len(placed) + len(unplaced) == len(crops) and len(placed) >= 3
    tissue = tissue_map(image)
    # the labelled glomerulus is untouched
    assert ((labels == UNKNOWN_CLASS) == (out_labels == UNKNOWN_CLASS)).all()
    assert (out[labels == UNKNOWN_CLASS] == image[labels == UNKNOWN_CLASS]).all()
    for p in placed:
        box = (slice(p.y0, p.y1), slice(p.x0, p.x1))
        outline = out_labels[box] == p.label
        # labels equal the pasted outline: the crop's outline at the drawn diameter
        assert 2 * np.sqrt(outline.sum() / np.pi) == pytest.approx(p.diameter_um, rel=0.05)
        assert 30.0 <= p.diameter_um <= 40.0
        # on tissue, never on glass
        assert tissue[box][outline].mean() >= settings.min_tissue_fraction
        # inside the outline (away from the soft edge) the pixels are the crop's own colour
        from scipy import ndimage as ndi

        interior = ndi.binary_erosion(outline, iterations=4)
        assert np.abs(out[box][interior].astype(float) - (120, 60, 140)).max() <= 3
    # never over (or within the clearance of) a labelled glomerulus, nor of each other
    from scipy import ndimage

    components, n = ndimage.label(out_labels > 0)
    assert n == len(placed) + 1
    # nothing outside the outlines was labelled
    assert (out_labels > 0).sum() == (labels > 0).sum() + sum(
        (out_labels[p.y0:p.y1, p.x0:p.x1] == p.label).sum() for p in placed)


def test_crop_that_fits_nowhere_is_returned_unplaced():
    image, labels = _tissue_background(size=96)
    crops = [_disc_crop("big", "s", 2)]
    _, out_labels, placed, unplaced = paste_glomeruli(
        image, labels, crops, 1.0, CompositeSettings(diameter_range_um=(200.0, 210.0)), np.random.default_rng(0))
    assert placed == [] and unplaced == crops and (out_labels == labels).all()


def test_tile_groups_keep_adjacent_ids_together():
    groups = tile_groups(["10003", "10014", "10063", "10064", "10164", "10165", "10169", "roi_a"])
    assert groups["10063"] == groups["10064"] != groups["10014"]
    assert groups["10164"] == groups["10165"] == groups["10169"]
    assert groups["10003"] != groups["10014"]  # 11 apart
    assert groups["roi_a"] == "tiles-roi_a"


def test_mask_colours():
    red = np.zeros((2, 2, 3), np.uint8)
    red[0, 0] = (220, 20, 30)
    red[1, 1] = (255, 255, 255)
    red[0, 1] = (200, 200, 40)  # yellow is not a glomerulus
    assert glomerulus_mask(red).tolist() == [[True, False], [False, True]]
    assert glomerulus_mask(np.array([[0, 200]], np.uint8)).tolist() == [[False, True]]


def test_labels_csv_of_a_crop_folder_gives_each_crop_its_class(tmp_path):
    """One reader for crop sets and graded crops: the required columns, and a row's class by
    globally_sclerosed (preferred) or class."""
    (tmp_path / "labels.csv").write_text("image,slide,class\na.png,s1,Sclerosed\nb.png,s1, normal\n")
    table = read_labels_csv(tmp_path, ("image", "slide"))
    assert [crop_label(row) for row in table.to_dict("records")] == [SCLEROSED, NORMAL]
    assert crop_label({"image": "c.png", "globally_sclerosed": 1, "class": "normal"}) == SCLEROSED
    assert crop_label({"image": "c.png", "globally_sclerosed": 0}) == NORMAL
    with pytest.raises(SourceError, match="not normal/sclerosed"):
        crop_label({"image": "c.png", "class": "maybe"})
    with pytest.raises(ValueError, match="needs columns image and globally_sclerosed"):
        read_labels_csv(tmp_path, ("image",), ("globally_sclerosed",), error=ValueError)
    with pytest.raises(SourceError, match="no labels.csv"):
        read_labels_csv(tmp_path / "elsewhere", ("image", "slide"))


def _make_sets(root):
    (root / "tiles" / "images").mkdir(parents=True)
    (root / "tiles" / "masks").mkdir(parents=True)
    for i, tile_id in enumerate((100, 101, 200, 300, 301, 400)):
        image, labels = _tissue_background(size=256, seed=i)
        mask = np.zeros((*labels.shape, 3), np.uint8)
        mask[labels > 0] = (255, 0, 0)
        write_png(root / "tiles" / "images" / f"{tile_id}.png", np.repeat(np.repeat(image, 2, 0), 2, 1))
        write_png(root / "tiles" / "masks" / f"{tile_id}.png", np.repeat(np.repeat(mask, 2, 0), 2, 1))
    (root / "crops" / "images").mkdir(parents=True)
    (root / "crops" / "masks").mkdir(parents=True)
    rows = []
    for s in range(5):
        for k in range(4):
            crop = _disc_crop(f"s{s}-{k}.png", f"s{s}", 1 + (k % 2), colour=(110 + 5 * k, 60, 140))
            write_png(root / "crops" / "images" / crop.name, crop.image)
            write_png(root / "crops" / "masks" / crop.name, crop.outline.astype(np.uint8) * 255)
            rows.append({"image": crop.name, "slide": crop.slide, "globally_sclerosed": int(crop.label == 2)})
    pd.DataFrame(rows).to_csv(root / "crops" / "labels.csv", index=False)


def test_prepare_tiles_and_crops_splits_by_slide_and_tile_group(tmp_path):
    _make_sets(tmp_path)
    tiles = read_tile_set(tmp_path / "tiles", tile_mpp=0.5, analysis_mpp=1.0)
    assert tiles[0].image.shape == (256, 256, 3) and set(np.unique(tiles[0].labels)) == {0, UNKNOWN_CLASS}
    assert len(read_crop_set(tmp_path / "crops")) == 20
    settings = PrepareSettings(validation_fraction=0.25, composite_uses=2,
                               composite=CompositeSettings(diameter_range_um=(30.0, 45.0)))
    manifest = prepare_dataset(None, None, tmp_path / "out", settings, tiles_dir=tmp_path / "tiles",
                               crops_dir=tmp_path / "crops")
    placements = pd.read_csv(tmp_path / "out" / "glomeruli.csv")
    assert set(manifest.kind) == {"tile", "composite"}
    # tile groups: 100+101 and 300+301 stay together, in one split each
    tiles_m = manifest[manifest.kind == "tile"].set_index("patch_id")
    assert tiles_m.loc["tile_100", "split"] == tiles_m.loc["tile_101", "split"]
    assert tiles_m.loc["tile_300", "split"] == tiles_m.loc["tile_301", "split"]
    # every composite's background group is in the composite's split, and so is every crop's slide
    group_split = manifest[manifest.kind == "tile"].groupby("slide").split.first().to_dict()
    for row in manifest[manifest.kind == "composite"].itertuples():
        assert group_split[row.slide] == row.split
    slide_splits = placements.groupby("slide").split.nunique()
    assert (slide_splits == 1).all(), "a crop slide appears in both splits"
    val_slides = set(placements[placements.split == "val"].slide)
    assert val_slides and not val_slides & set(placements[placements.split == "train"].slide)
    # labels in the written masks equal the pasted outlines and classes
    for p in placements.to_dict("records")[:10]:
        row = manifest[manifest.patch_id == p["patch_id"]].iloc[0]
        _, labels = load_patch(tmp_path / "out", row)
        window = labels[p["y0"]:p["y1"], p["x0"]:p["x1"]]
        assert (window == p["label"]).sum() == pytest.approx(np.pi / 4 * p["diameter_um"] ** 2, rel=0.05)
    assert (manifest.n_unknown_class_px > 0).all()  # each tile and composite keeps its real glomerulus


def test_crops_without_tiles_are_refused(tmp_path):
    from glomscan.train.dataset.data import AnnotationError

    _make_sets(tmp_path)
    with pytest.raises(AnnotationError, match="needs a tile set"):
        prepare_dataset(None, None, tmp_path / "out", PrepareSettings(), crops_dir=tmp_path / "crops")


def _write_masks(out_dir, dataset_dir, manifest, transform):
    import pyvips

    for row in manifest.to_dict("records"):
        _, truth = load_patch(dataset_dir, row)
        folder = out_dir / "analysis" / row["patch_id"]
        folder.mkdir(parents=True, exist_ok=True)
        pyvips.Image.new_from_array(np.ascontiguousarray(transform(truth)).astype(np.uint8)).tiffsave(
            str(folder / "mask.tif"), tile=True, pyramid=True)


def test_scoring_of_a_prepared_set_counts_what_analyze_wrote(tmp_path):
    from glomscan.train.evaluation.prepared_set import real_metrics_markdown, score_prepared_set

    _make_sets(tmp_path)
    settings = PrepareSettings(validation_fraction=0.4, composite_uses=1,
                               composite=CompositeSettings(diameter_range_um=(30.0, 45.0)))
    manifest = prepare_dataset(None, None, tmp_path / "data", settings, tiles_dir=tmp_path / "tiles",
                               crops_dir=tmp_path / "crops")
    val = manifest[manifest.split == "val"]
    placed = pd.read_csv(tmp_path / "data" / "glomeruli.csv")
    assert (placed.split == "val").sum() >= 4 and (placed[placed.split == "val"].label == 2).any()

    # a perfect analysis (unknown-class glomeruli called normal)
    _write_masks(tmp_path / "perfect", tmp_path / "data", val, lambda t: np.where(t == UNKNOWN_CLASS, 1, t))
    m = score_prepared_set(tmp_path / "data", val, tmp_path / "perfect")
    assert m["composite_detection_recall"] == 1.0 and m["composite_detection_precision"] == 1.0
    assert m["tile_detection_recall"] == 1.0 and m["tile_glomerulus_dice"] == 1.0
    assert m["sclerosed_sensitivity"] == 1.0 and m["sclerosed_specificity"] == 1.0
    assert m["balanced_accuracy"] == 1.0 and m["sclerosis_pct_mae"] == 0.0
    assert m["composite_dice_normal"] == 1.0 and m["composite_dice_sclerosed"] == 1.0
    assert "| balanced accuracy | 1.000 |" in real_metrics_markdown(m)

    # every sclerosed glomerulus called normal: found, but sensitivity 0 and %GS off
    _write_masks(tmp_path / "blind", tmp_path / "data", val, lambda t: np.where(t > 0, 1, 0))
    m = score_prepared_set(tmp_path / "data", val, tmp_path / "blind")
    assert m["composite_detection_recall"] == 1.0
    assert m["sclerosed_sensitivity"] == 0.0 and m["sclerosed_specificity"] == 1.0 and m["balanced_accuracy"] == 0.5
    slides = pd.read_csv(tmp_path / "blind" / "slides.csv")
    assert (slides.predicted_percent == 0).all()
    assert m["sclerosis_pct_mae"] == pytest.approx(slides.pathologist_percent.mean())

    # nothing found
    _write_masks(tmp_path / "empty", tmp_path / "data", val, lambda t: np.zeros_like(t))
    m = score_prepared_set(tmp_path / "data", val, tmp_path / "empty")
    assert m["composite_detection_recall"] == 0.0 and m["glomeruli_detected"] == 0


def test_evaluate_real_runs_analyze_on_the_validation_patches(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    from glomscan.cli import main

    _make_sets(tmp_path)
    settings = PrepareSettings(validation_fraction=0.4, composite_uses=1,
                               composite=CompositeSettings(diameter_range_um=(30.0, 45.0)))
    manifest = prepare_dataset(None, None, tmp_path / "data", settings, tiles_dir=tmp_path / "tiles",
                               crops_dir=tmp_path / "crops")
    res = CliRunner().invoke(main, ["evaluate", "real", "--model", str(tiny_checkpoint), "--data",
                                    str(tmp_path / "data"), "--backend", "torch", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    import json

    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_val = (manifest.split == "val").sum()
    assert len(list((tmp_path / "ev" / "analysis").glob("*/report.json"))) == n_val
    assert metrics["glomeruli_graded"] == (pd.read_csv(tmp_path / "data" / "glomeruli.csv").split == "val").sum()
    assert (tmp_path / "ev" / "metrics.md").read_text().startswith("| measure |")


@pytest.mark.parametrize("python_without_tar_filters", [False, True])
def test_compact_training_set_rebuilds_the_prepared_set(tmp_path, monkeypatch, python_without_tar_filters):
    """The compact form (tiles and masks whole, composites as their pasted boxes) unpacks to the
    same patches: exactly with PNG boxes, within JPEG's error with JPEG boxes."""
    import shutil

    from glomscan.train.dataset.compact import pack_training_set, unpack_training_set

    if python_without_tar_filters:  # Debian 12's Python 3.11.2 has no tarfile extraction filters
        import tarfile

        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    _make_sets(tmp_path)
    settings = PrepareSettings(validation_fraction=0.25, composite_uses=2,
                               composite=CompositeSettings(diameter_range_um=(30.0, 45.0)))
    manifest = prepare_dataset(None, None, tmp_path / "out", settings, tiles_dir=tmp_path / "tiles",
                               crops_dir=tmp_path / "crops")
    counts = pack_training_set(tmp_path / "out", tmp_path / "exact.tar", box_quality=None)
    assert counts["as_boxes"] == (manifest.kind == "composite").sum() and counts["whole"] == (manifest.kind == "tile").sum()
    pack_training_set(tmp_path / "out", tmp_path / "jpeg.tar", box_quality=90)
    unpacked = unpack_training_set(tmp_path / "exact.tar", tmp_path / "exact")
    unpack_training_set(tmp_path / "jpeg.tar", tmp_path / "jpeg")
    pd.testing.assert_frame_equal(unpacked, manifest.reset_index(drop=True), check_dtype=False)
    for row in manifest.to_dict("records"):
        image, labels = load_patch(tmp_path / "out", row)
        exact, exact_labels = load_patch(tmp_path / "exact", row)
        lossy, lossy_labels = load_patch(tmp_path / "jpeg", row)
        assert np.array_equal(exact, image) and np.array_equal(exact_labels, labels) and np.array_equal(lossy_labels, labels)
        assert np.abs(lossy.astype(int) - image).mean() < 2
    # a composite that differs from its tile outside the boxes is kept whole (in a copy of the
    # set: libvips caches images by file name)
    shutil.copytree(tmp_path / "out", tmp_path / "changed")
    row = manifest[manifest.kind == "composite"].iloc[0]
    image, _ = load_patch(tmp_path / "out", row)
    image = image.copy()
    image[0, 0] = 255 - image[0, 0]
    write_png(tmp_path / "changed" / row["image"], image)
    assert pack_training_set(tmp_path / "changed", tmp_path / "again.tar")["whole"] == counts["whole"] + 1
    unpack_training_set(tmp_path / "again.tar", tmp_path / "again")
    assert np.array_equal(load_patch(tmp_path / "again", row)[0], image)
