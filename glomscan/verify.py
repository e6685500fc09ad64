"""The second stage: a candidate verifier that checks and grades every glomerulus candidate.

The segmentation model proposes candidates (connected components of its glomerulus mask); on
real tissue some are arteries, arterial walls, fibrous tissue or casts. The verifier is a small
classifier that sees a square crop framed on each candidate's box (the box plus a margin on
every side, resized to a fixed side) and gives three probabilities: not a glomerulus, normal,
globally sclerosed. ``postprocess.glomerulus_class`` turns them, with the segmentation's own
class means, into the one decision: rejected, normal or sclerosed.

A verifier file is an ONNX graph (input ``crops``: N x 3 x S x S float, normalised; output
``probabilities``: N x 3 softmax) with its card in the metadata. It runs through ONNX Runtime on
the CPU whatever the segmentation backend (a few dozen crops per slide), so analysis needs no
torch. ``glomscan train verifier`` makes one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .model import CARD_VERSION

VERIFIER_CLASSES = ("not_glomerulus", "normal", "sclerosed")
"""Output columns of a verifier, in order."""
VERIFIER_OUTPUTS = ("(N, 3) probabilities summing to 1 (a softmax) over classes for each candidate's crop: "
                    "not a glomerulus, normal glomerulus, globally sclerosed glomerulus")
VERIFIER_CARD_KEY = "glomscan.verifier_card"
VERIFIER_SHA256_KEY = "glomscan.verifier_sha256"
"""ONNX metadata of a verifier file: its card (JSON) and the sha256 of the weights it was exported from."""
MIN_CROP_SIDE_PX = 32
"""A candidate's crop is at least this many analysis pixels on a side (tiny boxes)."""


class VerifierError(Exception):
    """The verifier file is missing or is not a usable glomscan verifier."""


