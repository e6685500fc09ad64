"""Training the candidate verifier (the second stage, ``glomscan.verify``) from a prepared set.

Samples are boxes on the patches ``prepare`` wrote, all from the same kind of picture (real
tiles and composites of the same tissue), so that the classifier cannot learn where a picture
came from rather than what it shows:

- **glomeruli**: every outlined instance (connected component of the label mask) with its class
  (1 normal, 2 sclerosed) or ``UNKNOWN_CLASS`` (the tiles' own glomeruli: they supervise
  glomerulus vs not only);
- **mined hard negatives**: what tempts the segmentation model. It is run on the patches (as
  analyze runs it: mirrored to its tile) and every component of max class probability >= a low
  threshold (0.15 by default, far below analyze's 0.5) whose box holds no outlined glomerulus
  pixel is a negative, plus boxes jittered around it (shifted and rescaled, also clear of every
  outline): arteries, arterial walls, fibrous tissue, casts, tissue borders;
- **random tissue boxes** clear of every outline, of glomerulus-like sizes.

Every sample's context (the box framed with a wide margin, ``CONTEXT_MARGIN``) is cut once; each
step samples the framing the network sees (margin 5-30 %, any rotation, flips, a small shift)
with one affine resampling of the whole batch, then jitters the stain in optical density, so
the training set and its augmentation live in one tensor (on the GPU when there is one). Half the
samples are cut from a JPEG (4:2:0) copy of their patch. Loss: cross-entropy over (not,
normal, sclerosed) where the class is known, -log p(glomerulus) for glomeruli of unknown class,
mined negatives weighted by ``hard_negative_weight``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ...atomic import atomic_write_bytes, atomic_write_text
from ...checkpoint import cpu_state, read_checkpoint_file, save_checkpoint_file, sha256_file
from ...postprocess import EIGHT_CONNECTED
from ...progress import Progress
from ...verify import VERIFIER_CARD_KEY, VERIFIER_SHA256_KEY, VerifierCard, candidate_crop
from ..dataset.composite import tissue_map
from ..dataset.data import load_patch
from .harness import TrainingDevice, TrainingRun, choose_training_device, seed_training
from ..dataset.resident import jitter_stain_batch
from .segment import jpeg_roundtrip
from ..settings import VerifierSettings
from ...labels import NORMAL, SCLEROSED, UNKNOWN_CLASS

log = logging.getLogger(__name__)

NOT_GLOMERULUS = 0
SAMPLE_COLUMNS = ["patch_id", "split", "group", "kind", "source", "target", "x0", "y0", "x1", "y1", "weight", "jpeg"]
"""One row per sample: ``source`` outline / mined / mined_jitter / random; ``target`` 0 not a
glomerulus, 1 normal, 2 sclerosed, 3 glomerulus of unknown class; box in patch pixels."""
CONTEXT_MARGIN = 0.35
"""The stored context frames the box with this fraction of its longer side on every side (the
widest framing trained, 30 %, plus room for the shift)."""


# -- samples -----------------------------------------------------------------------------------

def instance_boxes(labels: np.ndarray) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(label, box) of each outlined glomerulus (8-connected component of labels > 0; its label
    the majority of its pixels)."""
    components, n = ndimage.label(labels > 0, structure=EIGHT_CONNECTED)
    out = []
    for i, sl in enumerate(ndimage.find_objects(components), start=1):
        if sl is None:
            continue
        values = labels[sl][components[sl] == i]
        out.append((int(np.bincount(values, minlength=4)[1:].argmax() + 1),
                    (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)))
    return out


