"""The one checkpoint format: every kind round-trips, the wrong kind and a newer version are
refused with a reason, and the files written before kinds existed are read on."""

import pytest
import torch

from glomscan.checkpoint import KINDS, CheckpointError, cpu_state, read_checkpoint_file, save_checkpoint_file


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(tmp_path, kind):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(4)}
    sha = save_checkpoint_file(tmp_path / "sub" / "x.pt", kind, {"name": kind, "sizes": [1, 2]}, state, {"epoch": 3})
    assert len(sha) == 64
    saved = read_checkpoint_file(tmp_path / "sub" / "x.pt", kind)
    assert saved.kind == kind and saved.card == {"name": kind, "sizes": [1, 2]} and saved.extra == {"epoch": 3}
    assert torch.equal(saved.state_dict["w"], state["w"]) and int(saved.state_dict["n"]) == 4


def test_half_weights_keep_integers(tmp_path):
    state = cpu_state({"w": torch.ones(2, requires_grad=True) * 1.5, "n": torch.tensor(7)}, half=True)
    assert state["w"].dtype == torch.float16 and not state["w"].requires_grad and state["n"].dtype == torch.int64


def test_wrong_kind_missing_foreign_and_newer_files_are_refused(tmp_path):
    save_checkpoint_file(tmp_path / "v.pt", "verifier", {}, {})
    with pytest.raises(CheckpointError, match="is a glomscan verifier state, not a mask GAN; `glomscan train masks`"):
        read_checkpoint_file(tmp_path / "v.pt", "mask-generator")
    with pytest.raises(CheckpointError, match="inpainting generator not found"):
        read_checkpoint_file(tmp_path / "none.pt", "inpaint-generator")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a glomscan checkpoint"):
        read_checkpoint_file(tmp_path / "plain.pt", "segmentation")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_checkpoint_file(tmp_path / "bad.pt", "segmentation")
    torch.save({"format": "glomscan-checkpoint", "version": 3, "kind": "verifier"}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="version 3 is not supported.*newer glomscan"):
        read_checkpoint_file(tmp_path / "new.pt", "verifier")
    torch.save({"format": "glomscan-checkpoint", "version": 1, "state_dict": {}}, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged glomscan checkpoint .*'card'"):
        read_checkpoint_file(tmp_path / "damaged.pt", "segmentation")
    torch.save({"format": "glomscan-checkpoint"}, tmp_path / "unversioned.pt")
    with pytest.raises(CheckpointError, match="version None is not a version glomscan wrote"):
        read_checkpoint_file(tmp_path / "unversioned.pt", "segmentation")
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        save_checkpoint_file(tmp_path / "x.pt", "gan", {}, {})


def test_files_from_before_kinds_are_read(tmp_path):
    w = {"w": torch.ones(2)}
    old = {
        "segmentation": ({"format": "glomscan-checkpoint", "version": 1, "card": {"name": "m"}, "state_dict": w},
                         {"name": "m"}),
        "verifier": ({"format": "glomscan-verifier", "version": 1, "card": {"name": "v"}, "state_dict": w},
                     {"name": "v"}),
        "inpaint-generator": ({"format": "glomscan-inpaint-generator", "version": 1, "architecture": {"a": 1},
                               "info": {"size": 64}, "state_dict": w},
                              {"architecture": {"a": 1}, "info": {"size": 64}}),
        "mask-generator": ({"format": "glomscan-maskgan", "version": 1, "config": {"latent": 8}, "info": {"n": 2},
                            "state_dict": w}, {"config": {"latent": 8}, "info": {"n": 2}}),
    }
    for kind, (payload, card) in old.items():
        torch.save(payload, tmp_path / f"{kind}.pt")
        saved = read_checkpoint_file(tmp_path / f"{kind}.pt", kind)
        assert saved.kind == kind and saved.card == card and torch.equal(saved.state_dict["w"], w["w"])
    # a resume state was a plain dict of the trainer's state dicts and values
    torch.save({"model": w, "architecture": {"width": 3}, "epoch": 4, "best_score": 0.5}, tmp_path / "m.last.pt")
    saved = read_checkpoint_file(tmp_path / "m.last.pt", "training-state")
    assert saved.card == {"architecture": {"width": 3}} and saved.extra["epoch"] == 4
    assert saved.extra["best_score"] == 0.5 and torch.equal(saved.state_dict["model"]["w"], w["w"])
