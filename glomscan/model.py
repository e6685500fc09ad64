"""The segmentation network and its checkpoint format.

A glomscan checkpoint is a ``torch.save``d dict::

    {"format": "glomscan-checkpoint", "version": 1, "card": {...ModelCard...}, "state_dict": {...}}

loaded with ``weights_only=True`` (no pickled code runs). The card carries everything analyze
needs: architecture, classes, input normalisation, analysis mpp, tile size.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import CLASS_NAMES
from .atomic import atomic_torch_save

CHECKPOINT_FORMAT = "glomscan-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(Exception):
    """The model file is missing or is not a usable glomscan checkpoint."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet RGB statistics on [0, 1]: the U-Net's default input normalisation and VGG19's."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str = "Unet"
    encoder: str = "efficientnet-b3"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    classes: tuple[str, ...] = CLASS_NAMES
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    """Input normalisation on RGB scaled to [0, 1]."""
    analysis_mpp: float = 1.0
    """Micrometres per pixel the model was trained at (paper: 20x slides downsampled 2x)."""
    tile: int = 1024
    trained_on: str = "nothing (random initialisation)"
    notes: str = ""
    for_real_tissue: bool = False
    """True only for models trained and validated on real tissue; analyze warns otherwise."""
    intended_use: str = "not for real tissue: untrained or trained on synthetic images only"
    """Shown in report.json and index.html."""
    licence: str = ""
    """Terms the weights inherit from their training data."""
    metrics: dict = field(default_factory=dict)

    @property
    def tile_multiple(self) -> int:
        """Tile sides must be multiples of this: the encoder halves the image encoder_depth times."""
        return 2 ** self.encoder_depth

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("decoder_channels", "classes", "mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


def build_model(card: ModelCard) -> nn.Module:
    """The U-Net described by ``card``, randomly initialised (no weights are downloaded)."""
    import segmentation_models_pytorch as smp

    if card.architecture != "Unet":
        raise CheckpointError(f"unsupported architecture {card.architecture!r} (only 'Unet')")
    return smp.Unet(
        encoder_name=card.encoder,
        encoder_weights=None,
        encoder_depth=card.encoder_depth,
        decoder_channels=list(card.decoder_channels),
        classes=len(card.classes),
    )


@dataclass
class LoadedModel:
    module: nn.Module
    card: ModelCard
    sha256: str
    path: Path | None

    @property
    def model_id(self) -> str:
        return f"{self.card.name}@{self.sha256[:12]}"


def save_checkpoint(path: Path, module: nn.Module, card: ModelCard, half: bool = False) -> str:
    """Write atomically; returns the file's sha256. ``half`` stores fp16 weights (smaller file,
    converted back to fp32 on load)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in module.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "card": asdict(card),
               "state_dict": state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, payload)
    return sha256_file(path)


def write_random_checkpoint(path: Path, encoder: str = "efficientnet-b3", seed: int = 0,
                            analysis_mpp: float = 1.0) -> tuple[ModelCard, str]:
    """A randomly initialised checkpoint (demos and tests: it finds nothing real); returns its
    card and sha256. The same seed gives the same weights."""
    torch.manual_seed(seed)
    card = ModelCard(name=f"random-init-{encoder}-seed{seed}", encoder=encoder, analysis_mpp=analysis_mpp,
                     trained_on="nothing (random initialisation)",
                     notes="Random weights: the output is meaningless. Demo/testing only.")
    return card, save_checkpoint(path, build_model(card), card)


def repack_checkpoint(model: LoadedModel, path: Path, card_edits: dict, validation: dict | None = None) -> str:
    """Write ``model`` with fp16 weights (half the size; loaded back as fp32) and its card edited:
    ``card_edits`` replaces card fields (None values are ignored), ``validation`` (metrics of
    ``evaluate real``) is recorded under the card's metrics. Returns the new file's sha256."""
    card = replace(model.card, **{k: v for k, v in card_edits.items() if v is not None})
    if validation is not None:
        card = replace(card, metrics={**card.metrics, "validation": validation})
    return save_checkpoint(path, model.module, card, half=True)


def load_checkpoint(path: Path) -> LoadedModel:
    """Load and validate; raises CheckpointError with a reason a person can act on."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a glomscan checkpoint (no 'format': '{CHECKPOINT_FORMAT}' key); "
            "write one with `glomscan init-model` or `glomscan train segment`"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported")
    try:
        card = ModelCard.from_dict(payload["card"])
        if card.classes != CLASS_NAMES:
            raise CheckpointError(f"{path}: classes {card.classes} != expected {CLASS_NAMES}")
        module = build_model(card)
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        module.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: weights do not fit the card's architecture: {exc}") from exc
    module.eval()
    return LoadedModel(module=module, card=card, sha256=sha256_file(path), path=path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
