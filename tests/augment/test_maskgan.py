"""Mask DCGAN: shapes, a training step, mask post-processing and the even size spread."""


import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from glomscan.checkpoint import read_checkpoint_file
from glomscan.augment.maskgan import (
    MaskDiscriminator,
    MaskGanSettings,
    MaskGenerationSettings,
    MaskGenerator,
    discriminator_step,
    equivalent_diameter,
    even_diameters,
    generate_masks,
    load_mask_generator,
    normalise_mask,
    postprocess_sample,
    read_masks,
    rescale_to_diameter,
    train_mask_gan,
    write_masks,
)


def ellipse(size, cx, cy, rx, ry):
    yy, xx = np.mgrid[:size, :size]
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1


@pytest.mark.parametrize("image_size", [64, 128])
def test_dcgan_shapes(image_size):
    g = MaskGenerator(latent=16, image_size=image_size, base_channels=8)
    d = MaskDiscriminator(image_size=image_size, base_channels=8)
    x = g(torch.randn(3, 16))
    assert x.shape == (3, 1, image_size, image_size) and x.min() >= -1 and x.max() <= 1
    assert d(x).shape == (3,)


def test_discriminator_step_lowers_its_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    g = MaskGenerator(latent=16, image_size=64, base_channels=8)
    d = MaskDiscriminator(image_size=64, base_channels=8)
    real = torch.from_numpy(np.stack([normalise_mask(ellipse(64, 32, 32, 20, 14), 64)] * 8))[:, None]
    z = torch.randn(8, 16)
    opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    first = discriminator_step(g, d, opt, real, z)[0]
    for _ in range(4):
        last = discriminator_step(g, d, opt, real, z)[0]
    assert last < first


def test_normalise_mask_fills_the_frame_keeping_the_shape():
    m = ellipse(256, 100, 120, 40, 20)  # 80 x 40 px
    x = normalise_mask(m, 64) > 0
    rows, cols = np.nonzero(x)
    width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
    assert 52 <= width <= 58 and height == pytest.approx(width / 2, abs=2)


def test_postprocess_threshold_islands_one_contour_and_holes():
    sample = np.full((64, 64), -1.0, np.float32)
    sample[10:40, 10:40] = 1.0  # main body
    sample[20:24, 20:24] = -1.0  # a hole
    sample[50:53, 50:53] = 1.0  # an island (9 px at 64, 144 px at 256)
    sample[45:60, 5:15] = 0.2  # 0.6 after mapping to [0, 1]: in at threshold 0.5, out at 0.7
    mask = postprocess_sample(sample, 256, threshold=0.5, min_island_px=200)
    assert mask.shape == (256, 256) and mask.dtype == bool
    from scipy import ndimage

    assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1  # one main contour
    assert mask[88, 88]  # hole filled
    assert not mask[204, 204] and not mask[200, 40]  # island and the smaller component gone
    assert 110 * 110 < mask.sum() < 125 * 125
    # everything below the minimum area: no mask
    tiny = np.full((64, 64), -1.0, np.float32)
    tiny[5:7, 5:7] = 1.0
    assert postprocess_sample(tiny, 256, min_island_px=200) is None
    assert postprocess_sample(np.full((64, 64), -1.0), 256) is None
    # an RGB image in 0..255 is greyscaled first
    rgb = np.repeat(((sample + 1) * 127.5)[..., None], 3, axis=2)
    assert np.array_equal(postprocess_sample(rgb, 256, min_island_px=200), mask)


def test_rescale_hits_the_diameter_and_centres():
    shape = ellipse(256, 90, 150, 70, 40)
    for d in (30.0, 80.0, 150.0):
        m = rescale_to_diameter(shape, d, 256)
        assert equivalent_diameter(m.sum()) == pytest.approx(d, rel=0.03)
        ys, xs = np.nonzero(m)
        assert (xs.mean() + 0.5, ys.mean() + 0.5) == pytest.approx((128, 128), abs=1)
    with pytest.raises(ValueError, match="does not fit"):
        rescale_to_diameter(shape, 250, 256)


