"""Inpainting training, generator file, metrics and the `train inpaint` / `evaluate inpaint`
commands (issue #5)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from skimage.metrics import structural_similarity

from glomscan.checkpoint import read_checkpoint_file
from glomscan.cli import main
from glomscan.imaging import write_png
from glomscan.augment.inpaint import (InpaintSettings, Inpainter, composite, images_to_tensor,
                                    inpainting_metrics, learning_rate_factor, load_inpainter, masks_to_tensor,
                                    sample_grid, save_generator, train_inpainting)
from glomscan.augment.inpaint_losses import GeneratorLoss, InpaintLossWeights, VGGFeatures
from glomscan.augment.inpaint_models import InpaintGenerator, PatchDiscriminator, generator_input, local_view


def make_crops(folder, n=6, n_test=2, size=64, seed=0):
    """Tiny crops folder in the format of `glomscan augment crops`: pink tissue with a purple disk."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        image = np.empty((size, size, 3), np.uint8)
        image[...] = (225, 190, 215)
        image = (image + rng.integers(-15, 15, image.shape)).clip(0, 255).astype(np.uint8)
        cx, cy, r = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4), size / 5
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        image[mask] = (150, 60, 140)
        write_png(folder / "images" / f"g{i}.png", image)
        write_png(folder / "masks" / f"g{i}.png", mask.astype(np.uint8) * 255)
        rows.append({"crop_id": f"g{i}", "split": "test" if i >= n - n_test else "train", "source": "p0",
                     "x0": 0, "y0": 0, "cx": cx, "cy": cy, "radius": r, "mask_px": int(mask.sum())})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


# --- metrics ------------------------------------------------------------------------------------------

def test_metrics_on_known_noise_match_closed_forms_and_skimage():
    rng = np.random.default_rng(0)
    original = rng.integers(40, 200, (48, 48, 3)).astype(np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[10:30, 5:40] = True
    k = 10
    noisy = original.astype(int) + k * rng.choice([-1, 1], original.shape)
    generated = np.where(mask[..., None], noisy, original).astype(np.uint8)
    m = inpainting_metrics(original, generated, mask)
    assert m["mae"] == pytest.approx(k / 255)
    assert m["psnr"] == pytest.approx(20 * math.log10(255 / k))  # MSE = k^2 inside the mask
    assert 0 < m["ssim"] < 1
    # outside-the-mask changes do not count for MAE/PSNR
    m2 = inpainting_metrics(original, np.where(mask[..., None], generated, 0).astype(np.uint8), mask)
    assert m2["mae"] == m["mae"] and m2["psnr"] == m["psnr"]
    # SSIM is the skimage SSIM map averaged over the mask: over the whole image minus the
    # 3 px border that skimage's mean leaves out, it equals skimage's mean SSIM
    inner = np.zeros_like(mask)
    inner[3:-3, 3:-3] = True
    noisy_all = (original.astype(int) + k * rng.choice([-1, 1], original.shape)).clip(0, 255).astype(np.uint8)
    reference = structural_similarity(original, noisy_all, channel_axis=2, data_range=255)
    assert inpainting_metrics(original, noisy_all, inner)["ssim"] == pytest.approx(reference, rel=1e-9)


def test_metrics_identical_and_errors():
    image = np.random.default_rng(1).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    m = inpainting_metrics(image, image.copy(), mask)
    assert m["mae"] == 0 and m["psnr"] == math.inf and m["ssim"] == pytest.approx(1)
    with pytest.raises(ValueError, match="empty mask"):
        inpainting_metrics(image, image, np.zeros((16, 16), bool))
    with pytest.raises(ValueError):
        inpainting_metrics(image, image[:8], mask)


# --- generator file and inpainter ------------------------------------------------------------------

def test_generator_files_from_before_the_upsampling_choice_load_as_transposed(tmp_path):
    torch.manual_seed(0)
    old = InpaintGenerator(base_channels=4, n_aot_blocks=1, upsampling="transposed").eval()
    save_generator(tmp_path / "old.pt", old, {"size": 64})
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    assert payload["card"]["architecture"]["upsampling"] == "transposed"
    del payload["card"]["architecture"]["upsampling"]  # as files written before the choice existed,
    torch.save({"format": "glomscan-inpaint-generator", "version": 1,  # in the generator's format of then
                "architecture": payload["card"]["architecture"], "info": payload["card"]["info"],
                "state_dict": payload["state_dict"]}, tmp_path / "old.pt")
    loaded = load_inpainter(tmp_path / "old.pt").generator
    assert loaded.upsampling == "transposed" and isinstance(loaded.dec2[0], torch.nn.ConvTranspose2d)
    save_generator(tmp_path / "new.pt", InpaintGenerator(base_channels=4, n_aot_blocks=1), {"size": 64})
    assert load_inpainter(tmp_path / "new.pt").generator.upsampling == "resize"
    with pytest.raises(ValueError, match="upsampling"):
        InpaintGenerator(base_channels=4, upsampling="nearest")


def test_save_and_load_generator_round_trip(tmp_path):
    torch.manual_seed(0)
    g = InpaintGenerator(base_channels=4, n_aot_blocks=2).eval()
    save_generator(tmp_path / "gen.pt", g, {"size": 64, "epoch": 3})
    inpainter = load_inpainter(tmp_path / "gen.pt")
    assert isinstance(inpainter, Inpainter) and inpainter.size == 64 and inpainter.info["epoch"] == 3
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 64, 64, 3)).astype(np.uint8)
    masks = np.zeros((3, 64, 64), bool)
    masks[:, 20:40, 16:44] = True
    out = inpainter(images, masks)
    assert out.shape == images.shape and out.dtype == np.uint8
    with torch.no_grad():
        y = g(generator_input(images_to_tensor(images), masks_to_tensor(masks)))
    expected = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(out.astype(int) - expected).max() <= 1
    gapped = images * ~masks[..., None]  # the pixels under the mask are ignored
    np.testing.assert_array_equal(inpainter(gapped, masks), out)
    # crops of another side are resized to the training size and back
    big = inpainter(np.repeat(np.repeat(images, 2, 1), 2, 2), np.repeat(np.repeat(masks, 2, 1), 2, 2))
    assert big.shape == (3, 128, 128, 3)
    with pytest.raises(ValueError):
        inpainter(images[..., :2], masks)
    with pytest.raises(ValueError):
        save_generator(tmp_path / "x.pt", g, {})
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a glomscan inpainting generator"):
        load_inpainter(tmp_path / "other.pt")


