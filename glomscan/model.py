"""The segmentation network, its card and its two file formats.

A glomscan checkpoint (``.pt``) is :mod:`glomscan.checkpoint`'s file of kind ``segmentation``,
its card a :class:`ModelCard`. The card carries everything analyze needs: architecture, classes,
input normalisation, analysis mpp, tile size.

A glomscan ONNX model (``.onnx``, written by ``export-onnx``) carries the same card and the
sha256 of the checkpoint it was exported from in its metadata; the ONNX Runtime and OpenVINO
backends run it without torch, and it keeps the checkpoint's identity (model id, resume
fingerprints). torch is imported only where a checkpoint is read or written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CheckpointError, cpu_state, read_checkpoint_file, save_checkpoint_file, sha256_file
from .labels import CLASS_NAMES

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch only where a checkpoint is read or written
    from torch import nn

    from .verify import Verifier

ONNX_CARD_KEY = "glomscan.card"
ONNX_SHA256_KEY = "glomscan.model_sha256"
"""ONNX metadata: the card (JSON) and the sha256 of the checkpoint the graph was exported from."""
ONNX_OMITTED_KEY = "glomscan.omitted_state"
"""JSON list of the state-dict entries a model file leaves out because inference does not use them."""
ONNX_STATE_PREFIX = "network."
ONNX_FLOAT16_SUFFIX = ".float16"
"""In a glomscan ONNX model file, state-dict entry ``k`` is the initializer ``network.k``, with
``.float16`` appended where it is stored as float16 (``engines.onnx.export_onnx``)."""


CARD_VERSION = 2
"""Version of the model cards' keys (segmentation and verifier): 1 is a card stored before cards
carried a version (no ``card_version`` key); 2 adds ``card_version`` and ``outputs``. A stored card
of a newer version, or with keys this version does not know, is read with a warning naming them."""
SEGMENTATION_OUTPUTS = (
    "(N, C, H, W) probabilities in [0, 1], C = len(classes): an independent sigmoid per class (not a "
    "softmax); channel c is the probability that the pixel belongs to a glomerulus of class classes[c]")


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
    card_version: int = CARD_VERSION
    """Version of this card's keys (``CARD_VERSION``; 1 for a stored card without the key)."""
    outputs: str = SEGMENTATION_OUTPUTS
    """What the network's outputs mean."""

    @property
    def tile_multiple(self) -> int:
        """Tile sides must be multiples of this: the encoder halves the image encoder_depth times."""
        return 2 ** self.encoder_depth

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        return cls(**card_fields(cls, d, ("decoder_channels", "classes", "mean", "std")))


def card_fields(card_class, d: dict, tuple_fields: tuple[str, ...]) -> dict:
    """The keys of a stored card that ``card_class`` knows, lists made tuples where the card
    holds tuples. Keys this version of glomscan does not know (a card written by a newer one)
    are named in a warning and ignored, never dropped silently."""
    unknown = sorted(k for k in d if k not in card_class.__dataclass_fields__)
    if unknown:
        log.warning("%s %r has keys this version of glomscan does not know, ignored: %s (written by a newer "
                    "glomscan?)", card_class.__name__, d.get("name", "?"), ", ".join(unknown))
    version = d.get("card_version", 1)
    if not isinstance(version, int) or version > CARD_VERSION:
        log.warning("%s %r is card version %r; this glomscan reads up to version %d: what the newer version "
                    "changed is not known here", card_class.__name__, d.get("name", "?"), version, CARD_VERSION)
    known = {k: v for k, v in d.items() if k in card_class.__dataclass_fields__}
    known["card_version"] = version
    for k in tuple_fields:
        if k in known:
            known[k] = tuple(known[k])
    return known


CARD_DOC_BEGIN = "<!-- glomscan model-card: begin (generated from the embedded card; do not edit) -->"
CARD_DOC_END = "<!-- glomscan model-card: end -->"
"""Markers around the generated part of docs/model-card.md and docs/verifier-card.md
(``glomscan model-card --update``)."""