def test_even_diameters_are_uniform_over_the_range():
    d = even_diameters(400, 40, 160, np.random.default_rng(0))
    assert d.min() >= 40 and d.max() <= 160
    assert stats.kstest((d - 40) / 120, "uniform").pvalue > 0.5
    counts, _ = np.histogram(d, bins=8, range=(40, 160))
    assert counts.min() == counts.max() == 50  # stratified: exactly even per bin


def test_train_generate_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    masks = [ellipse(128, 64, 64, rng.uniform(15, 40), rng.uniform(15, 40)) for _ in range(6)]
    config = MaskGanSettings(epochs=2, batch_size=4, image_size=32, latent=8, base_channels=8, steps_per_epoch=2)
    history = train_mask_gan(masks, tmp_path / "gan.pt", config, quiet=True)
    assert [h["epoch"] for h in history] == [1, 2]
    assert (tmp_path / "gan.metrics.csv").read_text().count("\n") == 3
    assert (tmp_path / "gan.samples.png").is_file()
    # resumable: more epochs continue from the last state
    history = train_mask_gan(masks, tmp_path / "gan.pt", MaskGanSettings(**{**config.__dict__, "epochs": 3}), quiet=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    with pytest.raises(ValueError, match="use the same settings"):
        train_mask_gan(masks, tmp_path / "gan.pt", MaskGanSettings(**{**config.__dict__, "epochs": 4, "latent": 9}))
    generator, loaded, info = load_mask_generator(tmp_path / "gan.pt")
    assert loaded.image_size == 32 and info["n_masks"] == 6
    assert info["diameter_min_px"] == pytest.approx(min(equivalent_diameter(m.sum()) for m in masks))
    # an untrained generator's samples are noise: threshold 0 keeps most of the canvas
    out, records_even = generate_masks(generator, 5, MaskGenerationSettings(size=128, threshold=0.0, min_island_px=1,
                                                                            diameter_range=(20, 40)), (1, 2))
    assert len(out) == 5 and all(m.shape == (128, 128) for m in out)
    for m, r in zip(out, records_even):
        assert r["equivalent_diameter_px"] == pytest.approx(r["target_diameter_px"], rel=0.1)
    _, records_drawn = generate_masks(generator, 3, MaskGenerationSettings(size=128, threshold=0.0, min_island_px=1),
                                    (1, 2), diameters_px=np.array([22.0, 30.0, 38.0]))
    assert [r["target_diameter_px"] for r in records_drawn] == [22.0, 30.0, 38.0]  # e.g. real glomeruli's diameters
    for r in records_drawn:
        assert r["equivalent_diameter_px"] == pytest.approx(r["target_diameter_px"], rel=0.1)
    with pytest.raises(ValueError, match="3 positive diameters"):
        generate_masks(generator, 3, MaskGenerationSettings(size=128), (1, 2), diameters_px=np.array([20.0, 30.0]))
    write_masks(tmp_path / "masks", out, records_even)
    back = read_masks(tmp_path / "masks")
    assert len(back) == 5 and all(np.array_equal(a, b) for a, b in zip(out, back))
    with pytest.raises(ValueError, match="no glomerulus masks"):
        (tmp_path / "none").mkdir()
        read_masks(tmp_path / "none")


def test_a_crash_between_the_csv_and_the_resume_state_leaves_one_row_per_epoch(tmp_path, monkeypatch):
    from test_train_harness import Crash, crash_on_next

    rng = np.random.default_rng(0)
    masks = [ellipse(64, 32, 32, rng.uniform(8, 20), rng.uniform(8, 20)) for _ in range(4)]
    config = MaskGanSettings(epochs=1, batch_size=4, image_size=32, latent=8, base_channels=8, steps_per_epoch=1)
    first = train_mask_gan(masks, tmp_path / "gan.pt", config, quiet=True)
    crash_on_next(monkeypatch, "save_checkpoint_file")
    with pytest.raises(Crash):  # killed after epoch 2's CSV row, before its resume state
        train_mask_gan(masks, tmp_path / "gan.pt", MaskGanSettings(**{**config.__dict__, "epochs": 3}), quiet=True)
    assert list(pd.read_csv(tmp_path / "gan.metrics.csv").epoch) == [1, 2]
    history = train_mask_gan(masks, tmp_path / "gan.pt", MaskGanSettings(**{**config.__dict__, "epochs": 3}), quiet=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    losses = pd.read_csv(tmp_path / "gan.metrics.csv")
    assert list(losses.epoch) == [1, 2, 3]
    assert losses.loss_d.iloc[0] == first[0]["loss_d"]  # the finished epoch's row is kept as it was


def test_a_resumed_run_trains_what_an_uninterrupted_one_would(tmp_path, monkeypatch):
    """Instance noise, batches and latents all come from the run's own generator, whose state the
    resume state keeps: a run stopped after epoch 1 and resumed ends with the same weights."""
    import glomscan.augment.maskgan as maskgan

    rng = np.random.default_rng(0)
    masks = [ellipse(64, 32, 32, rng.uniform(8, 20), rng.uniform(8, 20)) for _ in range(4)]
    config = MaskGanSettings(epochs=2, batch_size=4, image_size=32, latent=8, base_channels=8, steps_per_epoch=2,
                             instance_noise=0.3)
    train_mask_gan(masks, tmp_path / "straight.pt", config, quiet=True)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # killed after epoch 1's resume state, while drawing its sample grid

    monkeypatch.setattr(maskgan, "write_grid", stop)
    torch.manual_seed(123)  # the global generator is not the run's: moving it must change nothing
    with pytest.raises(Stop):
        train_mask_gan(masks, tmp_path / "resumed.pt", config, quiet=True)
    monkeypatch.undo()
    torch.randn(1000)
    train_mask_gan(masks, tmp_path / "resumed.pt", config, quiet=True)
    straight = load_mask_generator(tmp_path / "straight.pt")[0].state_dict()
    resumed = load_mask_generator(tmp_path / "resumed.pt")[0].state_dict()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_a_run_written_before_the_one_checkpoint_format_resumes(tmp_path):
    """An earlier version wrote the mask GAN's rows to ``<out>.losses.csv`` and its resume state
    as a plain dict: a longer run continues both."""
    rng = np.random.default_rng(0)
    masks = [ellipse(64, 32, 32, rng.uniform(8, 20), rng.uniform(8, 20)) for _ in range(4)]
    config = MaskGanSettings(epochs=1, batch_size=4, image_size=32, latent=8, base_channels=8, steps_per_epoch=1)
    first = train_mask_gan(masks, tmp_path / "gan.pt", config, quiet=True)
    (tmp_path / "gan.metrics.csv").rename(tmp_path / "gan.losses.csv")
    saved = read_checkpoint_file(tmp_path / "gan.last.pt", "training-state")
    torch.save({**saved.state_dict, **saved.extra, **saved.card}, tmp_path / "gan.last.pt")
    history = train_mask_gan(masks, tmp_path / "gan.pt", MaskGanSettings(**{**config.__dict__, "epochs": 2}), quiet=True)
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["loss_d"] == first[0]["loss_d"]
    assert list(pd.read_csv(tmp_path / "gan.metrics.csv").epoch) == [1, 2]
    # its random state came back too: epoch 2 is the uninterrupted run's
    straight = train_mask_gan(masks, tmp_path / "straight" / "gan.pt", MaskGanSettings(**{**config.__dict__, "epochs": 2}),
                              quiet=True)
    assert [history[1][k] for k in ("loss_d", "loss_g")] == [straight[1][k] for k in ("loss_d", "loss_g")]