def test_mask_resizing_never_shrinks_the_hole():
    masks = np.zeros((1, 64, 64), bool)
    masks[0, 10:13, 21:22] = True  # a 3 x 1 sliver
    small = masks_to_tensor(masks, 32)[0, 0].numpy() > 0
    assert small.any()
    up = np.repeat(np.repeat(small, 2, 0), 2, 1)
    assert np.all(up[masks[0]])


def test_sample_grid_layout():
    images = np.full((2, 8, 8, 3), 50, np.uint8)
    masks = np.zeros((2, 8, 8), bool)
    masks[:, 2:5, 2:5] = True
    generated = np.full_like(images, 200)
    grid = sample_grid(images, masks, generated)
    assert grid.shape == (2 * 8 + 4, 3 * 8 + 8, 3)
    assert np.all(grid[3, 3] == 128)  # masked input: the hole is mid-grey
    assert np.all(grid[3, 12 + 3] == 200) and np.all(grid[0, 12] == 50)  # composited
    assert np.all(grid[3, 24 + 3] == 50)  # original
    np.testing.assert_array_equal(composite(images, generated, masks)[0], grid[:8, 12:20])


# --- optimisation -------------------------------------------------------------------------------------

def test_one_generator_step_lowers_the_total_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    g = InpaintGenerator(base_channels=4, n_aot_blocks=2)
    dg, dl = PatchDiscriminator(4).eval(), PatchDiscriminator(4).eval()
    for p in list(dg.parameters()) + list(dl.parameters()):
        p.requires_grad_(False)
    loss_fn = GeneratorLoss(InpaintLossWeights(), VGGFeatures(torch.nn.Sequential(torch.nn.Identity()), {"image": 0}))
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:48, 20:44] = 1
    optimiser = torch.optim.Adam(g.parameters(), lr=1e-4, betas=(0.5, 0.999))

    def total():
        rec = g(generator_input(image, mask))
        return loss_fn(rec, image, mask, dg(rec), dl(local_view(rec, mask)))["total"]

    before = total()
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    with torch.no_grad():
        after = total()
    assert after.item() < before.item()


