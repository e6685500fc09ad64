"""What the review page (analyze --viewer) costs per slide: disk and seconds of ``write_viewer``
on real PAS tissue, at sizes from the shipped sample to a whole-slide scale.

    python benchmarks/viewer_cost.py [--data ../shared/data/aidpath_tiles] [--out /tmp/viewer-cost]

Slides: the three shipped sample tiles (glomscan/sample, 512 x 512 px at 1 µm/px) and pyramidal
TIFFs at 0.5 µm/px made of the 16 first AIDPATH PAS tiles of the tile set laid 4 x 4 (2048 x 2048
px at 1 µm/px, 4.2 mm²), and that mosaic repeated 4 x 4 (8192 x 8192 px, 67 mm², about a
needle-biopsy slide's scanned area). Each is analysed with the shipped model (the sample) or
given an empty result (the mosaics: the viewer's cost is the pyramid, not the outlines), then
its viewer is written and measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyvips

from glomscan.pipeline import SlideReport
from glomscan.viewer import write_viewer

SAMPLE = Path(__file__).resolve().parents[1] / "glomscan" / "sample"


def mosaic(tiles_dir: Path, path: Path, repeat: int) -> Path:
    tiles = [pyvips.Image.new_from_file(str(p))[:3] for p in sorted((tiles_dir / "images").glob("*.png"))[:16]]
    image = pyvips.Image.arrayjoin(tiles, across=4)
    if repeat > 1:
        image = image.replicate(repeat, repeat)
    image.tiffsave(str(path), tile=True, pyramid=True, compression="jpeg", Q=90, xres=2000, yres=2000, resunit="cm")
    return path


def measure(folder: Path, slide: Path, geojson: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "glomeruli.geojson").write_text(json.dumps(geojson))
    image = pyvips.Image.new_from_file(str(slide))
    report = SlideReport(slide=slide.stem, path=str(slide), analysis_downsample=2.0, mpp=0.5, analysis_mpp=1.0,
                         n_normal=0, n_sclerosed=0)
    t0 = time.perf_counter()
    info = write_viewer(folder, report)
    seconds = time.perf_counter() - t0
    mm2 = image.width * image.height / 4 / 1e6  # 0.5 µm/px
    return {"slide": slide.name, "analysis_px": f"{image.width // 2} x {image.height // 2}", "area_mm2": round(mm2, 2),
            "viewer_MB": round(info.bytes / 1e6, 2), "tiles": info.tiles, "seconds": round(seconds, 2),
            "MB_per_mm2": round(info.bytes / 1e6 / mm2, 3), "s_per_mm2": round(seconds / mm2, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/aidpath_tiles"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/viewer-cost"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    empty = {"type": "FeatureCollection", "features": []}
    rows = []
    for slide in sorted(SAMPLE.glob("*.tif")):
        rows.append(measure(args.out / slide.stem, slide, empty))
    for repeat in (1, 4):
        slide = mosaic(args.data, args.out / f"aidpath_mosaic_{repeat}x.tif", repeat)
        rows.append(measure(args.out / slide.stem, slide, empty))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
