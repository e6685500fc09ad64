"""Speed on a GPU, in one run on one synthetic pyramidal TIFF (JPEG, 0.5 µm/px):

1. model-only vs end-to-end tiles/s for torch CUDA fp32 and fp16 (pipeline efficiency on the
   GPU), and the fp16 and bf16 masks' Dice against fp32 on the shipped sample's real tissue
   tiles (and fp16's on the benchmark slide's first batch);
2. the CPU side alone (a null engine that returns one real prediction again and again) in
   tiles/s against the number of tile-reader threads;
3. slides per hour for the needle-biopsy layout of benchmarks/vs_monai.py (three cores);
4. a batch of such needle biopsies with K slides in flight (K worker processes sharing the GPU,
   ``analyze --slides-in-flight K``): slides/hour, tiles/s, end to end / network-only, the GPU
   memory in use at its peak (nvidia-smi, sampled) and each worker's own peak.

Ratios are measured within this one run. ``--device cpu --quick`` checks the script on a CPU.

    python benchmarks/gpu.py [--device cuda] [--quick] [--model CKPT] [--readers 1,2,4,8,16]
                             [--slides-in-flight 1,2,4,8,16] [--time-budget-s 120] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings, analysis_settings_for
from glomscan.engines.base import Engine, EngineChoice
from glomscan.engines.parity import mask_dice, parity_check_tiles
from glomscan.engines.torch_engine import TorchEngine
from glomscan.model import load_model
from glomscan.shipped import default_model_path
from glomscan.slides import Slide, TileReader
from glomscan.synthetic import needle_biopsy_slide, scatter_glomeruli, write_synthetic_slide
from glomscan.tiling import TileGrid


class ReplayEngine(Engine):
    """The CPU side alone: returns stored predictions, so blending and labelling do their usual
    work while no model runs. ``probabilities`` (C, T, T) is returned for every tile; a sequence
    (N, C, T, T) is handed out in order, one per tile, starting again after the N-th (views, no
    copies: the engine costs nothing)."""

    backend = "replay"

    def __init__(self, card, probabilities: np.ndarray):
        self.card, self.probabilities = card, probabilities
        self._next = 0

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        if self.probabilities.ndim == 3:
            return np.repeat(self.probabilities[None], len(tiles), axis=0)
        i, n = self._next, len(tiles)
        self._next = (i + n) % len(self.probabilities)
        if i + n <= len(self.probabilities):
            return self.probabilities[i:i + n]
        return np.take(self.probabilities, np.arange(i, i + n) % len(self.probabilities), axis=0)


def analyse(slides: Path, out: Path, model, engine: Engine, settings: AnalysisSettings) -> tuple[float, int]:
    t0 = time.perf_counter()
    report = run_batch(slides, out, model, engine, EngineChoice(engine.backend, "benchmark"), settings,
                       force=True, quiet=True).reports[0]
    assert report.status == "ok", report.reason
    return time.perf_counter() - t0, report.tiles_tissue


class GpuMemorySampler:
    """The most GPU memory in use (MiB, all processes, nvidia-smi) while it runs; None without
    nvidia-smi."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_mib, self._stop = interval_s, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if shutil.which("nvidia-smi") else None

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.peak_mib = max(self.peak_mib or 0, max(int(v) for v in out))
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