def test_training_rejects_bad_settings(tmp_path):
    crops = make_crops(tmp_path / "crops", n=3, n_test=1)
    with pytest.raises(ValueError, match="at least 64"):
        train_inpainting(crops, tmp_path / "g.pt", InpaintSettings(size=32, base_channels=4))
    with pytest.raises(FileNotFoundError):
        train_inpainting(tmp_path / "nothing", tmp_path / "g.pt", InpaintSettings())
    for after in (-1, 3):
        with pytest.raises(ValueError, match="--lr-decay-after-epoch"):
            train_inpainting(crops, tmp_path / "g.pt", InpaintSettings(epochs=3, lr_decay_after_epoch=after))


# --- commands -----------------------------------------------------------------------------------------

def test_train_resume_and_evaluate_inpaint_cli(tmp_path):
    crops = make_crops(tmp_path / "crops")
    out = tmp_path / "gen" / "gen.pt"
    common = ["train", "inpaint", "--crops", str(crops), "--out", str(out), "--batch-size", "2", "--size", "64",
              "--base-channels", "4", "--max-steps-per-epoch", "1", "--quiet"]
    runner = CliRunner()
    result = runner.invoke(main, common + ["--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "epoch 1: held-out MAE" in result.output
    csv = pd.read_csv(out.with_suffix(".metrics.csv"))
    assert list(csv.epoch) == [1]
    for column in ("d_loss", "adv_global", "adv_local", "l1_global", "l1_local", "perceptual", "style", "ssim",
                   "total", "test_mae", "test_psnr", "test_ssim"):
        assert column in csv
    assert csv.perceptual.isna().all() and csv.vgg.str.startswith("disabled").all()  # recorded, not faked
    assert np.isfinite(csv[["l1_global", "total", "test_mae", "test_psnr", "test_ssim"]].to_numpy()).all()
    assert csv.test_crops.iloc[0] == 2
    grid = out.with_suffix(".samples") / "epoch_001.png"
    assert grid.is_file()
    inpainter = load_inpainter(out)
    assert inpainter.size == 64 and inpainter.info["epoch"] == 1 and inpainter.info["vgg"].startswith("disabled")
    weights_epoch1 = {k: v.clone() for k, v in inpainter.generator.state_dict().items()}

    result = runner.invoke(main, common + ["--epochs", "2"])  # resumes: only epoch 2 runs
    assert result.exit_code == 0, result.output
    csv2 = pd.read_csv(out.with_suffix(".metrics.csv"))
    assert list(csv2.epoch) == [1, 2]
    assert csv2.iloc[0].equals(csv.iloc[0])
    assert (out.with_suffix(".samples") / "epoch_002.png").is_file()
    state = load_inpainter(out).generator.state_dict()
    assert load_inpainter(out).info["epoch"] == 2
    assert any(not torch.equal(state[k], weights_epoch1[k]) for k in weights_epoch1)

    result = runner.invoke(main, common + ["--epochs", "2", "--base-channels", "8"])
    assert result.exit_code != 0 and "--base-channels" in result.output
    result = runner.invoke(main, common + ["--epochs", "3", "--upsampling", "transposed"])
    assert result.exit_code != 0 and "--upsampling" in result.output  # another decoder: not this run's weights

    other = tmp_path / "ssim" / "gen.pt"
    result = runner.invoke(main, [*common[:5], str(other), *common[6:], "--epochs", "2", "--ssim-weight", "0.5",
                                  "--upsampling", "transposed", "--lr-decay-after-epoch", "1"])
    assert result.exit_code == 0, result.output
    info = load_inpainter(other).info
    assert info["settings"]["ssim_weight"] == 0.5 and info["settings"]["upsampling"] == "transposed"
    assert info["settings"]["lr_decay_after_epoch"] == 1
    assert pd.read_csv(other.with_suffix(".metrics.csv")).lr.tolist() == [1e-4, 1e-4]  # one step per epoch
    assert load_inpainter(other).generator.upsampling == "transposed"
    result = runner.invoke(main, [*common[:5], str(other), *common[6:], "--epochs", "3", "--upsampling",
                                  "transposed", "--lr-decay-after-epoch", "3"])
    assert result.exit_code != 0 and "--lr-decay-after-epoch" in result.output

    prefix = tmp_path / "eval" / "inpaint"
    result = runner.invoke(main, ["evaluate", "inpaint", "--generator", str(out), "--crops", str(crops),
                                  "--out", str(prefix)])
    assert result.exit_code == 0, result.output
    assert "paper" in result.output and "0.0152" in result.output and "22.69" in result.output
    table = pd.read_csv(prefix.with_suffix(".csv"))
    assert list(table.crop_id) == ["g4", "g5"]
    summary = pd.read_csv(f"{prefix}.summary.csv")
    assert list(summary.metric) == ["mae", "psnr", "ssim"]
    np.testing.assert_allclose(summary.value, [table.mae.mean(), table.psnr.mean(), table.ssim.mean()])
    for value in summary.value:
        assert f"{value:9.4f}" in result.output

    result = runner.invoke(main, ["evaluate", "inpaint", "--generator", str(crops / "manifest.csv"),
                                  "--crops", str(crops)])
    assert result.exit_code != 0 and "not a" in result.output


def test_a_crash_between_the_csv_and_the_resume_state_leaves_one_row_per_epoch(tmp_path, monkeypatch):
    from test_train_harness import Crash, crash_on_next

    crops = make_crops(tmp_path / "crops", n=3, n_test=1)
    out = tmp_path / "g.pt"
    settings = InpaintSettings(epochs=1, batch_size=2, size=64, base_channels=4, n_aot_blocks=1, max_steps_per_epoch=1)
    first = train_inpainting(crops, out, settings, quiet=True)
    crash_on_next(monkeypatch, "save_checkpoint_file")
    with pytest.raises(Crash):  # killed after epoch 2's CSV row, before its resume state
        train_inpainting(crops, out, InpaintSettings(**{**settings.__dict__, "epochs": 3}), quiet=True)
    assert list(pd.read_csv(out.with_suffix(".metrics.csv")).epoch) == [1, 2]
    last = train_inpainting(crops, out, InpaintSettings(**{**settings.__dict__, "epochs": 3}), quiet=True)
    csv = pd.read_csv(out.with_suffix(".metrics.csv"))
    assert list(csv.epoch) == [1, 2, 3] and last["epoch"] == 3
    assert csv.total.iloc[0] == first["total"]  # the finished epoch's row is kept as it was


# --- the generator's moving average -------------------------------------------------------------------

def test_generator_average_blends_weights_and_batchnorm_statistics():
    from glomscan.augment.inpaint import generator_average

    first, second = InpaintGenerator(4, 1), InpaintGenerator(4, 1)
    with torch.no_grad():
        for module in (first, second):
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point():
                    tensor.normal_()
    average = generator_average(first, 0.75)
    average.update_parameters(first)  # the first update copies
    average.update_parameters(second)
    expected, got = first.state_dict(), average.module.state_dict()
    for name, tensor in second.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name], 0.75 * expected[name] + 0.25 * tensor)
    assert any("running_mean" in name for name in got)
    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="ema-decay"):
            generator_average(first, decay)