def box_is_clear(labels: np.ndarray, box) -> bool:
    """True when the box (x0, y0, x1, y1) holds no outlined glomerulus pixel (and is not empty)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(labels.shape[1], x1), min(labels.shape[0], y1)
    return x1 > x0 and y1 > y0 and not (labels[y0:y1, x0:x1] > 0).any()


def mine_candidates(probabilities: np.ndarray, labels: np.ndarray, threshold: float, min_area_px: float
                    ) -> tuple[list[tuple[int, int, int, int]], int]:
    """Boxes of the components of max class probability >= ``threshold`` (at least
    ``min_area_px``) that hold no outlined glomerulus pixel: what the model is tempted by where
    there is no glomerulus. Returns them and the number of candidates left out because their box
    touches an outline."""
    components, _ = ndimage.label(probabilities.max(axis=0) >= threshold, structure=EIGHT_CONNECTED)
    boxes, touching = [], 0
    for i, sl in enumerate(ndimage.find_objects(components), start=1):
        if sl is None or (components[sl] == i).sum() < min_area_px:
            continue
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        if box_is_clear(labels, box):
            boxes.append(box)
        else:
            touching += 1
    return boxes, touching


def jittered_boxes(box, labels: np.ndarray, n: int, rng: np.random.Generator, tries: int = 20) -> list[tuple]:
    """Up to ``n`` boxes around ``box``: centre shifted by up to 40 % of its size, sides scaled
    0.7-1.4, inside the patch and clear of every outline."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    out = []
    for _ in range(tries):
        if len(out) == n:
            break
        s = rng.uniform(0.7, 1.4, size=2)
        cx = (x0 + x1) / 2 + rng.uniform(-0.4, 0.4) * w
        cy = (y0 + y1) / 2 + rng.uniform(-0.4, 0.4) * h
        nw, nh = max(16, w * s[0]), max(16, h * s[1])
        b = (int(round(cx - nw / 2)), int(round(cy - nh / 2)), int(round(cx + nw / 2)), int(round(cy + nh / 2)))
        if b[0] >= 0 and b[1] >= 0 and b[2] <= labels.shape[1] and b[3] <= labels.shape[0] and box_is_clear(labels, b):
            out.append(b)
    return out


def random_tissue_boxes(image: np.ndarray, labels: np.ndarray, n: int, sides_px: tuple[float, float],
                        rng: np.random.Generator, tries: int = 50) -> list[tuple]:
    """Up to ``n`` boxes of glomerulus-like sides centred on tissue, clear of every outline."""
    tissue = tissue_map(image)
    ys, xs = np.nonzero(tissue)
    out = []
    if ys.size == 0:
        return out
    for _ in range(tries):
        if len(out) == n:
            break
        i = int(rng.integers(ys.size))
        w, h = rng.uniform(*sides_px) * rng.uniform(0.8, 1.25, size=2)
        b = (int(round(xs[i] - w / 2)), int(round(ys[i] - h / 2)), int(round(xs[i] + w / 2)), int(round(ys[i] + h / 2)))
        if b[0] >= 0 and b[1] >= 0 and b[2] <= labels.shape[1] and b[3] <= labels.shape[0] and box_is_clear(labels, b):
            out.append(b)
    return out


def segmentation_probabilities(engine, image: np.ndarray, tile: int) -> np.ndarray:
    """The segmentation model's (C, H, W) probabilities on a patch, seen as analyze sees an image
    smaller than a tile: mirrored past its right and bottom edges to the tile."""
    h, w = image.shape[:2]
    side = max(tile, int(math.ceil(max(h, w) / 32) * 32))
    padded = np.pad(image, ((0, side - h), (0, side - w), (0, 0)), mode="symmetric") if (h, w) != (side, side) else image
    return engine.predict(padded[None])[0][:, :h, :w]


