"""The training harness: device choice, seeding, resume state and metrics CSV, and what a crash
between the CSV write and the resume-state write leaves behind."""

import numpy as np
import pandas as pd
import pytest
import torch

from glomscan.checkpoint import read_checkpoint_file
from glomscan.train.fit import harness
from glomscan.train.fit.harness import TrainingRun, choose_training_device, seed_training


class Crash(Exception):
    """Stands for the process being killed."""


def crash_on_next(monkeypatch, write: str) -> None:
    """The harness's next ``write`` ("save_checkpoint_file": the resume state; "atomic_write_text":
    the metrics CSV) raises :class:`Crash` instead of writing, as a kill at that moment would.
    Later writes go through."""
    original = getattr(harness, write)

    def crash(*args, **kwargs):
        monkeypatch.setattr(harness, write, original)
        raise Crash(write)

    monkeypatch.setattr(harness, write, crash)


def train(out, epochs: int, width: int = 3) -> tuple[TrainingRun, torch.nn.Module]:
    """A tiny trainer on the harness: a linear model, SGD with momentum (optimiser state that a
    resume must restore), fixed data."""
    seed_training(0)
    model = torch.nn.Linear(width, 1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = TrainingRun(out, {"model": model, "optimiser": optimiser}, {"width": width})
    run.resume()
    x = torch.linspace(-1, 1, 8 * width).reshape(8, width)
    y = x.sum(1, keepdim=True)
    for epoch in range(run.start_epoch, epochs):
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimiser.step()
        run.end_epoch(epoch, {"loss": loss.item()})
    return run, model


def test_resume_continues_as_if_never_stopped(tmp_path):
    _, straight = train(tmp_path / "a.pt", 3)
    run, _ = train(tmp_path / "b.pt", 2)
    assert run.last_path == tmp_path / "b.last.pt" and run.metrics_path == tmp_path / "b.metrics.csv"
    run, resumed = train(tmp_path / "b.pt", 3)
    assert run.start_epoch == 2
    assert list(pd.read_csv(tmp_path / "b.metrics.csv").epoch) == [1, 2, 3]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # weights and momentum came back
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "a.metrics.csv").loss,
                                  pd.read_csv(tmp_path / "b.metrics.csv").loss)
    run, _ = train(tmp_path / "b.pt", 3)  # nothing left to do
    assert run.start_epoch == 3 and [r["epoch"] for r in run.rows] == [1, 2, 3]


def test_crash_between_the_csv_and_the_resume_state_leaves_one_row_per_epoch(tmp_path, monkeypatch):
    train(tmp_path / "m.pt", 1)
    crash_on_next(monkeypatch, "save_checkpoint_file")
    with pytest.raises(Crash):
        train(tmp_path / "m.pt", 3)
    # the CSV has epoch 2, the resume state does not
    assert list(pd.read_csv(tmp_path / "m.metrics.csv").epoch) == [1, 2]
    assert read_checkpoint_file(tmp_path / "m.last.pt", "training-state").extra["epoch"] == 0
    run, _ = train(tmp_path / "m.pt", 3)
    assert run.start_epoch == 1
    assert list(pd.read_csv(tmp_path / "m.metrics.csv").epoch) == [1, 2, 3]
    train(tmp_path / "s.pt", 3)
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "s.metrics.csv").loss,
                                  pd.read_csv(tmp_path / "m.metrics.csv").loss)


def test_crash_at_the_csv_write_leaves_no_gap(tmp_path, monkeypatch):
    """The CSV is written before the resume state: a kill during the CSV write must not leave a
    resume state that is ahead of the CSV."""
    train(tmp_path / "m.pt", 1)
    crash_on_next(monkeypatch, "atomic_write_text")
    with pytest.raises(Crash):
        train(tmp_path / "m.pt", 3)
    assert read_checkpoint_file(tmp_path / "m.last.pt", "training-state").extra["epoch"] == 0
    train(tmp_path / "m.pt", 3)
    assert list(pd.read_csv(tmp_path / "m.metrics.csv").epoch) == [1, 2, 3]


def test_a_run_with_another_architecture_is_refused(tmp_path):
    train(tmp_path / "m.pt", 1)
    with pytest.raises(ValueError, match=r"use the same settings \(--width\) to resume, or another --out"):
        train(tmp_path / "m.pt", 2, width=4)
    assert list(pd.read_csv(tmp_path / "m.metrics.csv").epoch) == [1]  # untouched


def test_seeding_repeats_the_draws():
    seed_training(5)
    first = torch.rand(3), np.random.rand(3)
    seed_training(5)
    assert torch.equal(torch.rand(3), first[0]) and np.array_equal(np.random.rand(3), first[1])


def test_device_choice_for_named_cuda_devices_and_fp32_only_trainers(monkeypatch):
    monkeypatch.setattr(harness, "cpu_supports_bf16", lambda: True)
    d = choose_training_device(device="cuda:1", cpu_bf16=False)
    assert (d.device, d.device_type, d.precision) == ("cuda:1", "cuda", "fp16")
    d = choose_training_device("fp32", device="cuda")
    assert d.dtype is None and "autocast" not in d.reason
    # a trainer that asks for no bf16 on the CPU gets fp32 there even on a bf16 CPU
    d = choose_training_device(device="cpu", cpu_bf16=False)
    assert (d.device, d.precision, d.channels_last) == ("cpu", "fp32", False)
    assert choose_training_device("bf16", device="cpu", cpu_bf16=False).precision == "bf16"  # asked for


def test_gradient_scaler_state_is_kept_and_optional(tmp_path):
    """The fp16 loss scale comes back on resume; a resume state without one (an older run, or a
    disabled scaler's empty state) leaves the scaler fresh instead of failing."""
    model = torch.nn.Linear(2, 1)

    def scaler():
        return torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 16)

    saved = scaler()
    saved.scale(torch.ones(()))  # the scale exists after the first scaled loss
    saved.update(new_scale=1024.0)
    TrainingRun(tmp_path / "a.pt", {"model": model, "scaler": saved}, optional=("scaler",)).end_epoch(0, {"loss": 1.0})
    resumed = scaler()
    TrainingRun(tmp_path / "a.pt", {"model": model, "scaler": resumed}, optional=("scaler",)).resume()
    assert resumed.get_scale() == 1024.0

    for name, state in {"old": None, "disabled": torch.amp.GradScaler("cpu", enabled=False)}.items():
        objects = {"model": model} if state is None else {"model": model, "scaler": state}
        TrainingRun(tmp_path / f"{name}.pt", objects).end_epoch(0, {"loss": 1.0})
        fresh = scaler()
        run = TrainingRun(tmp_path / f"{name}.pt", {"model": model, "scaler": fresh}, optional=("scaler",))
        run.resume()
        assert run.start_epoch == 1 and fresh.get_scale() == 2.0 ** 16
        with pytest.raises((KeyError, RuntimeError)):  # not optional: a missing state is an error
            TrainingRun(tmp_path / f"{name}.pt", {"model": model, "scaler": scaler()}).resume()
