"""The one file format of glomscan's torch weights: every trained network and every resume state.

A checkpoint is a ``torch.save``d dict read with ``weights_only=True`` (no pickled code runs)::

    {"format": "glomscan-checkpoint", "version": 2, "kind": KIND,
     "card": {...plain values...}, "state_dict": {...tensors...}, "extra": {...}}

``kind`` says what the weights are (:data:`KINDS`); ``card`` describes them in plain values (a
model card for the two analysis networks, the architecture and training facts for the two GANs,
the architecture a resume must share for a training state); ``extra`` holds what a kind needs
besides (a resume state's epoch and random state).

Files written before kinds existed are read on: a version-1 ``glomscan-checkpoint`` is a
segmentation network, and the verifier, inpainting and mask GAN files had formats of their own
(``glomscan-verifier``, ``glomscan-inpaint-generator``, ``glomscan-maskgan``); a resume state was
a plain dict holding its state dicts and values side by side (read with all of them in both
``state_dict`` and ``extra``: the trainer takes its own by name).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_torch_save

FORMAT = "glomscan-checkpoint"
VERSION = 2


@dataclass(frozen=True)
class Kind:
    noun: str
    """What a person calls the file, in errors."""
    made_by: str
    """What writes one, in errors."""


KINDS = {
    "segmentation": Kind("checkpoint", "write one with `glomscan init-model` or `glomscan train segment`"),
    "verifier": Kind("verifier state", "`glomscan train verifier` writes one"),
    "inpaint-generator": Kind("inpainting generator", "`glomscan train inpaint` writes one"),
    "mask-generator": Kind("mask GAN", "`glomscan train masks` writes one"),
    "training-state": Kind("resume state", "a glomscan trainer writes one next to its output"),
}

_OLD_FORMATS = {"glomscan-verifier": "verifier", "glomscan-inpaint-generator": "inpaint-generator",
                "glomscan-maskgan": "mask-generator"}


class CheckpointError(ValueError):
    """The file is missing or is not a usable glomscan checkpoint of the kind asked for."""


@dataclass(frozen=True)
class Checkpoint:
    kind: str
    card: dict
    state_dict: dict
    extra: dict = field(default_factory=dict)


def cpu_state(state_dict: dict, half: bool = False) -> dict:
    """A state dict detached on the CPU (floating tensors as float16 when ``half``: half the file)."""
    return {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state_dict.items()}


def save_checkpoint_file(path: Path, kind: str, card: dict, state_dict: dict, extra: dict | None = None) -> str:
    """Write a checkpoint of ``kind`` atomically (folders made); returns the file's sha256."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {sorted(KINDS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"format": FORMAT, "version": VERSION, "kind": kind, "card": dict(card),
                             "state_dict": state_dict, "extra": dict(extra or {})})
    return sha256_file(path)


def read_checkpoint_file(path: Path, kind: str) -> Checkpoint:
    """The checkpoint of ``kind`` at ``path`` (older layouts converted); CheckpointError with a
    reason a person can act on when it is missing, unreadable, not glomscan's or another kind."""
    import torch

    path, expected = Path(path), KINDS[kind]
    if not path.is_file():
        raise CheckpointError(f"{expected.noun} not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    try:
        found = _convert(payload, kind)
    except (KeyError, TypeError, AttributeError) as exc:  # a glomscan layout with entries missing
        raise CheckpointError(f"{path} is a damaged glomscan checkpoint (no {exc}); {expected.made_by}") from exc
    if found is None:
        raise CheckpointError(f"{path} is not a glomscan {expected.noun} (no 'format': '{FORMAT}' key); "
                              f"{expected.made_by}")
    if isinstance(found, str):
        raise CheckpointError(f"{path}: {found}")
    if found.kind != kind:
        raise CheckpointError(f"{path} is a glomscan {KINDS.get(found.kind, Kind(found.kind, '')).noun}, "
                              f"not a {expected.noun}; {expected.made_by}")
    return found


def _convert(payload: Any, kind: str) -> Checkpoint | str | None:
    """``payload`` as a Checkpoint; a string saying why it cannot be read; None when it is not
    glomscan's."""
    if not isinstance(payload, dict):
        return None
    fmt, version = payload.get("format"), payload.get("version")
    if fmt == FORMAT and version == VERSION:
        return Checkpoint(payload["kind"], payload["card"], payload["state_dict"], payload.get("extra", {}))
    if fmt == FORMAT and version == 1:
        return Checkpoint("segmentation", payload["card"], payload["state_dict"])
    if fmt == FORMAT and isinstance(version, int) and version > VERSION:
        return (f"checkpoint version {version} is not supported (this glomscan reads versions 1 to {VERSION}; "
                "a newer glomscan wrote it)")
    if fmt == FORMAT:
        return f"checkpoint version {version!r} is not a version glomscan wrote (1 to {VERSION})"
    if fmt in _OLD_FORMATS:
        old_kind = _OLD_FORMATS[fmt]
        card = {"verifier": lambda: payload["card"],
                "inpaint-generator": lambda: {"architecture": payload["architecture"], "info": payload["info"]},
                "mask-generator": lambda: {"config": payload["config"], "info": payload["info"]}}[old_kind]()
        return Checkpoint(old_kind, card, payload["state_dict"])
    if fmt is None and kind == "training-state" and "epoch" in payload:  # a resume state before kinds
        rest = {k: v for k, v in payload.items() if k != "architecture"}
        return Checkpoint(kind, {"architecture": payload.get("architecture")}, rest, rest)
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