def mine_hard_negatives(engine, dataset_dir: Path, manifest: pd.DataFrame, settings: VerifierSettings,
                        tile: int, quiet: bool = True) -> pd.DataFrame:
    """Mined boxes (one row each: patch_id, split, x0, y0, x1, y1, max_probability) over the
    tiles and up to ``settings.composites_mined_per_tile`` composites per background tile."""
    rows = []
    rng = np.random.default_rng(settings.seed)
    chosen = [manifest[manifest.kind != "composite"]]
    composites = manifest[manifest.kind == "composite"]
    for _, group in composites.groupby(composites.patch_id.str.rsplit("_", n=1).str[-1]):
        k = min(len(group), settings.composites_mined_per_tile)
        chosen.append(group.iloc[np.sort(rng.choice(len(group), size=k, replace=False))])
    todo = pd.concat(chosen)
    touching = 0
    with Progress(len(todo), "mining", quiet=quiet, unit="patch") as progress:
        for row in todo.to_dict("records"):
            image, labels = load_patch(dataset_dir, row)
            probabilities = segmentation_probabilities(engine, image, tile)
            boxes, t = mine_candidates(probabilities, labels, settings.mining_threshold, settings.min_area_px)
            touching += t
            peak = probabilities.max(axis=0)
            for b in boxes:
                rows.append({"patch_id": row["patch_id"], "split": row["split"], "x0": b[0], "y0": b[1], "x1": b[2],
                             "y1": b[3], "max_probability": round(float(peak[b[1]:b[3], b[0]:b[2]].max()), 4)})
            progress.update()
    log.info("mined %d candidates matching no outline on %d patches (%d more touched an outline: left out)",
             len(rows), len(todo), touching)
    return pd.DataFrame(rows, columns=["patch_id", "split", "x0", "y0", "x1", "y1", "max_probability"])


def mine_with_models(models, dataset_dir: Path, manifest: pd.DataFrame, settings: VerifierSettings, backend: str,
                     engine_dir: Path, quiet: bool = True) -> pd.DataFrame:
    """``mine_hard_negatives`` with each segmentation model in turn; a box found by several is
    kept once (the first model's row)."""
    from ...engines import EngineOptions, create_engine

    found = []
    for model in models:
        engine, choice = create_engine(backend, model, EngineOptions(engine_dir=engine_dir))
        log.info("mining with %s on %s (%s)", model.model_id, choice.backend, choice.reason)
        try:
            found.append(mine_hard_negatives(engine, dataset_dir, manifest, settings, model.card.tile, quiet))
        finally:
            engine.close()
    return pd.concat(found).drop_duplicates(subset=["patch_id", "x0", "y0", "x1", "y1"]).reset_index(drop=True)


def build_samples(dataset_dir: Path, manifest: pd.DataFrame, mined: pd.DataFrame, settings: VerifierSettings
                  ) -> tuple[pd.DataFrame, np.ndarray]:
    """The sample table and each sample's context (N, C, C, 3) uint8, C = settings.context_px."""
    rng = np.random.default_rng(settings.seed)
    mined_by_patch = {k: g for k, g in mined.groupby("patch_id")} if len(mined) else {}
    rows, contexts = [], []
    with Progress(len(manifest), "samples", quiet=True, unit="patch") as progress:
        for row in manifest.to_dict("records"):
            image, labels = load_patch(dataset_dir, row)
            jpeg = jpeg_roundtrip(image, int(rng.integers(60, 96)))
            boxes: list[tuple[str, int, tuple, float]] = []
            for label, box in instance_boxes(labels):
                boxes.append(("outline", label, box, 1.0))
            for m in mined_by_patch.get(row["patch_id"], pd.DataFrame()).to_dict("records"):
                box = (m["x0"], m["y0"], m["x1"], m["y1"])
                boxes.append(("mined", NOT_GLOMERULUS, box, settings.hard_negative_weight))
                for b in jittered_boxes(box, labels, settings.mined_jitter, rng):
                    boxes.append(("mined_jitter", NOT_GLOMERULUS, b, settings.hard_negative_weight))
            n_random = settings.random_negatives_per_tile if row["kind"] != "composite" else settings.random_negatives_per_patch
            for b in random_tissue_boxes(image, labels, n_random, settings.random_box_sides_px, rng):
                boxes.append(("random", NOT_GLOMERULUS, b, 1.0))
            for source, target, box, weight in boxes:
                use_jpeg = bool(rng.random() < settings.jpeg_fraction)
                contexts.append(candidate_crop(jpeg if use_jpeg else image, box, CONTEXT_MARGIN, settings.context_px))
                rows.append({"patch_id": row["patch_id"], "split": row["split"], "group": row["slide"],
                             "kind": row["kind"], "source": source, "target": int(target), "x0": box[0],
                             "y0": box[1], "x1": box[2], "y1": box[3], "weight": float(weight), "jpeg": use_jpeg})
            progress.update()
    table = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    return table, (np.stack(contexts) if contexts else np.zeros((0, settings.context_px, settings.context_px, 3), np.uint8))


