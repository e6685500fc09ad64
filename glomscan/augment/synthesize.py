"""Synthetic sclerosed glomeruli pasted into training patches by inpainting (issue #5, step 6).

For each synthetic glomerulus: a generated mask (``glomscan augment masks``), a training
patch, and a crop position where the whole mask lies on tissue and at least
``min_distance_px`` away from every labelled glomerulus (real or synthetic). The crop's
gapped image ``X * (1 - mask)`` goes through the inpainting generator, the result is pasted
back only inside the mask (optionally feathered inwards from its border) and the mask's pixels
become label 2 (sclerosed).

Tissue here is a fixed, documented threshold at patch resolution: HSV saturation above
``TissueSettings.min_saturation`` (0.05, the floor of the slide-level detector: blank glass
stays below it) and not black, closed and hole-filled. The slide-level Otsu threshold is not
used because a patch can be all tissue, where Otsu splits the tissue itself.

The output is a full dataset: every original patch (hard-linked, or copied where links are
impossible; never modified; the folder is written as ``.<name>.partial`` beside it and renamed
when complete) plus one new patch per source patch that received glomeruli
(``<patch_id>_syn``; ``synthetic`` True, split "train"), ``synthesis.csv`` (one row per
synthetic glomerulus) and ``examples.png`` (before | after | mask).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.signal import fftconvolve

from ..config import TissueSettings
from ..imaging import dihedral, equivalent_diameter, saturated_pixels, write_png
from ..labels import NORMAL, SCLEROSED
from .crops import sclerosed_census, training_rows
from ..train.dataset.data import MANIFEST_COLUMNS, load_patch
from .settings import SynthesisSettings

log = logging.getLogger(__name__)


class SynthesisError(ValueError):
    pass


@dataclass
class Placement:
    index: int
    source_patch: str
    x0: int
    y0: int
    """Crop origin in the patch."""
    mask_index: int
    area_px: int
    mask: np.ndarray = field(repr=False)
    before: np.ndarray | None = field(default=None, repr=False)
    after: np.ndarray | None = field(default=None, repr=False)
    """The crop before and after pasting: kept for the placements shown in examples.png only."""


@dataclass
class PatchCanvas:
    """A training patch receiving synthetic glomeruli: its pixels and labels (painted in
    place) and where the next glomerulus may not go."""

    image: np.ndarray
    labels: np.ndarray
    off_tissue: np.ndarray
    min_distance_px: float
    forbidden: np.ndarray = field(init=False, repr=False)
    touched: bool = False

    def __post_init__(self) -> None:
        self._update_forbidden()

    def _update_forbidden(self) -> None:
        """Off tissue, or within min_distance_px of a labelled glomerulus (real or synthetic)."""
        self.forbidden = self.off_tissue | near_glomeruli(self.labels, self.min_distance_px)

    def paint(self, window: tuple[slice, slice], pixels: np.ndarray, mask: np.ndarray) -> None:
        """Put the composited crop in ``window`` and label the mask sclerosed."""
        self.image[window] = pixels
        self.labels[window][mask] = SCLEROSED
        self.touched = True
        self._update_forbidden()


@dataclass
class SynthesisSummary:
    real_sclerosed: int
    placements: list[Placement]
    manifest: pd.DataFrame
    examples_path: Path


def patch_tissue(image: np.ndarray, min_saturation: float = TissueSettings.min_saturation) -> np.ndarray:
    """Tissue pixels of a patch (see module doc)."""
    tissue = saturated_pixels(image, min_saturation)
    tissue = ndimage.binary_closing(tissue, structure=np.ones((3, 3)), iterations=2, border_value=1)
    return ndimage.binary_fill_holes(tissue)


def near_glomeruli(labels: np.ndarray, min_distance_px: float) -> np.ndarray:
    """Pixels within min_distance_px (Euclidean) of a labelled glomerulus, the glomeruli included."""
    glomeruli = labels > 0
    if min_distance_px <= 0 or not glomeruli.any():
        return glomeruli
    return ndimage.distance_transform_edt(~glomeruli) <= min_distance_px


def candidate_origins(forbidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """bool (H - S + 1, W - S + 1): True where a crop of side S at that origin puts no mask
    pixel on a forbidden pixel."""
    s = mask.shape[0]
    h, w = forbidden.shape
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    part = mask[r0:r1, c0:c1].astype(np.float32)
    # hits[y, x] = forbidden pixels under the mask's bounding part placed at (y, x)
    hits = fftconvolve(forbidden.astype(np.float32), part[::-1, ::-1], mode="valid")
    ok = hits < 0.5
    # part at (y, x) <=> crop origin (y - r0, x - c0), which must stay within the patch
    return ok[r0:r0 + h - s + 1, c0:c0 + w - s + 1]


def feather_weights(mask: np.ndarray, feather_px: float) -> np.ndarray:
    """Paste weight per pixel: 0 outside the mask; inside min(1, distance to the outside /
    feather_px) (1 everywhere inside when feather_px is 0)."""
    if feather_px <= 0:
        return mask.astype(np.float32)
    return np.clip(ndimage.distance_transform_edt(mask) / feather_px, 0, 1).astype(np.float32) * mask


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, feather_px: float = 0.0) -> np.ndarray:
    """The original with the generated pixels pasted inside the mask only."""
    w = feather_weights(mask, feather_px)[..., None]
    out = original.astype(np.float32) * (1 - w) + generated.astype(np.float32) * w
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    out[~mask] = original[~mask]  # bit-exact outside
    return out


def inpaint_crop(inpainter: Callable, crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The inpainter's reconstruction of ``X_gap = X * (1 - mask)`` at the crop's size. The
    inpainter takes crops of any side: ``Inpainter`` resizes to the size it was trained at (the
    hole never shrinks) and its output back."""
    gap = crop * (~mask)[..., None]
    out = np.asarray(inpainter(gap[None], mask[None])[0], np.uint8)
    if out.shape != crop.shape:
        raise ValueError(f"the inpainter returned {out.shape} for a {crop.shape} crop")
    return out


