"""Synthesis: pasting inpainted glomeruli only inside the masks, labels, counts, the output
dataset, placement rules and the clear errors."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from glomscan.model import ModelCard
from glomscan.train.fit.segment import PatchDataset
from glomscan.augment.synthesize import (
    SynthesisError,
    SynthesisSettings,
    candidate_origins,
    composite,
    inpaint_crop,
    patch_tissue,
    synthesize,
)
from test_crops import build_dataset, disc

FAKE_COLOUR = (10, 200, 30)


class FakeInpainter:
    """Paints the whole crop one colour; records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, masks):
        self.calls.append((images.copy(), masks.copy()))
        return np.broadcast_to(np.asarray(FAKE_COLOUR, np.uint8), images.shape).copy()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-ds") / "data"
    build_dataset(root)
    return root


def shape_masks(n=3, size=64):
    return [disc((size, size), 32, 32, r) for r in np.linspace(8, 14, n)]


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_synthesize_pastes_only_inside_masks_and_labels_them(dataset, tmp_path):
    before = digest(dataset)
    inpainter = FakeInpainter()
    out = tmp_path / "aug"
    summary = synthesize(dataset, out, inpainter, shape_masks(), SynthesisSettings(amount=1.0, min_distance_px=6, seed=2))
    assert digest(dataset) == before  # the input dataset is untouched
    # 4 whole + 1 cut-by-every-patch sclerosed glomeruli in the training slide; the val slide's don't count
    assert summary.real_sclerosed == 5 and len(summary.placements) == 5
    # the inpainter saw X * (1 - mask): black inside the mask
    images, masks = inpainter.calls[0]
    assert (images[0][masks[0]] == 0).all() and (images[0][~masks[0]] > 0).any()
    m = pd.read_csv(out / "manifest.csv", dtype={"patch_id": str})
    original = pd.read_csv(dataset / "manifest.csv", dtype={"patch_id": str})
    synthetic = m[m.synthetic.astype(str) == "True"]
    assert len(m) == len(original) + len(synthetic) and (synthetic.split == "train").all()
    assert synthetic.n_synthetic_glomeruli.sum() == 5
    after = digest(out)
    for name, digest_value in before.items():  # original patches present, byte-identical
        if name.name != "manifest.csv":
            assert after[name] == digest_value
    assert original.equals(m[m.synthetic.astype(str) != "True"][list(original.columns)].reset_index(drop=True))
    for _, row in synthetic.iterrows():
        src = original.set_index("patch_id").loc[row.source_patch]
        from glomscan.train.dataset.data import load_patch

        image0, labels0 = load_patch(dataset, src)
        image1, labels1 = load_patch(out, row)
        pasted = np.zeros(labels0.shape, bool)
        for p in summary.placements:
            if p.source_patch == row.source_patch:
                pasted[p.y0:p.y0 + 64, p.x0:p.x0 + 64] |= p.mask
        assert pasted.sum() == sum(p.area_px for p in summary.placements if p.source_patch == row.source_patch)
        assert np.array_equal(image1[~pasted], image0[~pasted])  # untouched outside the masks
        assert np.array_equal(labels1[~pasted], labels0[~pasted])
        assert (labels1[pasted] == 2).all() and (image1[pasted] == FAKE_COLOUR).all()
        assert row.n_sclerosed_px == (labels1 == 2).sum()
        # placed away from the existing glomeruli, on tissue
        from scipy import ndimage

        distance = ndimage.distance_transform_edt(labels0 == 0)
        assert distance[pasted].min() > 6
    # train segment's dataset class reads the synthetic patches unchanged
    ds = PatchDataset(out, synthetic, ModelCard(name="t"), augment=True)
    x, labels = ds[0]
    assert x.shape == (3, 256, 256) and labels.dtype == torch.int64 and (labels == 2).any()
    syn = pd.read_csv(out / "synthesis.csv")
    assert len(syn) == 5 and set(syn.patch_id) == set(synthetic.patch_id)
    assert (out / "examples.png").is_file()


def test_amount_scales_the_count_and_reuses_masks(dataset, tmp_path):
    s = synthesize(dataset, tmp_path / "a", FakeInpainter(), shape_masks(1), SynthesisSettings(amount=0.6))
    assert len(s.placements) == round(0.6 * 5) == 3
    assert [p.mask_index for p in s.placements] == [0, 0, 0]


def test_largest_glomeruli_are_placed_first(dataset, tmp_path):
    """Small shapes listed first would take the room the large ones need; placing the largest
    first packs them all (the ablation's +100 % failed without it)."""
    masks = [disc((64, 64), 32, 32, r) for r in (6, 8, 10, 26)]
    s = synthesize(dataset, tmp_path / "a", FakeInpainter(), masks, SynthesisSettings(amount=0.8, min_distance_px=6))
    assert [p.area_px for p in s.placements] == sorted((p.area_px for p in s.placements), reverse=True)
    assert sorted(p.mask_index for p in s.placements) == [0, 1, 2, 3]


def test_feathering_stays_inside_the_mask(tmp_path):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    generated = np.zeros_like(original)
    mask = disc((64, 64), 32, 32, 16)
    out = composite(original, generated, mask, feather_px=4)
    assert np.array_equal(out[~mask], original[~mask])
    inner = disc((64, 64), 32, 32, 11)
    assert (out[inner] == 0).all()  # fully generated 4+ px inside
    ring = mask & ~disc((64, 64), 32, 32, 14)
    assert (out[ring] > 0).any()  # blended at the border


