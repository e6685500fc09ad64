"""The verifier's training loop: train_one_epoch and validate on the harness, resumable."""

import numpy as np
import pandas as pd
import pytest
import torch

from glomscan.train.fit import verifier
from glomscan.train.fit.verifier import load_verifier_state, train_verifier, validate
from glomscan.train.settings import VerifierSettings
from glomscan.verify import VerifierCard

SETTINGS = VerifierSettings(epochs=2, batch_size=4, precision="fp32")


def tiny_samples():
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 256, (12, SETTINGS.context_px, SETTINGS.context_px, 3), dtype=np.uint8)
    samples = pd.DataFrame({"split": ["train"] * 8 + ["val"] * 4, "target": [0, 1, 2, 3] * 3,
                            "weight": [1.0, 2.0] * 6})
    return samples, contexts


def test_a_resumed_verifier_run_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    samples, contexts = tiny_samples()
    best = train_verifier(samples, contexts, tmp_path / "straight.pt", SETTINGS, VerifierCard(name="t"), quiet=True)
    rows = pd.read_csv(tmp_path / "straight.metrics.csv")
    assert list(rows.epoch) == [1, 2] and {"train_loss", "lr", "val_selection_score"} <= set(rows.columns)
    assert best["epoch"] in (1, 2) and best["n_glomeruli"] == 3 and best["n_negatives"] == 1
    network, card = load_verifier_state(tmp_path / "straight.pt")
    assert card.metrics["validation_samples"] == best

    # killed while validating epoch 2, then run again: it resumes after epoch 1
    calls = []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(verifier, "validate", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_verifier(samples, contexts, tmp_path / "resumed.pt", SETTINGS, VerifierCard(name="t"), quiet=True)
    assert list(pd.read_csv(tmp_path / "resumed.metrics.csv").epoch) == [1]
    resumed = train_verifier(samples, contexts, tmp_path / "resumed.pt", SETTINGS, VerifierCard(name="t"), quiet=True)
    assert len(calls) == 3  # epoch 2 only
    again = pd.read_csv(tmp_path / "resumed.metrics.csv")
    np.testing.assert_array_equal(again.drop(columns="seconds"), rows.drop(columns="seconds"))
    assert resumed == best  # the best epoch's metrics, whichever run found them
    again_network, _ = load_verifier_state(tmp_path / "resumed.pt")
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, again_network.state_dict()[name]), name
