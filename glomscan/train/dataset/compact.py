"""A prepared training set in a few tens of MB, to carry it to a training machine.

``prepare`` writes every composite as a whole PNG, although a composite differs from its
background tile only inside the boxes of the glomeruli pasted into it (``glomeruli.csv``): the
AIDPATH set is 450 MB of PNGs of which about 16 % of the composite pixels are pasted. The compact
form keeps the label masks, the tiles and any patch it cannot rebuild as they are (lossless),
and of each composite only its pasted boxes, as JPEG (4:4:4, quality ``box_quality``; or PNG with
``box_quality=None``, then ``unpack`` rebuilds the set exactly). A composite is stored as boxes
only when it equals its background tile (the tile whose id ends like the composite's)
everywhere outside them; otherwise as a whole PNG.

    python -m glomscan.train.dataset.compact pack DATASET_DIR OUT.tar [--box-quality 92]
    python -m glomscan.train.dataset.compact unpack OUT.tar DATASET_DIR
"""

from __future__ import annotations

import argparse
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips

from ...imaging import image_to_array, write_png
from .data import load_patch

log = logging.getLogger(__name__)

BOX_COLUMNS = ["patch_id", "background", "x0", "y0", "x1", "y1", "member"]
COPIED = ("manifest.csv", "glomeruli.csv", "dataset.json")


def _encode(array: np.ndarray, quality: int | None) -> tuple[bytes, str]:
    height, width, bands = array.shape
    image = pyvips.Image.new_from_memory(np.ascontiguousarray(array).tobytes(), width, height, bands, "uchar")
    if quality is None:
        return image.pngsave_buffer(compression=6), ".png"
    return image.jpegsave_buffer(Q=quality, subsample_mode="off"), ".jpg"


def _decode(data: bytes) -> np.ndarray:
    return image_to_array(pyvips.Image.new_from_buffer(data, ""))[..., :3]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def background_tiles(manifest: pd.DataFrame) -> dict[str, str]:
    """Composite patch id -> the id of the tile it was composited on (same trailing id)."""
    tiles = {pid.rsplit("_", 1)[-1]: pid for pid in manifest.patch_id[manifest.kind == "tile"]}
    composites = manifest.patch_id[manifest.kind == "composite"]
    return {pid: tiles[pid.rsplit("_", 1)[-1]] for pid in composites if pid.rsplit("_", 1)[-1] in tiles}


def pack_training_set(dataset_dir: Path, out_path: Path, box_quality: int | None = 92) -> dict:
    """Write the compact form of ``dataset_dir`` to ``out_path`` (a tar); returns counts."""
    dataset_dir = Path(dataset_dir)
    manifest = pd.read_csv(dataset_dir / "manifest.csv")
    boxes = pd.read_csv(dataset_dir / "glomeruli.csv")
    boxes_by_patch = {k: g for k, g in boxes.groupby("patch_id")}
    backgrounds = background_tiles(manifest)
    rows = {r["patch_id"]: r for r in manifest.to_dict("records")}
    box_rows, counts = [], {"whole": 0, "as_boxes": 0, "boxes": 0}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out_path, "w", dereference=True) as tar:
        for name in COPIED:
            if (dataset_dir / name).is_file():
                tar.add(dataset_dir / name, arcname=name)
        for row in manifest.to_dict("records"):
            tar.add(dataset_dir / row["mask"], arcname=row["mask"])
            background = backgrounds.get(row["patch_id"])
            placed = boxes_by_patch.get(row["patch_id"])
            if background is not None and placed is not None:
                image, _ = load_patch(dataset_dir, row)
                base, _ = load_patch(dataset_dir, rows[background])
                inside = np.zeros(image.shape[:2], bool)
                for b in placed.itertuples():
                    inside[b.y0:b.y1, b.x0:b.x1] = True
                if image.shape == base.shape and np.array_equal(image[~inside], base[~inside]):
                    for k, b in enumerate(placed.itertuples()):
                        data, suffix = _encode(image[b.y0:b.y1, b.x0:b.x1], box_quality)
                        member = f"boxes/{row['patch_id']}_{k}{suffix}"
                        _add(tar, member, data)
                        box_rows.append([row["patch_id"], background, b.x0, b.y0, b.x1, b.y1, member])
                    counts["as_boxes"] += 1
                    counts["boxes"] += len(placed)
                    continue
            tar.add(dataset_dir / row["image"], arcname=row["image"])
            counts["whole"] += 1
        _add(tar, "boxes.csv", pd.DataFrame(box_rows, columns=BOX_COLUMNS).to_csv(index=False).encode())
    log.info("%s: %d patches whole, %d composites as %d boxes (%.1f MB)", out_path, counts["whole"],
             counts["as_boxes"], counts["boxes"], out_path.stat().st_size / 1e6)
    return counts


def unpack_training_set(pack_path: Path, out_dir: Path) -> pd.DataFrame:
    """Rebuild the prepared set in ``out_dir`` from a pack; returns its manifest."""
    out_dir = Path(out_dir)
    with tarfile.open(pack_path) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (Debian 12 has 3.11.2)
            tar.extractall(out_dir, filter="data")
        else:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if not (member.isfile() or member.isdir()) or Path(member.name).is_absolute() or ".." in parts:
                    raise ValueError(f"{pack_path}: {member.name!r} is not a file of a compact training set")
            tar.extractall(out_dir)
    manifest = pd.read_csv(out_dir / "manifest.csv")
    boxes = pd.read_csv(out_dir / "boxes.csv")
    rows = {r["patch_id"]: r for r in manifest.to_dict("records")}
    for patch_id, placed in boxes.groupby("patch_id", sort=False):
        image, _ = load_patch(out_dir, rows[placed.background.iloc[0]])
        image = image.copy()
        for b in placed.itertuples():
            image[b.y0:b.y1, b.x0:b.x1] = _decode((out_dir / b.member).read_bytes())
        write_png(out_dir / rows[patch_id]["image"], image, compression=1)
    missing = [r["image"] for r in rows.values() if not (out_dir / r["image"]).is_file()]
    if missing:
        raise ValueError(f"{pack_path}: {len(missing)} images neither stored nor rebuilt (e.g. {missing[0]})")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glomscan.train.dataset.compact", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="a prepared set -> its compact tar")
    pack.add_argument("dataset_dir", type=Path)
    pack.add_argument("out", type=Path)
    pack.add_argument("--box-quality", type=int, default=92, help="JPEG quality of the pasted boxes (0: PNG, lossless)")
    unpack = commands.add_parser("unpack", help="a compact tar -> the prepared set")
    unpack.add_argument("pack", type=Path)
    unpack.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "pack":
        print(pack_training_set(args.dataset_dir, args.out, args.box_quality or None))
    else:
        print(f"{len(unpack_training_set(args.pack, args.out_dir))} patches in {args.out_dir}")


if __name__ == "__main__":
    main()