def test_a_run_with_a_generator_average_saves_it_and_resumes_it_exactly(tmp_path):
    crops = make_crops(tmp_path / "crops", n=4, n_test=1)
    settings = InpaintSettings(epochs=2, batch_size=2, size=64, base_channels=4, n_aot_blocks=1, ema_decay=0.5)
    whole = tmp_path / "whole" / "g.pt"
    train_inpainting(crops, whole, settings, quiet=True)
    state = read_checkpoint_file(whole.with_suffix(".last.pt"), "training-state").state_dict
    saved = load_inpainter(whole).generator.state_dict()
    averaged = {k.removeprefix("module."): v for k, v in state["generator_average"].items() if k != "n_averaged"}
    assert int(state["generator_average"]["n_averaged"]) == 4  # two steps per epoch
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor.float(), averaged[name].float(), rtol=0, atol=0)
    assert any(not torch.equal(saved[k], state["generator"][k].float()) for k in saved)  # not the trained one
    csv = pd.read_csv(whole.with_suffix(".metrics.csv"))
    assert {"raw_test_mae", "raw_test_psnr", "raw_test_ssim"} <= set(csv.columns)
    assert (csv.raw_test_mae != csv.test_mae).all()

    # stopped after epoch 1 and resumed: the same average as the uninterrupted run
    split = tmp_path / "split" / "g.pt"
    train_inpainting(crops, split, InpaintSettings(**{**settings.__dict__, "epochs": 1}), quiet=True)
    train_inpainting(crops, split, settings, quiet=True)
    for name, tensor in load_inpainter(split).generator.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)

    # a run without an average continued with one: the average starts at the resumed weights
    plain = tmp_path / "plain" / "g.pt"
    train_inpainting(crops, plain, InpaintSettings(**{**settings.__dict__, "epochs": 1, "ema_decay": 0.0}), quiet=True)
    train_inpainting(crops, plain, settings, quiet=True)
    csv = pd.read_csv(plain.with_suffix(".metrics.csv"))
    assert csv.raw_test_mae.isna().tolist() == [True, False]
    assert int(read_checkpoint_file(plain.with_suffix(".last.pt"), "training-state").state_dict["generator_average"]["n_averaged"]) == 2


