"""Annotation kinds other than whole annotated slides, read by ``prepare``.

**Tile sets** (``--tiles DIR``): ROI or tile images with a binary glomerulus mask and no class,
``DIR/images/<name>.png`` + ``DIR/masks/<name>.png``. A mask pixel counts as glomerulus when it
is bright (grey > 127) or red (R > 127, G < 100: the AIDPATH/Kaggle colouring); such pixels
become label ``UNKNOWN_CLASS`` ("glomerulus, class unknown"), which supervises only
glomerulus-vs-background in training. Tiles carry no slide id: tiles with nearby numeric ids
come from the same slide in the usual tilings, so tiles are grouped by id (a gap of at most
``TILE_GROUP_GAP`` keeps two ids in one group) and the split keeps each group whole.

**Glomerulus crop sets** (``--crops DIR``): ``DIR/labels.csv`` with columns ``image``, ``slide``
and ``globally_sclerosed`` (1/0) (or ``class``: normal/sclerosed), the crop in
``DIR/images/<image>`` and its outline in ``DIR/masks/<image>`` (grey > 127). The split is by
slide. Crops are composited into the tile set's tissue (see ``composite.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips

from ...imaging import equivalent_diameter
from ...labels import LABEL_OF_CLASS, NORMAL, SCLEROSED, UNKNOWN_CLASS
from ...imaging import image_to_array

TILE_GROUP_GAP = 5
"""Tiles whose numeric ids differ by at most this belong to one group (likely one slide)."""


class SourceError(Exception):
    """An annotation folder is missing files or has an unreadable layout."""


@dataclass(frozen=True)
class AnnotatedTile:
    name: str
    group: str
    image: np.ndarray
    """uint8 RGB at the analysis resolution."""
    labels: np.ndarray
    """uint8: 0 background, UNKNOWN_CLASS glomerulus."""


@dataclass(frozen=True)
class GlomerulusCrop:
    name: str
    slide: str
    label: int
    """1 normal, 2 sclerosed."""
    image: np.ndarray
    """uint8 RGB crop as stored (any scale)."""
    outline: np.ndarray
    """bool, same size: inside the glomerulus."""

    @property
    def equivalent_diameter_px(self) -> float:
        return equivalent_diameter(float(self.outline.sum()))


def glomerulus_mask(mask_rgb: np.ndarray) -> np.ndarray:
    """Binary glomerulus mask from a mask image: grey > 127, or red (R > 127, G < 100)."""
    if mask_rgb.ndim == 2 or mask_rgb.shape[2] == 1:
        return (mask_rgb.reshape(mask_rgb.shape[:2]) > 127)
    r, g, b = (mask_rgb[..., i].astype(np.int16) for i in range(3))
    grey = (r > 127) & (g > 127) & (b > 127)
    red = (r > 127) & (g < 100)
    return grey | red


def _read(path: Path) -> np.ndarray:
    return image_to_array(pyvips.Image.new_from_file(str(path), access="sequential"))


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def resize_rgb(image: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-6:
        return image
    vips = pyvips.Image.new_from_array(np.ascontiguousarray(image), interpretation="srgb")
    return image_to_array(vips.resize(scale, kernel="linear" if scale < 1 else "cubic"))[..., :3]


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary mask resampled to ``shape`` (h, w) by linear interpolation of its coverage."""
    vips = pyvips.Image.new_from_array(np.ascontiguousarray(mask.astype(np.uint8) * 255))
    out = vips.resize(shape[1] / mask.shape[1], vscale=shape[0] / mask.shape[0], kernel="linear")
    return image_to_array(out)[..., 0][: shape[0], : shape[1]] > 127


def tile_groups(names: list[str], gap: int = TILE_GROUP_GAP) -> dict[str, str]:
    """Tile name -> group. Names with a number are chained while consecutive numbers differ by
    at most ``gap``; a name without a number is its own group."""
    numbered = sorted((int(m.group()), n) for n in names if (m := re.search(r"\d+", n)))
    groups: dict[str, str] = {}
    previous, current = None, None
    for number, name in numbered:
        if previous is None or number - previous > gap:
            current = f"tiles-{number}"
        groups[name] = current
        previous = number
    for name in names:
        groups.setdefault(name, f"tiles-{name}")
    return groups


