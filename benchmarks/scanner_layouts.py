"""The CPU side of scanner files read through OpenSlide: null-engine tiles/s per core for a 40x
and a 20x layout, with and without a pyramid level at the analysis resolution, in one run.

A GPU infers about 136 tiles of 1024² per second (docs/benchmarks.md), so each slide's CPU side
-- opening the file, choosing the pyramid level, decoding its JPEG tiles, resampling to the
analysis resolution (1 µm/px), blending, labelling, writing -- decides how many cores a GPU
needs. The slide is the needle-biopsy layout of the speed benchmarks (three cores in a 10 x 6 mm
region, ``synthetic.needle_biopsy_slide``), written as a tiled JPEG TIFF (quality 90, 256 px
tiles) in three layouts:

- ``20x pyramid``: 0.5 µm/px, levels halving: level 1 is the analysis resolution, read as is;
- ``20x level 0 only``: 0.5 µm/px without a level at 1 µm/px, as in an Aperio 20x SVS (levels
  4x apart): level 0 is read and shrunk 2x. The file has no coarser level either, so its tissue
  detection and overview decode the whole of level 0, which a real SVS reads from its 16x level:
  for this layout the tile reads, not the end-to-end time, are what an SVS costs;
- ``40x pyramid``: 0.25 µm/px, levels halving: level 2 is the analysis resolution (an Aperio
  40x SVS's level 1, 4x down, is the same read).

Each file is opened through OpenSlide (``.svs`` name: OpenSlide reads it as a generic tiled
TIFF, as it reads an Aperio SVS; its mpp is given, as OpenSlide 3.4 reports none for generic
TIFFs), its pixels decoded two ways: by OpenSlide (``openslide``), and as glomscan does by
default for Aperio and generic TIFFs, by libvips' TIFF reader on OpenSlide's levels (``tiff``;
``slides.TIFF_LAYOUT_VENDORS``). What is timed, in a child process pinned to one core (one tile
reader, one merge worker) after one untimed warm-up slide:

- ``read``: the tissue tiles alone, read at the analysis resolution (``Slide.image_at``, the
  level choice of ``Slide.best_level``, ``TileReader``);
- ``end to end``: ``analyze`` with an engine that returns empty predictions (no inference), the
  review page left out.

Runs alternate the layouts, so a changing machine load hits them alike; ratios to the ``20x
pyramid`` read through OpenSlide are taken within each run.

    python benchmarks/scanner_layouts.py [--quick] [--runs 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from glomscan.config import AnalysisSettings, analysis_settings_for
from glomscan.model import ModelCard
from glomscan.slides import Slide, TileReader
from glomscan.synthetic import needle_biopsy_slide
from glomscan.tiling import TileGrid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_side import cpu_model  # noqa: E402
from gpu import ReplayEngine, analyse  # noqa: E402

TILE = 1024
NULL_CARD = ModelCard(name="null", tile=TILE)
"""The null engine's card: its tile is what the settings resolve from."""
ANALYSIS_MPP = 1.0
LAYOUTS = {  # name: (level-0 mpp, pyramid)
    "20x pyramid": (0.5, True),
    "20x level 0 only": (0.5, False),
    "40x pyramid": (0.25, True),
}
READERS = ("openslide", "tiff")


def settings_for(mpp: float) -> AnalysisSettings:
    return analysis_settings_for(NULL_CARD, batch_size=8, workers=1, merge_workers=1, viewer=False,
                                 target_mpp=ANALYSIS_MPP, mpp_override=mpp)


def write_layouts(folder: Path, quick: bool) -> None:
    """One file per layout (``.svs``), each in its own slides folder."""
    for i, (mpp, pyramid) in enumerate(LAYOUTS.values()):
        (folder / f"layout{i}").mkdir(exist_ok=True)
        path = folder / f"layout{i}" / "slide.svs"
        if not path.is_file():
            needle_biopsy_slide(path, quick, mpp=mpp, pyramid=pyramid)


def tissue_tiles(slide: Slide, settings: AnalysisSettings):
    downsample = ANALYSIS_MPP / slide.mpp
    image, level = slide.image_at(downsample)
    grid = TileGrid(image.width, image.height, TILE, settings.stride)
    return image, level, grid.tissue_tiles(slide.tissue(downsample, ANALYSIS_MPP, settings.tissue))