def test_resuming_an_averaged_run_without_the_average_says_so(tmp_path, caplog):
    crops = make_crops(tmp_path / "crops", n=3, n_test=1)
    settings = InpaintSettings(epochs=1, batch_size=2, size=64, base_channels=4, n_aot_blocks=1, ema_decay=0.5)
    out = tmp_path / "g.pt"
    train_inpainting(crops, out, settings, quiet=True)
    with caplog.at_level("WARNING", logger="glomscan.augment.inpaint"):
        train_inpainting(crops, out, InpaintSettings(**{**settings.__dict__, "epochs": 2, "ema_decay": 0.0}), quiet=True)
    assert "--ema-decay" in caplog.text and "trained generator" in caplog.text


# --- learning rate -------------------------------------------------------------------------------------

def test_the_learning_rate_stays_then_falls_along_a_half_cosine_to_zero():
    steps, epochs, after = 4, 10, 6
    assert all(learning_rate_factor(e, s, steps, epochs, None) == 1.0 for e in range(epochs) for s in range(steps))
    factors = [learning_rate_factor(e, s, steps, epochs, after) for e in range(epochs) for s in range(steps)]
    assert factors[:after * steps + 1] == [1.0] * (after * steps + 1)
    decaying = factors[after * steps:]
    assert all(a > b for a, b in zip(decaying, decaying[1:]))  # strictly falling
    assert decaying[len(decaying) // 2] == pytest.approx(0.5)  # half way: half the rate
    assert 0 < decaying[-1] < 0.01  # the last step's rate is close to 0
    # symmetric about the middle, as a half cosine is
    assert [a + b for a, b in zip(decaying[1:], decaying[::-1])] == pytest.approx([1.0] * (len(decaying) - 1))


def test_a_decaying_run_logs_its_rates_and_resumes_on_the_same_schedule(tmp_path, monkeypatch):
    from glomscan.train.fit.harness import TrainingRun

    crops = make_crops(tmp_path / "crops", n=4, n_test=1)
    settings = InpaintSettings(epochs=3, batch_size=2, size=64, base_channels=4, n_aot_blocks=1, lr=1e-3,
                               lr_decay_after_epoch=1)
    whole = tmp_path / "whole" / "g.pt"
    train_inpainting(crops, whole, settings, quiet=True)
    csv = pd.read_csv(whole.with_suffix(".metrics.csv"))
    # the rate of each epoch's last step (two steps per epoch)
    expected = [1e-3 * learning_rate_factor(e, 1, 2, 3, 1) for e in range(3)]
    assert csv.lr.tolist() == pytest.approx(expected)
    assert expected[0] == 1e-3 and expected[0] > expected[1] > expected[2] > 0
    state = read_checkpoint_file(whole.with_suffix(".last.pt"), "training-state").state_dict
    assert state["g_optimiser"]["param_groups"][0]["lr"] == pytest.approx(expected[-1])
    assert state["d_optimiser"]["param_groups"][0]["lr"] == pytest.approx(expected[-1])

    # killed after epoch 2 (its rate already decaying) and resumed: the same weights as the
    # uninterrupted run (the schedule is a function of the epoch, not of the run's history)
    end_epoch = TrainingRun.end_epoch

    def killed_after_epoch_2(self, epoch, metrics, **state):
        row = end_epoch(self, epoch, metrics, **state)
        if epoch == 1:
            raise KeyboardInterrupt
        return row

    split = tmp_path / "split" / "g.pt"
    monkeypatch.setattr(TrainingRun, "end_epoch", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_inpainting(crops, split, settings, quiet=True)
    monkeypatch.undo()
    train_inpainting(crops, split, settings, quiet=True)
    assert pd.read_csv(split.with_suffix(".metrics.csv")).lr.tolist() == pytest.approx(expected)
    resumed, uninterrupted = load_inpainter(split).generator.state_dict(), load_inpainter(whole).generator.state_dict()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)