def read_tile_set(folder: Path, tile_mpp: float, analysis_mpp: float) -> list[AnnotatedTile]:
    """Every ``images/<name>`` with its ``masks/<name>``, resampled to the analysis resolution."""
    folder = Path(folder)
    images = sorted(p for p in (folder / "images").glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    if not images:
        raise SourceError(f"{folder}: no images in {folder / 'images'}")
    groups = tile_groups([p.stem for p in images])
    scale = tile_mpp / analysis_mpp
    tiles = []
    for path in images:
        mask_path = next((m for m in (folder / "masks").glob(f"{path.stem}.*")), None)
        if mask_path is None:
            raise SourceError(f"{path.name}: no mask {folder / 'masks' / path.stem}.* (every tile needs its outline mask)")
        image = resize_rgb(_rgb(_read(path)), scale)
        mask = glomerulus_mask(_read(mask_path))
        mask = resize_mask(mask, image.shape[:2])
        tiles.append(AnnotatedTile(path.stem, groups[path.stem], image, np.where(mask, UNKNOWN_CLASS, 0).astype(np.uint8)))
    return tiles


LABEL_COLUMNS = {"globally_sclerosed": "globally_sclerosed (1/0)", "class": "class (normal/sclerosed)"}
"""The columns of a crop folder's ``labels.csv`` that can give a crop's class (the first present wins)."""


def read_labels_csv(folder: Path, columns: tuple[str, ...], label_columns: tuple[str, ...] = tuple(LABEL_COLUMNS),
                    error: type[Exception] = SourceError) -> pd.DataFrame:
    """``folder/labels.csv`` of a crop folder (crop set or graded crops): it must hold the columns
    ``columns`` and one of ``label_columns`` (see ``crop_label``), else ``error`` says which."""
    path = Path(folder) / "labels.csv"
    needs = f"{', '.join(columns)} and {' or '.join(LABEL_COLUMNS[c] for c in label_columns)}"
    if not path.is_file():
        raise error(f"no labels.csv in {folder} (columns {needs})")
    table = pd.read_csv(path)
    if set(columns) - set(table.columns) or not set(label_columns) & set(table.columns):
        raise error(f"{path}: needs columns {needs}; has {list(table.columns)}")
    return table


def crop_label(row: dict, table_path: Path | str = "labels.csv") -> int:
    """The class of a ``labels.csv`` row: ``SCLEROSED`` or ``NORMAL``, by globally_sclerosed (1
    sclerosed, otherwise normal) when the table has that column, else by class (normal or
    sclerosed; anything else is a ``SourceError``)."""
    if "globally_sclerosed" in row:
        return SCLEROSED if int(row["globally_sclerosed"]) == 1 else NORMAL
    name = str(row["class"]).strip().lower()
    if name not in LABEL_OF_CLASS:
        raise SourceError(f"{table_path}: class {row['class']!r} of {row['image']} is not normal/sclerosed")
    return LABEL_OF_CLASS[name]


def read_crop_set(folder: Path) -> list[GlomerulusCrop]:
    """The crops of ``labels.csv`` with their outlines and classes."""
    folder = Path(folder)
    table = read_labels_csv(folder, ("image", "slide"))
    crops = []
    for row in table.to_dict("records"):
        label = crop_label(row, folder / "labels.csv")
        image_path, mask_path = folder / "images" / row["image"], folder / "masks" / row["image"]
        if not image_path.is_file() or not mask_path.is_file():
            raise SourceError(f"{row['image']}: needs {image_path} and {mask_path}")
        image = _rgb(_read(image_path))
        outline = glomerulus_mask(_read(mask_path))
        if outline.shape != image.shape[:2]:
            outline = resize_mask(outline, image.shape[:2])
        if outline.sum() < 16:
            raise SourceError(f"{mask_path}: outline is empty")
        crops.append(GlomerulusCrop(str(row["image"]), str(row["slide"]), label, image, outline))
    return crops