def child(slides: Path, mpp: float, reader: str) -> None:
    """One measurement (pinned to one CPU by the parent): prints a JSON line."""
    from glomscan import slides as slides_module
    from glomscan.model import LoadedModel

    if reader == "openslide":
        slides_module.TIFF_LAYOUT_VENDORS = set()

    path = next(slides.iterdir())
    settings = settings_for(mpp)
    model = LoadedModel(module=None, card=NULL_CARD, sha256="0" * 64, path=None)
    engine = ReplayEngine(model.card, np.zeros((2, TILE, TILE), np.float32))
    slide = Slide(path, mpp_override=mpp)
    assert slide.pixel_reader == reader, slide.pixel_reader
    image, level, tiles = tissue_tiles(slide, settings)
    reader = TileReader(image, TILE)
    for t in tiles[:4]:  # warm-up: file opened, first tiles decoded
        reader.read(t.x, t.y)
    t0 = time.perf_counter()
    for t in tiles:
        reader.read(t.x, t.y)
    read_s = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp(dir=slides.parent))
    analyse(slides, out / "warm-up", model, engine, settings)
    seconds, n = analyse(slides, out / "timed", model, engine, settings)
    print(json.dumps({"read_s": read_s, "seconds": seconds, "tiles": n, "level": level.index,
                      "level_downsample": level.downsample, "residual": ANALYSIS_MPP / mpp / level.downsample,
                      "vendor": slide.vendor, "cpus": sorted(os.sched_getaffinity(0))}), flush=True)


def measure(slides: Path, mpp: float, reader: str, cpu: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", VIPS_CONCURRENCY="1")
    cmd = [sys.executable, __file__, "--child", str(slides), "--mpp", str(mpp), "--reader", reader]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cpus"] == [cpu], result
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8000x5000 px (20x) needle layout: fewer tiles")
    ap.add_argument("--runs", type=int, default=3, help="runs over all layouts (default 3)")
    ap.add_argument("--data", type=Path, default=None, help="keep the slides here and reuse them when there")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mpp", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reader", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.mpp, args.reader)
        return
    cpu = min(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_layouts(folder, args.quick)
        print(f"{platform.node()}, {cpu_model()}; one core (CPU {cpu}); load average {os.getloadavg()[0]:.2f}; "
              f"slides written in {time.perf_counter() - t0:.0f} s", flush=True)
        cases = [(name, reader) for name in LAYOUTS for reader in READERS]
        results: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
        for _ in range(args.runs):
            for name, reader in cases:
                i = list(LAYOUTS).index(name)
                results[(name, reader)].append(measure(folder / f"layout{i}", LAYOUTS[name][0], reader, cpu))
        base = results[("20x pyramid", "openslide")]
        table = []
        for (name, reader), runs in results.items():
            read = [r["tiles"] / r["read_s"] for r in runs]
            e2e = [r["tiles"] / r["seconds"] for r in runs]
            ratio = [r["seconds"] / b["seconds"] for r, b in zip(runs, base)]
            first = runs[0]
            row = {"layout": name, "reader": reader, "vendor": first["vendor"], "tiles": first["tiles"],
                   "level": first["level"], "level_downsample": round(first["level_downsample"], 3),
                   "resampled_by": round(first["residual"], 3), "read_tiles_per_s": [round(x, 1) for x in read],
                   "end_to_end_tiles_per_s": [round(x, 1) for x in e2e],
                   "end_to_end_time_vs_20x_pyramid_openslide": [round(x, 2) for x in ratio]}
            table.append(row)
            print(f"{name:18s} {reader:9s} ({first['vendor']}): {first['tiles']} tiles, level {first['level']} "
                  f"(downsample {first['level_downsample']:.3g}), resampled by {first['residual']:.3g}; "
                  f"read {statistics.median(read):.1f} tiles/s ({min(read):.1f}-{max(read):.1f}), "
                  f"end to end {statistics.median(e2e):.1f} tiles/s ({min(e2e):.1f}-{max(e2e):.1f}), "
                  f"time {' / '.join(f'{x:.2f}x' for x in ratio)} of the 20x pyramid through OpenSlide", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "runs": args.runs, "quick": args.quick,
                                         "rows": table}, indent=2))


if __name__ == "__main__":
    main()