@dataclass(frozen=True)
class VerifierCard:
    name: str
    input_px: int = 128
    """Side of the square crop the network sees, pixels."""
    margin_fraction: float = 0.175
    """The crop frames the candidate's box with this fraction of its longer side on every side."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    classes: tuple[str, ...] = VERIFIER_CLASSES
    min_glomerulus_probability: float = 0.5
    """A candidate is kept when p_normal + p_sclerosed >= this."""
    grading_weight: float = 1.0
    """Weight of the verifier's sclerosed share in the class decision; 1 - it goes to the
    segmentation's (``postprocess.glomerulus_class``). Chosen on validation crops."""
    segmentation_model: str = ""
    """Model id of the segmentation model whose candidates it was trained on."""
    trained_on: str = ""
    intended_use: str = "research use only; not a medical device"
    licence: str = ""
    notes: str = ""
    metrics: dict = field(default_factory=dict)
    card_version: int = CARD_VERSION
    """Version of this card's keys (``model.CARD_VERSION``; 1 for a stored card without the key)."""
    outputs: str = VERIFIER_OUTPUTS
    """What the network's outputs mean."""

    @classmethod
    def from_dict(cls, d: dict) -> "VerifierCard":
        from .model import card_fields

        return cls(**card_fields(cls, d, ("mean", "std", "classes")))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def crop_square(bbox: tuple[float, float, float, float], margin_fraction: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop framing ``bbox`` (x0, y0, x1, y1; exclusive end) with
    ``margin_fraction`` of its longer side on every side, centred on the box."""
    x0, y0, x1, y1 = bbox
    side = max(MIN_CROP_SIDE_PX, int(math.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * margin_fraction))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2)), side


def mirrored_region(array: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """``side`` x ``side`` pixels of an (H, W, 3) image from (x0, y0), mirrored past its edges
    (as ``TileReader`` mirrors tiles)."""
    h, w = array.shape[:2]
    a0, b0 = max(0, x0), max(0, y0)
    a1, b1 = min(w, x0 + side), min(h, y0 + side)
    if a1 <= a0 or b1 <= b0:
        return np.full((side, side, 3), 255, np.uint8)
    block = array[b0:b1, a0:a1, :3]
    pad = ((b0 - y0, y0 + side - b1), (a0 - x0, x0 + side - a1), (0, 0))
    if any(p > 0 for pair in pad[:2] for p in pair):
        block = np.pad(block, pad, mode="symmetric")
        if block.shape[:2] != (side, side):  # mirrored more than once over a tiny image
            block = np.pad(block, ((0, side - block.shape[0]), (0, side - block.shape[1]), (0, 0)), mode="wrap")
    return np.ascontiguousarray(block[:side, :side])


def resize_square(region: np.ndarray, size: int) -> np.ndarray:
    """A square uint8 RGB region resized to ``size`` x ``size`` (libvips: area-averaging when
    shrinking, bilinear when enlarging)."""
    import pyvips

    from .imaging import image_to_array

    side = region.shape[0]
    if side == size:
        return region
    image = pyvips.Image.new_from_array(np.ascontiguousarray(region), interpretation="srgb")
    scale = size / side
    resized = image.resize(scale, kernel="linear") if scale > 1 else image.resize(scale)
    out = image_to_array(resized)[..., :3]
    if out.shape[:2] != (size, size):  # rounding: at most a pixel
        out = np.pad(out, ((0, max(0, size - out.shape[0])), (0, max(0, size - out.shape[1])), (0, 0)),
                     mode="edge")[:size, :size]
    return np.ascontiguousarray(out)


def candidate_crop(image: np.ndarray, bbox, margin_fraction: float, size: int) -> np.ndarray:
    """The crop the verifier sees for a candidate with box ``bbox`` in ``image`` (H, W, 3): the
    framing square (``crop_square``), mirrored past the edges, resized to ``size``. Training and
    analysis crop through this function."""
    x0, y0, side = crop_square(bbox, margin_fraction)
    return resize_square(mirrored_region(image, x0, y0, side), size)


def read_candidate_crop(image, bbox, margin_fraction: float, size: int) -> np.ndarray:
    """``candidate_crop`` of a lazy pyvips image (the slide at the analysis resolution, 8-bit
    RGB): only the framing square is read."""
    from .imaging import image_to_array

    x0, y0, side = crop_square(bbox, margin_fraction)
    a0, b0 = max(0, x0), max(0, y0)
    a1, b1 = min(image.width, x0 + side), min(image.height, y0 + side)
    if a1 <= a0 or b1 <= b0:
        return resize_square(np.full((side, side, 3), 255, np.uint8), size)
    # the block's edges inside the square are the image's edges: mirroring at them is mirroring
    # at the image's
    block = image_to_array(image.crop(a0, b0, a1 - a0, b1 - b0))[..., :3]
    return resize_square(mirrored_region(block, x0 - a0, y0 - b0, side), size)


def normalise_crops(crops: np.ndarray, card: VerifierCard) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 with the card's normalisation."""
    mean = np.asarray(card.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(card.std, np.float32).reshape(1, 3, 1, 1)
    return (crops.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std


class Verifier:
    """A verifier file, run through ONNX Runtime on the CPU (the session is made on first use
    and not pickled, so a Verifier travels to Dask workers as its path and card)."""

    def __init__(self, path: Path, card: VerifierCard, sha256: str):
        self.path, self.card, self.sha256 = Path(path), card, sha256
        self._session = None

    @property
    def model_id(self) -> str:
        return f"{self.card.name}@{self.sha256[:12]}"

    def __getstate__(self):
        return {"path": self.path, "card": self.card, "sha256": self.sha256, "_session": None}

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._session is None:
            self._session = _cpu_session(self.path)
        name = self._session.get_inputs()[0].name
        return self._session.run(None, {name: x})[0]

    def probabilities(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, S, S, 3) uint8 crops -> (N, 3) probabilities (not glomerulus, normal, sclerosed)."""
        if len(crops) == 0:
            return np.zeros((0, len(self.card.classes)), np.float32)
        out = [self._run(normalise_crops(crops[i:i + batch_size], self.card)) for i in range(0, len(crops), batch_size)]
        return np.concatenate(out).astype(np.float32)


def _cpu_session(path: Path):
    """An ONNX Runtime session of a verifier file on the CPU (quiet about graph rewrites)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_verifier(path: Path) -> Verifier:
    """A verifier file written by ``glomscan train verifier``; VerifierError with a reason a
    person can act on."""
    path = Path(path)
    if not path.is_file():
        raise VerifierError(f"verifier file not found: {path}")
    try:
        import onnxruntime  # noqa: F401  (a clear message when it is missing)
    except ImportError as exc:
        raise VerifierError("the candidate verifier runs through ONNX Runtime: pip install onnxruntime "
                            "(or analyse with --no-verifier)") from exc
    try:
        session = _cpu_session(path)
    except Exception as exc:  # onnxruntime raises its own kinds for a damaged file
        raise VerifierError(f"{path} is not a readable ONNX file: {exc}") from exc
    metadata = session.get_modelmeta().custom_metadata_map
    if VERIFIER_CARD_KEY not in metadata or VERIFIER_SHA256_KEY not in metadata:
        raise VerifierError(f"{path} is not a glomscan verifier (no {VERIFIER_CARD_KEY!r} metadata); "
                            "write one with `glomscan train verifier`")
    card = VerifierCard.from_dict(json.loads(metadata[VERIFIER_CARD_KEY]))
    if card.classes != VERIFIER_CLASSES:
        raise VerifierError(f"{path}: classes {card.classes} != expected {VERIFIER_CLASSES}")
    verifier = Verifier(path, card, metadata[VERIFIER_SHA256_KEY])
    verifier._session = session
    return verifier


def verify_glomeruli(instances: list, image, verifier: Verifier) -> tuple[list, list]:
    """Run the verifier on every candidate of a slide (``image``: the slide at the analysis
    resolution, 8-bit RGB pyvips image) and decide each through ``postprocess.glomerulus_class``.
    Returns (accepted, rejected), both renumbered: accepted 1..n, rejected n+1..n+r, so ids stay
    unique across the glomeruli and the rejected candidates. Each candidate gets its verifier
    probabilities; accepted ones their (possibly changed) class; rejected ones keep the class
    they would have without the verifier's veto (the class a reviewer restores them to)."""
    from dataclasses import replace

    from .postprocess import REJECTED, glomerulus_class

    card = verifier.card
    if not instances:
        return [], []
    crops = np.stack([read_candidate_crop(image, g.bbox, card.margin_fraction, card.input_px) for g in instances])
    probabilities = verifier.probabilities(crops)
    accepted, rejected = [], []
    class_names = ("normal", "sclerosed")
    for g, p in zip(instances, probabilities):
        p = tuple(round(float(v), 6) for v in p)
        cls = glomerulus_class(g.mean_probabilities, p, card.min_glomerulus_probability, card.grading_weight)
        if cls == REJECTED:
            would_be = glomerulus_class(g.mean_probabilities, p, 0.0, card.grading_weight)
            rejected.append(replace(g, verifier_probabilities=p, rejected=True, label=would_be + 1,
                                    class_name=class_names[would_be], probability=g.mean_probabilities[would_be]))
        else:
            accepted.append(replace(g, verifier_probabilities=p, label=cls + 1, class_name=class_names[cls],
                                    probability=g.mean_probabilities[cls]))
    accepted = [replace(g, id=i) for i, g in enumerate(accepted, start=1)]
    rejected = [replace(g, id=len(accepted) + i) for i, g in enumerate(rejected, start=1)]
    return accepted, rejected


def edit_verifier_card(path: Path, out_path: Path, edits: dict, validation: dict | None = None) -> VerifierCard:
    """Rewrite a verifier file with its card edited (``edits`` replaces fields, None values are
    ignored; ``validation``, e.g. metrics of ``evaluate real``, goes under the card's metrics).
    The weights and their sha256 stay as they are."""
    from dataclasses import replace

    import onnx

    from .atomic import atomic_write_bytes

    verifier = load_verifier(path)
    card = replace(verifier.card, **{k: v for k, v in edits.items() if v is not None})
    if validation is not None:
        card = replace(card, metrics={**card.metrics, "validation": validation})
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == VERIFIER_CARD_KEY:
            entry.value = card.to_json()
    atomic_write_bytes(Path(out_path), proto.SerializeToString())
    return card
