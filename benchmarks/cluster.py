"""Slides per hour: single process vs a local Dask cluster of 1 and 2 worker processes (CPU).

Same synthetic slides, the same model through ONNX Runtime, the same cores: the single process
and the 1-worker cluster use every core in one ONNX Runtime session, the 2-worker cluster gives
each worker half of them (OMP_NUM_THREADS / intra-op threads = cores / workers). Each cluster is
started and warmed up (one small slide per worker loads the model) before the timed batch, which
is then submitted through the scheduler's address (the --cluster tcp:// path): slides/hour is
steady-state throughput; the start-up is printed separately.

    python benchmarks/cluster.py [--slides 4] [--side 4000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from glomscan.batch import run_batch
from glomscan.cluster import BackendEngine, run_cluster_batch, start_local_cluster, worker_environments
from glomscan.config import analysis_settings_for
from glomscan.engines import EngineOptions, create_engine
from glomscan.model import ModelCard, build_model, load_model, save_checkpoint
from glomscan.shipped import default_model_path
from glomscan.synthetic import scatter_glomeruli, write_synthetic_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--side", type=int, default=4000, help="slide side, level-0 px at 0.5 µm/px")
    ap.add_argument("--quick", action="store_true", help="tiny network and 256 px tiles instead of the shipped model")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            torch.manual_seed(0)
            card = ModelCard(name="bench-tiny", encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), tile=256)
            save_checkpoint(tmp / "m.pt", build_model(card), card)
            model_path, tile = tmp / "m.pt", 256
        else:
            model_path, tile = default_model_path(), 1024
        model = load_model(model_path)
        settings = analysis_settings_for(model.card, tile, batch_size=1)
        options = EngineOptions(engine_dir=tmp / "engines", tile=tile)
        slides = tmp / "slides"
        slides.mkdir()
        s = args.side
        tissue = [(300, 300, s - 300, s - 300)]
        for i in range(args.slides):
            write_synthetic_slide(slides / f"s{i:02d}.tif", s, s, scatter_glomeruli(tissue, 8, (80, 150), 0.3, seed=i),
                                  tissue, mpp=0.5, seed=i, compression="jpeg")
        print(f"{args.slides} synthetic slides {s}x{s} px at 0.5 µm/px, model {model.model_id} "
              f"({model.card.encoder}, {tile} px tiles, stride {settings.stride}), onnxruntime CPU, {cores} cores", flush=True)

        warm = tmp / "warm"
        warm.mkdir()
        for i in range(2):  # one small slide per worker: starts the workers and loads the model on each
            write_synthetic_slide(warm / f"w{i}.tif", 1500, 1500, [], [(200, 200, 1300, 1300)], mpp=0.5, seed=i)

        results = {}
        engine, choice = create_engine("onnxruntime", model, options)  # exports the ONNX file once, up front
        t0 = time.perf_counter()
        outcome = run_batch(slides, tmp / "out-single", model, engine, choice, settings, quiet=True)
        results["single process"] = time.perf_counter() - t0
        engine.close()
        tiles = sum(r.tiles_tissue for r in outcome.reports)
        assert not outcome.failed, [r.reason for r in outcome.failed]
        for workers in (1, 2):
            # a local cluster reached through its address (the --cluster tcp:// path), warmed up first,
            # so the timed batch is steady-state throughput; the start-up is reported on its own
            t0 = time.perf_counter()
            cluster = start_local_cluster(worker_environments([], workers, cores), "SLOT")
            try:
                run_cluster_batch(warm, tmp / f"warm-{workers}", model, BackendEngine("onnxruntime", options), settings,
                                  cluster=cluster.scheduler_address, quiet=True)
                startup = time.perf_counter() - t0
                t0 = time.perf_counter()
                outcome = run_cluster_batch(slides, tmp / f"out-{workers}", model, BackendEngine("onnxruntime", options),
                                            settings, cluster=cluster.scheduler_address, quiet=True)
                results[f"Dask, {workers} worker(s)"] = time.perf_counter() - t0
            finally:
                cluster.close()
            assert not outcome.failed, [r.reason for r in outcome.failed]
            print(f"Dask, {workers} worker(s): start-up + model load + warm-up slide {startup:.1f} s", flush=True)
        for name, seconds in results.items():
            print(f"{name:>20}: {seconds:7.1f} s for {args.slides} slides ({tiles} tissue tiles): "
                  f"{3600 * args.slides / seconds:7.1f} slides/hour", flush=True)
        ratio = results["Dask, 1 worker(s)"] / results["Dask, 2 worker(s)"]
        print(f"slides/hour, 2 vs 1 worker processes: {ratio:.2f}x "
              f"(Dask 1 worker vs single process: {results['single process'] / results['Dask, 1 worker(s)']:.2f}x)")


if __name__ == "__main__":
    main()