# -- network and augmentation ------------------------------------------------------------------

def build_verifier_network(n_classes: int = 3) -> nn.Module:
    """ResNet-18 (torchvision), random weights, ``n_classes`` outputs: a plain module, no I/O."""
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=n_classes)


class VerifierProbabilities(nn.Module):
    """What a verifier file computes: softmax over the network's logits."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(x).float(), dim=1)


def framing_scale(margin_fraction: float) -> float:
    """Side of a framing with ``margin_fraction`` relative to the stored context's side."""
    return (1 + 2 * margin_fraction) / (1 + 2 * CONTEXT_MARGIN)


def view_batch(contexts: torch.Tensor, out_px: int, margins: torch.Tensor, angles: torch.Tensor,
               flips: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """(N, 3, C, C) float contexts in [0, 1] -> (N, 3, out, out) views: framing ``margins``
    (fractions of the box), rotation ``angles`` (radians), horizontal ``flips`` (bool) and centre
    ``shifts`` (N, 2, in units of the view's half side), in one bilinear resampling."""
    scale = torch.tensor([framing_scale(float(m)) for m in margins], dtype=contexts.dtype, device=contexts.device)
    cos, sin = torch.cos(angles) * scale, torch.sin(angles) * scale
    flip = torch.where(flips, -1.0, 1.0).to(contexts.dtype)
    theta = torch.stack([torch.stack([cos * flip, -sin, shifts[:, 0] * scale], dim=1),
                         torch.stack([sin * flip, cos, shifts[:, 1] * scale], dim=1)], dim=1)
    grid = F.affine_grid(theta, (contexts.shape[0], 3, out_px, out_px), align_corners=False)
    return F.grid_sample(contexts, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augmented_views(contexts_u8: torch.Tensor, settings: VerifierSettings, generator: torch.Generator,
                    mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A training batch: random framing, rotation, flip, shift and stain of each context, normalised."""
    n, device = contexts_u8.shape[0], contexts_u8.device
    x = contexts_u8.permute(0, 3, 1, 2).float() / 255
    lo, hi = settings.margin_range
    margins = lo + (hi - lo) * torch.rand(n, generator=generator, device=device)
    angles = 2 * math.pi * torch.rand(n, generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    shifts = (torch.rand(n, 2, generator=generator, device=device) - 0.5) * 2 * settings.shift_fraction
    views = view_batch(x, settings.input_px, margins, angles, flips, shifts)
    if settings.stain_jitter > 0:
        views = jitter_stain_batch(views, settings.stain_jitter, generator)
    return (views - mean) / std


def centred_views(contexts_u8: torch.Tensor, card: VerifierCard, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Validation views: the card's framing, no rotation, flip, shift or stain change."""
    n, device = contexts_u8.shape[0], contexts_u8.device
    x = contexts_u8.permute(0, 3, 1, 2).float() / 255
    zeros = torch.zeros(n, device=device)
    views = view_batch(x, card.input_px, torch.full((n,), card.margin_fraction), zeros,
                       torch.zeros(n, dtype=torch.bool, device=device), torch.zeros(n, 2, device=device))
    return (views - mean) / std


def verifier_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of: cross-entropy over (not, normal, sclerosed) where the class is known;
    -log(p_normal + p_sclerosed) for glomeruli of unknown class (``UNKNOWN_CLASS``), which
    supervises glomerulus vs not only and never pushes the class split."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    unknown = targets == UNKNOWN_CLASS
    known_target = torch.where(unknown, torch.zeros_like(targets), targets)
    per_sample = torch.where(unknown, -torch.logsumexp(log_p[:, 1:], dim=1),
                             -log_p.gather(1, known_target[:, None])[:, 0])
    return (per_sample * weights).sum() / weights.sum()


# -- metrics -----------------------------------------------------------------------------------

def verifier_metrics(probabilities: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict:
    """Glomerulus vs not (recall of glomeruli, rejection of negatives, their balanced accuracy)
    and grading (sclerosed sensitivity, specificity, balanced accuracy over glomeruli of known
    class, by the verifier alone); ``selection_score`` is the mean of the two balanced accuracies."""
    p_glomerulus = probabilities[:, 1] + probabilities[:, 2]
    kept = p_glomerulus >= threshold
    positive, negative = targets > 0, targets == 0
    recall = float(kept[positive].mean()) if positive.any() else float("nan")
    rejection = float((~kept[negative]).mean()) if negative.any() else float("nan")
    called_sclerosed = probabilities[:, 2] > probabilities[:, 1]
    sclerosed, normal = targets == SCLEROSED, targets == NORMAL
    sensitivity = float(called_sclerosed[sclerosed].mean()) if sclerosed.any() else float("nan")
    specificity = float((~called_sclerosed[normal]).mean()) if normal.any() else float("nan")
    detection = float(np.nanmean([recall, rejection]))
    grading = float(np.nanmean([sensitivity, specificity]))
    return {"glomerulus_recall": recall, "negative_rejection": rejection, "detection_balanced_accuracy": detection,
            "sclerosed_sensitivity": sensitivity, "sclerosed_specificity": specificity,
            "grading_balanced_accuracy": grading, "selection_score": float(np.nanmean([detection, grading])),
            "n_glomeruli": int(positive.sum()), "n_negatives": int(negative.sum()),
            "n_sclerosed": int(sclerosed.sum()), "n_normal": int(normal.sum())}


@torch.inference_mode()
def predict_contexts(network: nn.Module, contexts: np.ndarray, card: VerifierCard, device, batch_size: int = 128
                     ) -> np.ndarray:
    network.eval()
    mean = torch.tensor(card.mean, device=device.device).view(1, 3, 1, 1)
    std = torch.tensor(card.std, device=device.device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(contexts), batch_size):
        x = torch.from_numpy(contexts[i:i + batch_size]).to(device.device)
        with device.autocast():
            logits = network(device.prepare(centred_views(x, card, mean, std)))
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 3), np.float32)


# -- training ----------------------------------------------------------------------------------

def load_or_build_samples(dataset_dir: Path, out_dir: Path, settings: VerifierSettings, segmentation_model,
                          backend: str = "auto", quiet: bool = True, also_mine_with: tuple = ()
                          ) -> tuple[pd.DataFrame, np.ndarray]:
    """The samples of a prepared set, cached in ``out_dir`` (``mined.csv``, ``samples.csv``,
    ``contexts.npy``) so that a resumed or repeated run does not mine and cut again. Hard
    negatives are mined with ``segmentation_model`` and each model of ``also_mine_with`` (e.g. the
    model it replaces: what fooled one segmentation model is a hard negative for the verifier
    of the next), boxes found by several counted once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path, contexts_path, mined_path = out_dir / "samples.csv", out_dir / "contexts.npy", out_dir / "mined.csv"
    if samples_path.is_file() and contexts_path.is_file():
        return pd.read_csv(samples_path), np.load(contexts_path)
    manifest = pd.read_csv(Path(dataset_dir) / "manifest.csv")
    if mined_path.is_file():
        mined = pd.read_csv(mined_path)
    elif settings.mining_threshold <= 0 or segmentation_model is None:
        mined = pd.DataFrame(columns=["patch_id", "split", "x0", "y0", "x1", "y1", "max_probability"])
    else:
        mined = mine_with_models((segmentation_model, *also_mine_with), Path(dataset_dir), manifest, settings,
                                 backend, out_dir / "engines", quiet)
    atomic_write_text(mined_path, mined.to_csv(index=False))
    table, contexts = build_samples(Path(dataset_dir), manifest, mined, settings)
    np.save(contexts_path, contexts)
    atomic_write_text(samples_path, table.to_csv(index=False))
    return table, contexts


class ResidentSamples:
    """The verifier's samples held on the training device (contexts, targets, weights), cut into
    augmented, normalised views there."""

    def __init__(self, samples: pd.DataFrame, contexts: np.ndarray, settings: VerifierSettings, card: VerifierCard,
                 device: TrainingDevice):
        self.settings, self.device = settings, device
        self.contexts = torch.from_numpy(contexts).to(device.device)
        self.targets = torch.from_numpy(samples.target.to_numpy().copy()).to(device.device)
        self.weights = torch.from_numpy(samples.weight.to_numpy().astype(np.float32)).to(device.device)
        self.mean = torch.tensor(card.mean, device=device.device).view(1, 3, 1, 1)
        self.std = torch.tensor(card.std, device=device.device).view(1, 3, 1, 1)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the samples at ``index`` (augmented with ``generator``), their targets and weights."""
        views = augmented_views(self.contexts[index], self.settings, generator, self.mean, self.std)
        return views, self.targets[index], self.weights[index]


def train_one_epoch(network: nn.Module, optimiser, scheduler, samples: ResidentSamples, train: np.ndarray,
                    epoch: int, steps: int, quiet: bool = False) -> dict:
    """``steps`` steps over a permutation of the training samples ``train`` drawn for ``epoch``
    (views augmented from the same draw), the weighted loss of :func:`verifier_loss`, the
    scheduler stepped per step; returns the mean loss and the rate after the epoch."""
    settings, device = samples.settings, samples.device
    generator = torch.Generator(device=device.device).manual_seed(settings.seed * 1000 + epoch)
    order = torch.from_numpy(train.copy()).to(device.device)[torch.randperm(len(train), generator=generator,
                                                                         device=device.device)]
    network.train()
    losses = []
    with Progress(steps, f"epoch {epoch + 1}/{settings.epochs}", quiet=quiet, unit="step") as progress:
        for step in range(steps):
            x, targets, weights = samples.batch(order[step * settings.batch_size:(step + 1) * settings.batch_size],
                                                generator)
            optimiser.zero_grad(set_to_none=True)
            with device.autocast():
                logits = network(device.prepare(x))
            loss = verifier_loss(logits, targets, weights)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            progress.update()
    return {"train_loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"]}


def validate(network: nn.Module, contexts: np.ndarray, targets: np.ndarray, card: VerifierCard,
             device: TrainingDevice) -> dict:
    """:func:`verifier_metrics` of the network's predictions on held-out samples."""
    return verifier_metrics(predict_contexts(network, contexts, card, device), targets)


def train_verifier(samples: pd.DataFrame, contexts: np.ndarray, out_path: Path, settings: VerifierSettings,
                   card: VerifierCard, quiet: bool = False) -> dict:
    """Train on the samples of split ``train``, validate on ``val`` every epoch, keep the best
    (``selection_score``) as ``out_path`` (a torch state with the card) and resume from
    ``<out>.last.pt``. Returns the best epoch's validation metrics."""
    out_path = Path(out_path)
    train = samples.index[samples.split == "train"].to_numpy()
    val = samples.index[samples.split == "val"].to_numpy()
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"need samples in both splits (train {len(train)}, val {len(val)})")
    seed_training(settings.seed)
    device = choose_training_device(settings.precision, device=settings.device)
    log.info("training the verifier on %s: %d train / %d val samples", device.reason, len(train), len(val))
    network = build_verifier_network().to(device.device)
    if device.channels_last:
        network.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(train) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.lr, epochs=settings.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.15)
    run = TrainingRun(out_path, {"network": network, "optimiser": optimiser, "scheduler": scheduler},
                      architecture={"network": "resnet18", "input_px": settings.input_px, "epochs": settings.epochs,
                                    "batch_size": settings.batch_size})
    resumed = run.resume()
    best_score, best = resumed.get("best_score", -1.0), resumed.get("best", {})
    resident = ResidentSamples(samples, contexts, settings, card, device)  # augmentation runs there too
    for epoch in range(run.start_epoch, settings.epochs):
        t0 = time.perf_counter()
        trained = train_one_epoch(network, optimiser, scheduler, resident, train, epoch, steps_per_epoch, quiet)
        val_metrics = validate(network, contexts[val], samples.target.to_numpy()[val], card, device)
        metrics = {**trained, "seconds": round(time.perf_counter() - t0, 1),
                   **{f"val_{k}": v for k, v in val_metrics.items()}}
        log.info("epoch %d: loss %.4f, val glomerulus recall %.3f, negatives rejected %.3f, grading balanced "
                 "accuracy %.3f", epoch + 1, metrics["train_loss"], val_metrics["glomerulus_recall"],
                 val_metrics["negative_rejection"], val_metrics["grading_balanced_accuracy"])
        if val_metrics["selection_score"] > best_score:
            best_score, best = val_metrics["selection_score"], {"epoch": epoch + 1, **val_metrics}
            save_verifier_state(out_path, network, replace(card, metrics={"validation_samples": best}))
        run.end_epoch(epoch, metrics, best_score=best_score, best=best, config=_plain(asdict(settings)))
    return best


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def save_verifier_state(path: Path, network: nn.Module, card: VerifierCard) -> None:
    save_checkpoint_file(path, "verifier", asdict(card), cpu_state(network.state_dict()))