def _prepare_output(dataset_dir: Path, out_dir: Path, create: bool = True) -> None:
    if out_dir.resolve() == dataset_dir.resolve():
        raise SynthesisError("the output folder must differ from the dataset (originals are never modified)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SynthesisError(f"{out_dir} exists and is not empty; choose a new folder")
    if not create:
        return
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def synthesize(dataset_dir: Path, out_dir: Path, inpainter: Callable, masks: list[np.ndarray],
               settings: SynthesisSettings = SynthesisSettings()) -> SynthesisSummary:
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if not masks:
        raise SynthesisError("no glomerulus masks given (make them with 'glomscan augment masks')")
    size = masks[0].shape[0]
    if any(m.shape != (size, size) or not m.any() for m in masks):
        raise SynthesisError("masks must be non-empty, square and all the same size")
    if settings.amount < 0:
        raise SynthesisError("--amount must not be negative")
    manifest = pd.read_csv(dataset_dir / "manifest.csv", dtype={"patch_id": str, "slide": str})
    census = sclerosed_census(dataset_dir, manifest, "train")
    if census.total == 0:
        raise SynthesisError(f"{dataset_dir}: no sclerosed glomeruli in the training patches, so --amount has "
                             "nothing to be relative to")
    count = round(settings.amount * census.total)
    if count == 0:
        raise SynthesisError(f"--amount {settings.amount} x {census.total} real sclerosed glomeruli rounds to 0")
    sources = training_rows(manifest, "train")
    sources = sources[sources.tile >= size] if "tile" in sources else sources
    if sources.empty:
        raise SynthesisError(f"{dataset_dir}: no training patches of at least {size} px")
    _prepare_output(dataset_dir, out_dir, create=False)  # refuse early; create only once all fits
    rng = np.random.default_rng(settings.seed)
    rows_by_id = {str(r.patch_id): r for _, r in sources.iterrows()}
    patch_ids = sorted(rows_by_id)
    work: dict[str, PatchCanvas] = {}
    placements: list[Placement] = []
    shapes = []
    for i in range(count):
        mask_index = i % len(masks)
        mask = masks[mask_index]
        if i >= len(masks):  # reused shape: a random flip/rotation
            k = int(rng.integers(4))
            mask = np.ascontiguousarray(dihedral(mask, k, rng.random() < 0.5))
        shapes.append((i, mask_index, mask))
    # largest first: big glomeruli find room while the patches are empty, small ones fill the gaps
    shapes.sort(key=lambda shape: -int(shape[2].sum()))
    for i, mask_index, mask in shapes:
        for patch_id in rng.permutation(patch_ids):
            if patch_id not in work:
                image, labels = (np.array(a) for a in load_patch(dataset_dir, rows_by_id[patch_id]))
                work[patch_id] = PatchCanvas(image, labels, ~patch_tissue(image, settings.min_saturation),
                                             settings.min_distance_px)
            canvas = work[patch_id]
            ok = candidate_origins(canvas.forbidden, mask)
            if ok.any():
                break
        else:
            raise SynthesisError(
                f"no position fits synthetic glomerulus {i + 1} of {count} (equivalent diameter "
                f"{equivalent_diameter(mask.sum()):.0f} px) in any of the {len(patch_ids)} training patches: it must lie "
                f"on tissue and {settings.min_distance_px} px from every glomerulus (lower --amount or --min-distance-px)")
        ys, xs = np.nonzero(ok)
        k = int(rng.integers(len(ys)))
        y0, x0 = int(ys[k]), int(xs[k])
        window = (slice(y0, y0 + size), slice(x0, x0 + size))
        before = canvas.image[window].copy()
        after = composite(before, inpaint_crop(inpainter, before, mask), mask, settings.feather_px)
        canvas.paint(window, after, mask)
        shown = len(placements) < settings.examples
        placements.append(Placement(i, patch_id, x0, y0, mask_index, int(mask.sum()), mask,
                                    before if shown else None, after if shown else None))
    # written into a hidden sibling folder and renamed when complete: never a half dataset
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    _prepare_output(dataset_dir, partial)
    rows = _write_dataset(dataset_dir, partial, manifest, rows_by_id, work, placements)
    write_examples(partial / "examples.png", placements[: settings.examples])
    if out_dir.exists():
        out_dir.rmdir()  # checked empty above
    partial.rename(out_dir)
    return SynthesisSummary(census.total, placements, rows, out_dir / "examples.png")


def _write_dataset(dataset_dir: Path, out_dir: Path, manifest: pd.DataFrame, rows_by_id: dict,
                   work: dict[str, PatchCanvas], placements: list[Placement]) -> pd.DataFrame:
    for _, row in manifest.iterrows():
        _link_or_copy(dataset_dir / row["image"], out_dir / row["image"])
        _link_or_copy(dataset_dir / row["mask"], out_dir / row["mask"])
    existing = set(manifest.patch_id.astype(str))
    new_rows, new_ids = [], {}
    per_patch = Counter(p.source_patch for p in placements)
    for patch_id, canvas in sorted(work.items()):
        if not canvas.touched:
            continue
        image, labels = canvas.image, canvas.labels
        new_id = f"{patch_id}_syn"
        while new_id in existing:
            new_id += "x"
        existing.add(new_id)
        new_ids[patch_id] = new_id
        write_png(out_dir / "images" / f"{new_id}.png", image)
        write_png(out_dir / "masks" / f"{new_id}.png", labels)
        src = rows_by_id[patch_id]
        row = {c: src[c] for c in MANIFEST_COLUMNS if c in src}
        row.update(patch_id=new_id, split="train", synthetic=True, n_normal_px=int((labels == NORMAL).sum()),
                   n_sclerosed_px=int((labels == SCLEROSED).sum()), image=f"images/{new_id}.png", mask=f"masks/{new_id}.png")
        row["source_patch"] = patch_id
        row["n_synthetic_glomeruli"] = per_patch[patch_id]
        new_rows.append(row)
    columns = list(manifest.columns) + [c for c in ("source_patch", "n_synthetic_glomeruli") if c not in manifest]
    out = pd.concat([manifest, pd.DataFrame(new_rows)], ignore_index=True)[columns]
    out.to_csv(out_dir / "manifest.csv", index=False)
    pd.DataFrame([{"glomerulus": p.index + 1, "patch_id": new_ids[p.source_patch], "source_patch": p.source_patch,
                   "crop_x0": p.x0, "crop_y0": p.y0, "mask": p.mask_index, "area_px": p.area_px,
                   "equivalent_diameter_px": round(equivalent_diameter(p.area_px), 2)} for p in placements]
                 ).to_csv(out_dir / "synthesis.csv", index=False)
    return out


def write_examples(path: Path, placements: list[Placement], gap: int = 4) -> Path:
    """One row per placement: crop before | after | mask (white), 4 px white gaps."""
    if not placements:
        return path
    s = placements[0].mask.shape[0]
    grid = np.full((len(placements) * (s + gap) - gap, 3 * s + 2 * gap, 3), 255, np.uint8)
    for r, p in enumerate(placements):
        y = r * (s + gap)
        grid[y:y + s, :s] = p.before
        grid[y:y + s, s + gap:2 * s + gap] = p.after
        grid[y:y + s, 2 * (s + gap):] = (p.mask[..., None] * 255).astype(np.uint8)
    write_png(path, grid)
    return path