def card_markdown(card, model_id: str, file_name: str) -> str:
    """A model or verifier card as markdown: a table of every key in the card's order (lists
    joined, text as written), then the metrics stored in it, flattened, numbers to 3 decimals."""

    def cell(value) -> str:
        if isinstance(value, (tuple, list)):
            return ", ".join(str(v) for v in value)
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value).replace("|", "\\|").replace("\n", " ") if value != "" else "(none)"

    def flat(prefix: str, value) -> list[tuple[str, str]]:
        if isinstance(value, dict):
            return [row for k, v in value.items() for row in flat(f"{prefix}.{k}" if prefix else str(k), v)]
        if isinstance(value, float):
            return [(prefix, f"{value:.3f}")]
        return [(prefix, cell(value))]

    values = {f: getattr(card, f) for f in card.__dataclass_fields__}
    lines = [f"| `{model_id}` | `{file_name}` |", "|---|---|"]
    lines += [f"| {key} | {cell(value)} |" for key, value in values.items() if key != "metrics"]
    metrics = flat("", values.get("metrics") or {})
    if metrics:
        lines += ["", "| metric stored in the card | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in metrics]
    return "\n".join(lines) + "\n"


def replace_card_section(document: str, section: str) -> str:
    """``document`` with the text between ``CARD_DOC_BEGIN`` and ``CARD_DOC_END`` replaced by
    ``section``; ValueError when the markers are missing."""
    begin, end = document.find(CARD_DOC_BEGIN), document.find(CARD_DOC_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the document has no generated section (lines {CARD_DOC_BEGIN!r} ... {CARD_DOC_END!r})")
    return document[:begin + len(CARD_DOC_BEGIN)] + "\n" + section + document[end:]


def build_model(card: ModelCard) -> "nn.Module":
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
    module: "nn.Module | None"
    """The torch network; None for an ONNX model file (no torch needed)."""
    card: ModelCard
    sha256: str
    """Of the checkpoint (for an ONNX model file: of the checkpoint it was exported from)."""
    path: Path | None
    onnx_path: Path | None = None
    """Set for an ONNX model file: the graph the ONNX Runtime and OpenVINO backends run."""
    verifier: "Verifier | None" = None
    """The candidate verifier paired with it (``glomscan.verify``), if any."""

    def torch_module(self) -> "nn.Module":
        """The torch network; for an ONNX model file rebuilt from the checkpoint inside it (on
        first use: this imports torch)."""
        if self.module is None:
            self.module = module_from_onnx(self.onnx_path, self.card)
        return self.module

    @property
    def model_id(self) -> str:
        return f"{self.card.name}@{self.sha256[:12]}"

    @property
    def analysis_sha256(self) -> str:
        """Identity of what analyses a slide (resume fingerprints): the segmentation model's
        sha256, and the verifier's when one is paired with it."""
        return self.sha256 if self.verifier is None else f"{self.sha256}+verifier:{self.verifier.sha256}"


def save_checkpoint(path: Path, module: "nn.Module", card: ModelCard, half: bool = False) -> str:
    """Write atomically; returns the file's sha256. ``half`` stores fp16 weights (smaller file,
    converted back to fp32 on load)."""
    return save_checkpoint_file(path, "segmentation", asdict(card), cpu_state(module.state_dict(), half))


def write_random_checkpoint(path: Path, encoder: str = "efficientnet-b3", seed: int = 0,
                            analysis_mpp: float = 1.0) -> tuple[ModelCard, str]:
    """A randomly initialised checkpoint (demos and tests: it finds nothing real); returns its
    card and sha256. The same seed gives the same weights."""
    import torch

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
    return save_checkpoint(path, model.torch_module(), card, half=True)


def load_checkpoint(path: Path) -> LoadedModel:
    """Load and validate; raises CheckpointError with a reason a person can act on."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    payload = read_checkpoint_file(path, "segmentation")
    try:
        card = ModelCard.from_dict(payload.card)
        if card.classes != CLASS_NAMES:
            raise CheckpointError(f"{path}: classes {card.classes} != expected {CLASS_NAMES}")
        module = build_model(card)
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload.state_dict.items()}
        module.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: weights do not fit the card's architecture: {exc}") from exc
    module.eval()
    return LoadedModel(module=module, card=card, sha256=sha256_file(path), path=path)


def load_model(path: Path) -> LoadedModel:
    """A glomscan checkpoint (``.pt``) or ONNX model file (``.onnx``), by its suffix; raises
    CheckpointError with a reason a person can act on."""
    return load_onnx_model(path) if Path(path).suffix.lower() == ".onnx" else load_checkpoint(path)


def load_onnx_model(path: Path) -> LoadedModel:
    """An ONNX model written by ``export-onnx``: card and checkpoint sha256 from its metadata,
    no torch module."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        import onnx
    except ImportError as exc:
        raise CheckpointError(f"{path}: reading ONNX model files needs the onnx package (pip install onnx)") from exc
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable ONNX file: {exc}") from exc
    metadata = {p.key: p.value for p in proto.metadata_props}
    if ONNX_CARD_KEY not in metadata or ONNX_SHA256_KEY not in metadata:
        raise CheckpointError(f"{path} is not a glomscan ONNX model (no {ONNX_CARD_KEY!r} metadata); "
                              "write one with `glomscan export-onnx`")
    card = ModelCard.from_dict(json.loads(metadata[ONNX_CARD_KEY]))
    if card.classes != CLASS_NAMES:
        raise CheckpointError(f"{path}: classes {card.classes} != expected {CLASS_NAMES}")
    return LoadedModel(module=None, card=card, sha256=metadata[ONNX_SHA256_KEY], path=path, onnx_path=path)


def module_from_onnx(path: Path, card: ModelCard) -> "nn.Module":
    """The torch network stored in a glomscan ONNX model file (``export-onnx --model-file``);
    CheckpointError when the file lacks some of its weights (a plain export folds them)."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    module = build_model(card)
    expected = module.state_dict()
    proto = onnx.load(str(path))
    state = {}
    for initializer in proto.graph.initializer:
        name = initializer.name.removesuffix(ONNX_FLOAT16_SUFFIX).removeprefix(ONNX_STATE_PREFIX)
        if name in expected:
            state[name] = torch.from_numpy(np.array(numpy_helper.to_array(initializer))).to(expected[name].dtype)
    omitted = json.loads({p.key: p.value for p in proto.metadata_props}.get(ONNX_OMITTED_KEY, "[]"))
    for name in omitted:  # unused by inference: the freshly built network's values stand
        state.setdefault(name, expected[name])
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path} holds a graph but not the whole network ({len(missing)} weights missing, "
                              f"e.g. {missing[0]}); use the .pt checkpoint, or write the file with "
                              "`glomscan export-onnx --model-file`")
    module.load_state_dict(state, strict=True)
    return module.eval()