def load_verifier_state(path: Path) -> tuple[nn.Module, VerifierCard]:
    saved = read_checkpoint_file(path, "verifier")
    network = build_verifier_network()
    network.load_state_dict(saved.state_dict)
    return network.eval(), VerifierCard.from_dict(saved.card)


def export_verifier(network: nn.Module, card: VerifierCard, out_path: Path, sha256: str) -> Path:
    """Write the verifier file (ONNX, softmax output, the card and ``sha256`` in its metadata)
    atomically. Its weights are rounded to float16 and stored so (half the size, computed in
    float32), as the segmentation model file's."""
    import copy

    import onnx

    from ...engines.onnx import store_weights_as_float16

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rounded = copy.deepcopy(network).eval().cpu().float().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        for tensor in rounded.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    wrapped = VerifierProbabilities(rounded)
    sample = torch.zeros(1, 3, card.input_px, card.input_px)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (sample,), buffer, input_names=["crops"], output_names=["probabilities"],
                          opset_version=17, dynamo=False, do_constant_folding=False,
                          dynamic_axes={"crops": {0: "batch"}, "probabilities": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    store_weights_as_float16(proto)
    for key, value in ((VERIFIER_CARD_KEY, card.to_json()), (VERIFIER_SHA256_KEY, sha256)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    atomic_write_bytes(out_path, proto.SerializeToString())
    return out_path


def make_verifier(dataset_dir: Path, out_dir: Path, segmentation_model, settings: VerifierSettings,
                  card: VerifierCard, backend: str = "auto", held_out_groups: tuple[str, ...] = (),
                  quiet: bool = False, samples_dir: Path | None = None, also_mine_with: tuple = ()
                  ) -> tuple[Path, dict]:
    """Samples (mined with ``segmentation_model``; cached in ``samples_dir``, by default
    ``out_dir``), training and the verifier file ``out_dir/verifier.onnx``; returns its path and
    the best validation metrics. Patches of ``held_out_groups`` (tile groups) are left out of
    training and validation (cross-validation folds score them afterwards)."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, contexts = load_or_build_samples(Path(dataset_dir), Path(samples_dir or out_dir), settings,
                                              segmentation_model, backend, quiet, also_mine_with)
    keep = ~samples.group.isin(held_out_groups)
    if not settings.hard_negatives:
        keep &= ~samples.source.isin(("mined", "mined_jitter"))
    if not keep.all():
        samples, contexts = samples[keep].reset_index(drop=True), contexts[keep.to_numpy()]
    card = replace(card, input_px=settings.input_px,
                   segmentation_model=card.segmentation_model or getattr(segmentation_model, "model_id", ""))
    state_path = out_dir / "verifier.pt"
    best = train_verifier(samples, contexts, state_path, settings, card, quiet)
    network, saved_card = load_verifier_state(state_path)
    sources = samples.groupby(["split", "source"]).size().to_dict()
    saved_card = replace(saved_card, metrics={**saved_card.metrics,
                                              "samples": {f"{k[0]} {k[1]}": int(v) for k, v in sources.items()}})
    path = export_verifier(network, saved_card, out_dir / "verifier.onnx", sha256_file(state_path))
    return path, best