def test_inpainter_of_another_size_sees_the_whole_hole():
    """A generator trained at 48 px inpaints a 96 px crop: resized there and back, and no
    pixel of the glomerulus mask reaches the generator as context."""
    import torch

    from glomscan.augment.inpaint import Inpainter
    from glomscan.augment.inpaint_models import InpaintGenerator

    torch.manual_seed(0)
    inpainter = Inpainter(InpaintGenerator(base_channels=4), size=48)
    seen = []
    inpainter.generator.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    crop = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    mask = disc((96, 96), 45, 50, 13)
    out = inpaint_crop(inpainter, crop, mask)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    hole = seen[0][0, 3].numpy() > 0  # the generator's mask channel at 48 px
    assert hole.shape == (48, 48)
    ys, xs = np.nonzero(mask)
    assert hole[ys // 2, xs // 2].all()  # every 2x2 block touching the glomerulus is hole
    assert (seen[0][0, :3][:, hole] == 0).all()  # and shows no original pixel


def test_tissue_and_candidate_positions():
    image = np.full((100, 120, 3), (246, 244, 247), np.uint8)  # glass
    image[:, 60:] = (222, 168, 196)  # tissue on the right
    tissue = patch_tissue(image)
    assert tissue[:, 62:].all() and not tissue[:, :58].any()
    forbidden = ~tissue
    mask = np.zeros((20, 20), bool)
    mask[5:10, 8:12] = True
    ok = candidate_origins(forbidden, mask)
    assert ok.shape == (81, 101)
    brute = np.array([[not forbidden[y:y + 20, x:x + 20][mask].any() for x in range(101)] for y in range(81)])
    assert np.array_equal(ok, brute)


def test_clear_errors(dataset, tmp_path):
    with pytest.raises(SynthesisError, match="no glomerulus masks"):
        synthesize(dataset, tmp_path / "a", FakeInpainter(), [])
    with pytest.raises(SynthesisError, match="no position fits"):
        synthesize(dataset, tmp_path / "b", FakeInpainter(), shape_masks(), SynthesisSettings(min_distance_px=400))
    assert not (tmp_path / "b").exists()  # nothing half-written
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(SynthesisError, match="not empty"):
        synthesize(dataset, tmp_path / "c", FakeInpainter(), shape_masks())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "images").symlink_to(dataset / "images")
    (empty / "masks").symlink_to(dataset / "masks")
    m = pd.read_csv(dataset / "manifest.csv")
    m[m.n_sclerosed_px == 0].to_csv(empty / "manifest.csv", index=False)
    with pytest.raises(SynthesisError, match="no sclerosed glomeruli"):
        synthesize(empty, tmp_path / "d", FakeInpainter(), shape_masks())


def test_cli_crops_mask_gan_generate_synthesize_then_train_segment(tmp_path):
    """End to end through the command line: augment crops -> train masks -> augment masks ->
    synthesize (a tiny random inpainting generator) -> one tiny train segment step."""
    from click.testing import CliRunner

    from glomscan.cli import main
    from glomscan.augment.inpaint import save_generator
    from glomscan.augment.inpaint_models import InpaintGenerator

    data = tmp_path / "data"
    build_dataset(data)
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = ok("augment", "crops", "--data", data, "--out", tmp_path / "crops", "--size", 64)
    assert "wrote 3 crops" in out and "1 wider than 64 px" in out
    ok("train", "masks", "--crops", tmp_path / "crops", "--out", tmp_path / "gan.pt", "--epochs", 1,
       "--batch-size", 4, "--latent", 8, "--base-channels", 8, "--quiet")
    assert (tmp_path / "gan.metrics.csv").is_file() and (tmp_path / "gan.samples.png").is_file()
    out = ok("augment", "masks", "--model", tmp_path / "gan.pt", "--count", 3, "--out", tmp_path / "masks",
             "--size", 64, "--threshold", 0.5, "--min-island-px", 4, "--diameter-range", 12, 24)
    assert "wrote 3 masks" in out
    torch.manual_seed(0)
    save_generator(tmp_path / "gen.pt", InpaintGenerator(base_channels=8, n_aot_blocks=1), {"size": 64})
    out = ok("augment", "synthesize", "--data", data, "--generator", tmp_path / "gen.pt", "--masks", tmp_path / "masks",
             "--out", tmp_path / "aug", "--amount", 0.6, "--min-distance-px", 4, "--feather", 2)
    assert "3 synthetic sclerosed glomeruli (0.6 x 5 real)" in out
    m = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    assert (m.synthetic.astype(str) == "True").sum() >= 1
    ok("train", "segment", "--data", tmp_path / "aug", "--out", tmp_path / "seg.pt", "--epochs", 1,
       "--batch-size", 2, "--crop", 64, "--encoder", "resnet18", "--max-steps-per-epoch", 1,
       "--bn-recalibration-steps", 0, "--quiet")
    assert (tmp_path / "seg.pt").is_file()
    # errors a person understands
    result = runner.invoke(main, ["augment", "synthesize", "--data", str(data), "--generator", str(tmp_path / "gen.pt"),
                                  "--masks", str(tmp_path / "crops"), "--out", str(tmp_path / "aug2")])
    assert result.exit_code == 1 and "no glomerulus masks" in result.output
