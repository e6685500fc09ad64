"""The CPU side alone: null-engine tiles/s against the number of cores, in one run.

An engine that costs nothing (``ReplayEngine`` of benchmarks/gpu.py) hands back stored
predictions, so what is timed is everything else ``analyze`` does with a slide: tissue
detection, reading and resampling tiles, blending, labelling and measuring glomeruli, writing
the mask, tables and overview (not the review page; ``--viewer`` includes it). Each
measurement runs in a child process pinned to N cores (``sched_setaffinity`` before it starts,
so every thread in it -- libvips', numpy's, ours -- stays on them) with N tile-reader threads
and N merge workers, after one untimed warm-up slide.
Runs alternate the core counts, so a shared machine's changing load hits them alike; the ratio
of each run is taken within that run.

Workloads (what the null engine returns):

- ``truth``: each tile's true masks of the synthetic glomeruli (discs 80-150 px across at the
  analysis resolution): glomerulus-sized components, as a working model gives.
- ``model``: one prediction of the shipped model (tile 0) replayed on every tile, as
  ``benchmarks/gpu.py`` does. On synthetic tissue the model marks most of it as glomerulus, so
  components span the slide: the worst case for labelling.

``--profile`` times the stages one after the other on one core instead (``--runs`` times).

    python benchmarks/cpu_side.py [--quick] [--cores 1,2] [--runs 3] [--workloads truth,model]
                                  [--merge-workers N] [--profile] [--viewer] [--data DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
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

from glomscan.config import AnalysisSettings
from glomscan.slides import Slide, TileReader
from glomscan.synthetic import SyntheticSlide, scatter_glomeruli, write_synthetic_slide
from glomscan.tiling import TileGrid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import ReplayEngine, analyse  # noqa: E402

DOWNSAMPLE = 2.0  # 0.5 µm/px slide analysed at 1 µm/px


def layout(quick: bool) -> tuple[int, int, int, int]:
    """(width, height, tile, glomeruli): the slide of benchmarks/gpu.py."""
    return (6000, 4000, 512, 20) if quick else (16000, 12000, 1024, 60)


def make_slide(folder: Path, quick: bool) -> SyntheticSlide:
    w, h, _, n = layout(quick)
    tissue = [(int(w * 0.05), int(h * 0.05), int(w * 0.6), int(h * 0.95)),
              (int(w * 0.65), int(h * 0.2), int(w * 0.95), int(h * 0.8))]
    folder.mkdir(parents=True, exist_ok=True)
    return write_synthetic_slide(folder / "bench.tif", w, h, scatter_glomeruli(tissue, n, (80, 150), 0.3), tissue,
                                 mpp=0.5, compression="jpeg")


def settings_for(tile: int, cores: int, viewer: bool = False, merge_workers: int = 0) -> AnalysisSettings:
    """N reader threads and N merge workers (or ``merge_workers``); no review page unless asked
    (its cost is benchmarks/viewer_cost.py's). Settings a version of the code lacks are left out."""
    fields = {f.name for f in dataclasses.fields(AnalysisSettings)}
    extra = {k: v for k, v in (("merge_workers", merge_workers or cores), ("viewer", viewer)) if k in fields}
    return AnalysisSettings(tile=tile, overlap=tile // 2, batch_size=8, workers=cores, **extra)


def inferred_tiles(slide_path: Path, tile: int):
    settings = settings_for(tile, 1)
    slide = Slide(slide_path)
    image, _ = slide.image_at(DOWNSAMPLE)
    grid = TileGrid(image.width, image.height, tile, settings.stride)
    return slide, image, grid, grid.tissue_tiles(slide.tissue(DOWNSAMPLE, 1.0, settings.tissue))


def truth_tiles(synthetic: SyntheticSlide, tiles, tile: int) -> np.ndarray:
    """(N, T, T) uint8 labels (0 background, 1 normal, 2 sclerosed) of every tile, from the discs."""
    out = np.zeros((len(tiles), tile, tile), np.uint8)
    yy, xx = np.mgrid[0:tile, 0:tile]
    for i, t in enumerate(tiles):
        for g in synthetic.glomeruli:
            gx, gy, r = g.x / DOWNSAMPLE, g.y / DOWNSAMPLE, g.radius / DOWNSAMPLE
            if gx + r < t.x or gx - r > t.x + tile or gy + r < t.y or gy - r > t.y + tile:
                continue
            inside = (xx + t.x + 0.5 - gx) ** 2 + (yy + t.y + 0.5 - gy) ** 2 <= r**2
            out[i][inside] = 2 if g.sclerosed else 1
    return out


def prepare(folder: Path, quick: bool, workloads: list[str]) -> int:
    """Slide and stored predictions under ``folder``; returns the number of inferred tiles."""
    _, _, tile, _ = layout(quick)
    synthetic = make_slide(folder / "slides", quick)
    _, _, _, tiles = inferred_tiles(synthetic.path, tile)
    if "truth" in workloads:
        np.save(folder / "truth.npy", truth_tiles(synthetic, tiles, tile))
    if "model" in workloads:
        from glomscan import model as models
        from glomscan.engines import EngineOptions, create_engine
        from glomscan.shipped import default_model_path

        load = getattr(models, "load_model", models.load_checkpoint)  # load_model also reads .onnx
        engine, _ = create_engine("auto", load(default_model_path()), EngineOptions(engine_dir=folder / "engines", tile=tile))
        _, image, _, _ = inferred_tiles(synthetic.path, tile)
        np.save(folder / "model.npy", engine.predict(TileReader(image, tile).read(tiles[0].x, tiles[0].y)[None])[0])
    return len(tiles)


def predictions(folder: Path, workload: str) -> np.ndarray:
    if workload == "truth":
        labels = np.load(folder / "truth.npy")
        return np.stack([labels == 1, labels == 2], axis=1).astype(np.float32)
    return np.load(folder / "model.npy")


def child(folder: Path, quick: bool, workload: str, cores: int, viewer: bool, merge_workers: int) -> None:
    """One measurement (runs pinned to ``cores`` CPUs): prints a JSON line."""
    from glomscan.model import LoadedModel, ModelCard

    _, _, tile, _ = layout(quick)
    model = LoadedModel(module=None, card=ModelCard(name="null", tile=tile), sha256="0" * 64, path=None)
    engine = ReplayEngine(model.card, predictions(folder, workload))
    settings = settings_for(tile, cores, viewer, merge_workers)
    out = Path(tempfile.mkdtemp(dir=folder))
    analyse(folder / "slides", out / "warm-up", model, engine, settings)
    seconds, n = analyse(folder / "slides", out / "timed", model, engine, settings)
    print(json.dumps({"seconds": seconds, "tiles": n, "cpus": sorted(os.sched_getaffinity(0))}), flush=True)


def measure(folder: Path, quick: bool, workload: str, cpus: list[int], viewer: bool, merge_workers: int) -> float:
    """Tiles/s of one pinned child process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus)), VIPS_CONCURRENCY=str(len(cpus)))
    cmd = [sys.executable, __file__, "--child", str(folder), "--workloads", workload, "--cores", str(len(cpus))]
    cmd += ["--quick"] if quick else []
    cmd += ["--viewer"] if viewer else []
    cmd += ["--merge-workers", str(merge_workers)]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cpus"] == sorted(cpus), result
    return result["tiles"] / result["seconds"]


def profile(folder: Path, quick: bool, workload: str, runs: int) -> None:
    """Each stage alone, one after the other, on one core (the sequential code paths), ``runs``
    times: median and range in ms per tile."""
    from glomscan.merge import BlendingCanvas
    from glomscan.model import LoadedModel, ModelCard
    from glomscan.pipeline import OVERVIEW_MAX_SIDE
    from glomscan.postprocess import InstanceStream
    from glomscan.report import StreamedLabelFile, write_mask_tiff, write_overview
    from glomscan.imaging import image_to_array

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    _, _, tile, _ = layout(quick)
    model = LoadedModel(module=None, card=ModelCard(name="null", tile=tile), sha256="0" * 64, path=None)
    engine = ReplayEngine(model.card, predictions(folder, workload))
    times: dict[str, list[float]] = {}

    def timed(name: str, work):
        t0 = time.perf_counter()
        result = work()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return result

    for run in range(runs):
        slide, image, grid, tiles = timed("slide open + tissue detection",
                                          lambda: inferred_tiles(folder / "slides" / "bench.tif", tile))
        n = len(tiles)
        reader = TileReader(image, tile)
        timed("tile reading", lambda: [reader.read(t.x, t.y) for t in tiles])
        preds = [engine.predict(np.zeros((1, tile, tile, 3), np.uint8))[0] for _ in tiles]

        def blend():
            canvas = BlendingCanvas(grid, 2)
            bands = [b for t, p in zip(tiles, preds) for b in canvas.add(t, p)]
            return bands + canvas.finish()

        bands = timed("blending", blend)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            tmp = Path(tmp)
            labels = StreamedLabelFile(tmp / "mask.pgm", image.width, image.height)

            def label():
                stream = InstanceStream(image.width, ("normal", "sclerosed"), 1500.0, row_sink=labels.write_rows)
                for band in bands:
                    stream.push(band)
                return stream.finish()

            instances = timed("labelling + measuring", label)
            del bands, preds
            timed("mask.tif", lambda: write_mask_tiff(labels.image(), tmp / "mask.tif", 1.0))
            labels.close()
            ds = max(1.0, max(image.width, image.height) / OVERVIEW_MAX_SIDE)
            timed("overview.png", lambda: write_overview(image_to_array(slide.image_at(DOWNSAMPLE * ds)[0]), ds,
                                                         instances, tmp / "overview.png"))
            if run == 0:
                analyse(folder / "slides", tmp / "warm-up", model, engine, settings_for(tile, 1))
            timed("end to end (analyze, 1 merge worker)",
                  lambda: analyse(folder / "slides", tmp / "timed", model, engine, settings_for(tile, 1)))
    print(f"{workload}: {n} tiles, {len(instances)} glomeruli; one core, ms per tile, median (range) of {runs} runs:")
    for name, seconds in times.items():
        ms = [1000 * x / n for x in seconds]
        print(f"  {name:38s} {statistics.median(ms):7.2f} ({min(ms):.2f}-{max(ms):.2f})")
    e2e = statistics.median(times["end to end (analyze, 1 merge worker)"])
    print(f"  end to end: {n / e2e:.1f} tiles/s; the stages above it sum to "
          f"{sum(statistics.median(v) for k, v in times.items() if not k.startswith('end')) / e2e:.2f} of it")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6000x4000 px slide, 512 px tiles (seconds, a check)")
    ap.add_argument("--cores", default="1,2", help="core counts to compare (default 1,2)")
    ap.add_argument("--runs", type=int, default=3, help="runs per core count (default 3)")
    ap.add_argument("--workloads", default="truth,model", help="truth, model or both (default both)")
    ap.add_argument("--profile", action="store_true", help="time the stages one after the other on one core")
    ap.add_argument("--viewer", action="store_true", help="also write the review page (viewer.html) of each slide")
    ap.add_argument("--merge-workers", type=int, default=0,
                    help="merge workers for every core count (default 0: as many as cores)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--data", type=Path, default=None,
                    help="keep the slide and predictions in this folder and reuse them when there (to compare "
                         "two versions of the code on the same inputs)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    if args.child is not None:
        child(args.child, args.quick, workloads[0], int(args.cores), args.viewer, args.merge_workers)
        return
    cores = [int(c) for c in args.cores.split(",")]
    available = sorted(os.sched_getaffinity(0))
    if max(cores) > len(available):
        sys.exit(f"asked for {max(cores)} cores, {len(available)} available")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        if args.data is not None and (folder / "slides" / "bench.tif").is_file():
            n = len(inferred_tiles(folder / "slides" / "bench.tif", layout(args.quick)[2])[3])
        else:
            n = prepare(folder, args.quick, workloads)
        w, h, tile, _ = layout(args.quick)
        print(f"{platform.node()}, {cpu_model()}, {len(available)} CPUs; load average {os.getloadavg()[0]:.2f}; "
              f"slide {w}x{h} px -> {n} tissue tiles of {tile} px, batch 8; merge workers "
              f"{args.merge_workers or 'as many as cores'}", flush=True)
        if args.profile:
            for workload in workloads:
                profile(folder, args.quick, workload, args.runs)
            return
        results: dict = {"cpus": len(available), "tiles": n, "tile": tile, "load_before": os.getloadavg()[0]}
        for workload in workloads:
            runs: dict[int, list[float]] = {c: [] for c in cores}
            loads = []
            for _ in range(args.runs):
                for c in cores:
                    runs[c].append(measure(folder, args.quick, workload, available[:c], args.viewer,
                                           args.merge_workers))
                    loads.append(os.getloadavg()[0])
            results[workload] = {c: [round(x, 2) for x in v] for c, v in runs.items()}
            results[f"{workload}_load"] = [round(x, 2) for x in loads]
            for c in cores:
                v = runs[c]
                print(f"{workload}, {c:2d} core(s): {' / '.join(f'{x:.1f}' for x in v)} tiles/s "
                      f"(median {statistics.median(v):.1f}, spread {min(v):.1f}-{max(v):.1f})", flush=True)
            print(f"{workload}: load average after each measurement {min(loads):.2f}-{max(loads):.2f}", flush=True)
            for c in cores[1:]:
                ratios = [a / b for a, b in zip(runs[c], runs[cores[0]])]
                print(f"{workload}, {c} vs {cores[0]} core(s), per run: {' / '.join(f'{r:.2f}x' for r in ratios)} "
                      f"(median {statistics.median(ratios):.2f}x)", flush=True)
        results["load_after"] = os.getloadavg()[0]
        print(f"load average after: {results['load_after']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