def slides_in_flight_run(needle_slide: Path, tmp: Path, model, model_path: Path, device: str, precision: str,
                         settings: AnalysisSettings, ks: list[int], network_tiles_per_s: float | None,
                         time_budget_s: float, quick: bool) -> dict:
    """A batch of copies of one needle biopsy for each K (2K slides, at least 4), timed from the
    batch's start to its end (worker start-up included); stops before a K whose estimated time
    would pass ``time_budget_s``."""
    from glomscan.cluster import BackendEngine, run_slide_workers_batch
    from glomscan.engines import EngineOptions

    make_engine = BackendEngine("torch", EngineOptions(precision=precision), batch_size_auto=True)
    results, started, last_rate = {}, time.perf_counter(), None
    for k in ks:
        n = max(4, 2 * k)
        if last_rate and time.perf_counter() - started + n / last_rate * 1.5 > time_budget_s:
            print(f"K={k}: skipped (time budget of {time_budget_s:.0f} s)", flush=True)
            break
        slides = tmp / f"batch-{k}"
        slides.mkdir()
        for i in range(n):
            os.link(needle_slide, slides / f"biopsy-{i:02d}.tif")
        t0 = time.perf_counter()
        with GpuMemorySampler() as memory:
            if k == 1:
                engine = TorchEngine(model, device, precision)
                outcome = run_batch(slides, tmp / f"out-batch-{k}", model, engine, EngineChoice("torch", "benchmark"),
                                    replace(settings, batch_size=engine.preferred_batch_size), force=True, quiet=True)
                del engine
            else:
                outcome = run_slide_workers_batch(slides, tmp / f"out-batch-{k}", model, make_engine, settings, k,
                                                  force=True, quiet=True)
        seconds = time.perf_counter() - t0
        assert all(r.status == "ok" for r in outcome.reports), [r.reason for r in outcome.reports]
        tiles = sum(r.tiles_tissue for r in outcome.reports)
        worker_peaks = [r.gpu_memory_peak_mib for r in outcome.reports if r.gpu_memory_peak_mib is not None]
        last_rate = n / seconds
        per_slide_s = float(np.mean([r.runtime_s for r in outcome.reports]))
        results[k] = {"slides": n, "seconds": round(seconds, 2), "slides_per_hour": round(3600 * n / seconds, 1),
                      # without the workers' start-up: K slides every mean slide time
                      "slides_per_hour_steady": round(3600 * k / per_slide_s, 1),
                      "seconds_per_slide_in_a_worker": round(per_slide_s, 2),
                      "tiles_per_s": round(tiles / seconds, 2),
                      "end_to_end_over_network_only": round(tiles / seconds / network_tiles_per_s, 3)
                      if network_tiles_per_s else None,
                      "gpu_memory_peak_mib_all": memory.peak_mib,
                      "gpu_memory_peak_mib_per_worker": max(worker_peaks) if worker_peaks else None}
        r = results[k]
        print(f"K={k:2d}: {n} needle biopsies in {seconds:.1f} s -> {r['slides_per_hour']:.0f} slides/hour "
              f"(start-up included; {r['slides_per_hour_steady']:.0f} from the {per_slide_s:.2f} s a slide takes in "
              f"a worker), "
              f"{r['tiles_per_s']:.1f} tiles/s, end to end / network only {r['end_to_end_over_network_only']}, "
              f"GPU memory peak {r['gpu_memory_peak_mib_all']} MiB in all, {r['gpu_memory_peak_mib_per_worker']} "
              f"MiB per worker", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small slides and 512 px tiles (a CPU check)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--readers", default="1,2,4,8,16", help="tile-reader thread counts for the CPU-side run")
    ap.add_argument("--batch-size", type=int, default=None, help="tiles per engine call (default 8 on CUDA, 1 on CPU)")
    ap.add_argument("--slides-in-flight", default="1,2,4,8,16",
                    help="K values of the batch run (slide worker processes sharing the GPU)")
    ap.add_argument("--time-budget-s", type=float, default=150.0, help="time budget of the slides-in-flight runs")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: precisions, cpu-side")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cuda = args.device.startswith("cuda")
    precisions = ["fp32", "fp16"] if cuda else ["fp32"]
    batch = args.batch_size or (8 if cuda else 1)
    readers = [int(r) for r in args.readers.split(",")]
    model_path = args.model or default_model_path()
    tile = 512 if args.quick else 1024
    w, h = (6000, 4000) if args.quick else (16000, 12000)
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "cpu_count": os.cpu_count(),
                     "tile": tile, "batch": batch, "model": str(model_path)}
    settings = analysis_settings_for(load_model(model_path).card, tile, batch_size=batch, workers=max(4, min(readers)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tissue = [(int(w * 0.05), int(h * 0.05), int(w * 0.6), int(h * 0.95)),
                  (int(w * 0.65), int(h * 0.2), int(w * 0.95), int(h * 0.8))]
        slides = tmp / "slides"
        slides.mkdir()
        write_synthetic_slide(slides / "bench.tif", w, h, scatter_glomeruli(tissue, 60, (80, 150), 0.3), tissue,
                              mpp=0.5, compression="jpeg")
        slide = Slide(slides / "bench.tif")
        image, _ = slide.image_at(2.0)
        tiles = TileGrid(image.width, image.height, tile, settings.stride).tissue_tiles(slide.tissue(2.0, 1.0, settings.tissue))
        reader = TileReader(image, tile)
        pixels = np.stack([reader.read(t.x, t.y) for t in tiles])
        n = len(tiles)
        results.update(slide_px=[w, h], analysis_px=[image.width, image.height], tissue_tiles=n,
                       setup_s=round(time.perf_counter() - t0, 1))
        print(f"{results['device']}, {os.cpu_count()} CPUs; slide {w}x{h} px -> {n} tissue tiles of {tile} px, "
              f"batch {batch}", flush=True)

        model = load_model(model_path)
        real, real_source = parity_check_tiles(tile, model.card.analysis_mpp)
        outputs, real_outputs = {}, {}
        for precision in precisions:
            engine = TorchEngine(model, args.device, precision)
            for i in range(0, min(n, 2 * batch), batch):  # warm-up: cuDNN autotuning, allocator
                engine.predict(pixels[i:i + batch])
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                out = engine.predict(pixels[i:i + batch])
                if i == 0:
                    outputs[precision] = out
            model_only = time.perf_counter() - t0
            if cuda:  # the real-tissue comparison below is of the GPU precisions
                real_outputs[precision] = engine.predict(real)
            end_to_end, inferred = analyse(slides, tmp / f"out-{precision}", model, engine, settings)
            assert inferred == n
            results[precision] = {"model_only_tiles_per_s": round(n / model_only, 2),
                                  "end_to_end_tiles_per_s": round(n / end_to_end, 2),
                                  "pipeline_efficiency": round(model_only / end_to_end, 3)}
            print(f"torch {precision}: model only {n / model_only:.1f} tiles/s, end to end {n / end_to_end:.1f} tiles/s, "
                  f"efficiency {model_only / end_to_end:.3f}", flush=True)
            del engine
        if "fp16" in outputs:
            results["fp16_vs_fp32_mask_dice"] = round(mask_dice(outputs["fp16"], outputs["fp32"]), 5)
            print(f"fp16 vs fp32 mask Dice (first batch): {results['fp16_vs_fp32_mask_dice']}", flush=True)
            real_outputs["bf16"] = TorchEngine(model, args.device, "bf16").predict(real)
            for precision in ("fp16", "bf16"):
                dice = round(mask_dice(real_outputs[precision], real_outputs["fp32"]), 5)
                results[f"{precision}_vs_fp32_mask_dice_real_tissue"] = dice
                print(f"{precision} vs fp32 mask Dice on {len(real)} {real_source}: {dice}", flush=True)

        replay = ReplayEngine(model.card, outputs[precisions[-1]][0])
        results["cpu_side_tiles_per_s"] = {}
        for r in readers if "cpu-side" not in skip else []:
            seconds, _ = analyse(slides, tmp / f"out-replay-{r}", model, replay,
                                 analysis_settings_for(model.card, tile, batch_size=batch, workers=r))
            results["cpu_side_tiles_per_s"][r] = round(n / seconds, 2)
            print(f"CPU side (replay engine), {r:2d} reader threads: {n / seconds:.1f} tiles/s", flush=True)

        # needle biopsy: three cores 0.9 mm wide, 3-7 mm long, in a 10 x 6 mm region (vs_monai.py)
        needle = tmp / "needle"
        needle.mkdir()
        biopsy = needle_biopsy_slide(needle / "biopsy.tif", args.quick)
        nw, nh = biopsy.width, biopsy.height
        engine = TorchEngine(model, args.device, precisions[-1])
        analyse(needle, tmp / "needle-warm", model, engine, settings)
        seconds, inferred = analyse(needle, tmp / "needle-out", model, engine, settings)
        results["needle_biopsy"] = {"seconds": round(seconds, 2), "tissue_tiles": inferred,
                                    "slides_per_hour_one_process": round(3600 / seconds, 1)}
        print(f"needle biopsy {nw}x{nh} px ({inferred} tissue tiles), torch {precisions[-1]}: {seconds:.2f} s "
              f"-> {3600 / seconds:.0f} slides/hour in one process", flush=True)
        del engine
        ks = [int(k) for k in args.slides_in_flight.split(",") if k]
        network = results[precisions[-1]]["model_only_tiles_per_s"]
        print(f"slides in flight {ks}, torch {precisions[-1]}; network only {network} tiles/s", flush=True)
        results["slides_in_flight"] = slides_in_flight_run(
            needle / "biopsy.tif", tmp, model, Path(model_path), args.device, precisions[-1], settings, ks, network,
            args.time_budget_s, args.quick)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
