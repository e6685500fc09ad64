"""Pipeline efficiency: end-to-end analyze tiles/s divided by model-only tiles/s on the same tiles.

A ratio near 1 means reading, tissue filtering, blending, instance extraction and writing hide
behind inference. Each run times, in one process and in turn: the engine alone on the slide's
tissue tiles (already in memory), then ``analyze`` on the slide without and with the review
page (``--viewer``). It prints each run's ratios, their spread over the runs, and where the
end-to-end time beyond inference went: before the first tile, between tiles, and after the
last tile (the slide's tail: last rows, mask, tables, overview, review page). Last, the model's
outputs are replayed through ``analyze`` (an engine that costs nothing): the CPU side alone, in
wall and CPU seconds, against the CPU seconds of inference. Where inference already keeps every
core busy, the CPU side can only be hidden on idle cores, so model CPU / (model CPU + CPU side
CPU) bounds the efficiency whatever the overlap.

The default slide is paved with the shipped sample's real PAS tiles (``--slide real``), so the
shipped model finds glomeruli of real sizes; on the synthetic disc slide (``--slide discs``)
it takes whole tissue islands for glomeruli, which no real slide resembles.

    python benchmarks/pipeline_efficiency.py [--quick] [--backend openvino] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from glomscan.batch import run_batch
from glomscan.config import analysis_settings_for
from glomscan.engines import EngineOptions, create_engine
from glomscan.model import load_model
from glomscan.shipped import default_model_path
from glomscan.slides import Slide, TileReader
from glomscan.synthetic import scatter_glomeruli, write_real_tissue_slide, write_synthetic_slide
from glomscan.tiling import TileGrid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import ReplayEngine  # noqa: E402  (stored predictions handed out in order: the CPU side alone)


class TimedEngine:
    """The engine with the start and end of every call recorded."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.engine.predict(tiles)
        self.calls.append((t0, time.perf_counter()))
        return out


def make_slide(folder: Path, kind: str, size: tuple[int, int]) -> Path:
    w, h = size
    tissue = [(int(w * 0.05), int(h * 0.05), int(w * 0.6), int(h * 0.95)),
              (int(w * 0.65), int(h * 0.2), int(w * 0.95), int(h * 0.8))]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.tif"
    if kind == "real":
        write_real_tissue_slide(path, w, h, tissue)
    else:
        write_synthetic_slide(path, w, h, scatter_glomeruli(tissue, 20, (80, 150), 0.3), tissue, mpp=0.5,
                              compression="jpeg")
    return path


def end_to_end(slides: Path, out: Path, model, engine, choice, settings) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    timed = TimedEngine(engine)
    t0 = time.perf_counter()
    outcome = run_batch(slides, out, model, timed, choice, settings, quiet=True)
    seconds = time.perf_counter() - t0
    report = outcome.reports[0]
    assert report.status == "ok", report.reason
    calls = timed.calls
    return {"seconds": seconds, "tiles": report.tiles_tissue, "glomeruli": report.n_glomeruli,
            "inference": sum(b - a for a, b in calls), "before": calls[0][0] - t0,
            "between": sum(calls[i + 1][0] - calls[i][1] for i in range(len(calls) - 1)),
            "after": t0 + seconds - calls[-1][1]}


def spread(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values) + (
        f" (median {statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small slide and 512 px tiles (about a minute)")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    ap.add_argument("--slide", choices=("real", "discs"), default="real")
    ap.add_argument("--batch-size", type=int, default=1, help="tiles per engine call")
    ap.add_argument("--readers", type=int, default=2, help="tile reader threads")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model = load_model(args.model or default_model_path())
    tile = 512 if args.quick else model.card.tile
    size = (4000, 3000) if args.quick else (9000, 7000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine, choice = create_engine(args.backend, model, EngineOptions(engine_dir=tmp / "engines", tile=tile))
        slide_path = make_slide(tmp / "slides", args.slide, size)
        settings = analysis_settings_for(model.card, tile, batch_size=args.batch_size, workers=args.readers, viewer=False)

        # the tiles analyze will infer, read once into memory for the model-only timing
        slide = Slide(slide_path)
        image, _ = slide.image_at(2.0)
        tissue_mask = slide.tissue(2.0, 1.0, settings.tissue)
        tiles = TileGrid(image.width, image.height, tile, settings.stride).tissue_tiles(tissue_mask)
        reader = TileReader(image, tile)
        pixels = [reader.read(t.x, t.y) for t in tiles]
        engine.predict(np.stack(pixels[:args.batch_size]))  # warm-up (allocator, lazy init)
        end_to_end(slide_path.parent, tmp / "out", model, engine, choice, settings)  # warm-up (imports, caches)

        n = len(tiles)
        print(f"backend: {choice.backend} ({choice.reason}); model {model.model_id}; tile {tile}, stride "
              f"{settings.stride}, batch {args.batch_size}, {args.readers} readers")
        print(f"slide ({args.slide}): {size[0]}x{size[1]} px at 0.5 µm/px -> analysis {image.width}x{image.height}; "
              f"{n} tissue tiles")
        ratios: dict[str, list[float]] = {"no viewer": [], "viewer": []}
        outputs, model_cpu, model_wall = [], [], []
        for run in range(1, args.runs + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            for i in range(0, n, args.batch_size):
                out = engine.predict(np.stack(pixels[i:i + args.batch_size]))
                if run == 1:
                    outputs.append(out)  # kept for the replay below
            model_only = time.perf_counter() - t0
            model_cpu.append(time.process_time() - c0)
            model_wall.append(model_only)
            line = [f"run {run}: model only {n / model_only:.3f} tiles/s"]
            for label, viewer in (("no viewer", False), ("viewer", True)):
                r = end_to_end(slide_path.parent, tmp / "out", model, engine, choice, replace(settings, viewer=viewer))
                assert r["tiles"] == n
                ratios[label].append(model_only / r["seconds"])
                line.append(f"{label}: end to end {n / r['seconds']:.3f} tiles/s, efficiency "
                            f"{model_only / r['seconds']:.3f} (inference {r['inference']:.2f} s of {r['seconds']:.2f};"
                            f" before the first tile {r['before']:.2f}, between tiles {r['between']:.2f}, after the"
                            f" last {r['after']:.2f}; {r['glomeruli']} glomeruli)")
            print("; ".join(line), flush=True)
        for label, values in ratios.items():
            print(f"pipeline efficiency (end-to-end / model-only tiles/s), {label}: {spread(values)}")
        replay = ReplayEngine(model.card, np.concatenate(outputs))
        inference_cpu = statistics.median(model_cpu)
        busy = statistics.median(c / w for c, w in zip(model_cpu, model_wall))
        print(f"inference alone keeps {busy:.2f} of the {len(os.sched_getaffinity(0))} usable cores busy (median)")
        for label, viewer in (("no viewer", False), ("viewer", True)):
            walls, cpus = [], []
            for _ in range(3):
                c0 = time.process_time()
                r = end_to_end(slide_path.parent, tmp / "out", model, replay, choice, replace(settings, viewer=viewer))
                walls.append(r["seconds"])
                cpus.append(time.process_time() - c0)
            cpu = statistics.median(cpus)
            print(f"CPU side alone (the model's outputs replayed), {label}: wall {spread(walls)} s, CPU {spread(cpus)} s; "
                  f"inference {inference_cpu:.1f} CPU s (median of the model-only passes): the CPU side is "
                  f"{100 * cpu / inference_cpu:.1f} % of it, efficiency bound where inference fills every core "
                  f"{inference_cpu / (inference_cpu + cpu):.3f}")


if __name__ == "__main__":
    main()
