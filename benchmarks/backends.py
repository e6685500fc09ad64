"""Per-tile inference time of each available backend on this machine, as ratios to torch eager.

    python benchmarks/backends.py [--tile 1024] [--batch 1] [--repeats 3] [--model CKPT]

Default model: a random-init EfficientNet-B3 U-Net (timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glomscan.engines import EngineOptions, create_engine
from glomscan.engines.tensorrt import tensorrt_status
from glomscan.model import ModelCard, build_model, load_checkpoint, save_checkpoint


def seconds_per_tile(engine, tiles: np.ndarray, repeats: int) -> float:
    engine.predict(tiles)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.predict(tiles)
        best = min(best, time.perf_counter() - t0)
    return best / len(tiles)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            torch.manual_seed(0)
            card = ModelCard(name="bench-random-b3", tile=args.tile)
            args.model = Path(tmp) / "model.pt"
            save_checkpoint(args.model, build_model(card), card)
        model = load_checkpoint(args.model)
        tiles = np.random.default_rng(0).integers(0, 256, (args.batch, args.tile, args.tile, 3), dtype=np.uint8)
        options = EngineOptions(engine_dir=Path(tmp) / "engines", tile=args.tile, max_batch=args.batch)
        backends = ["torch", "onnxruntime"] + (["tensorrt"] if tensorrt_status()[0] else [])
        results = {}
        for backend in backends:
            engine, choice = create_engine(backend, model, options)
            results[backend] = seconds_per_tile(engine, tiles, args.repeats)
            print(f"{backend:12s} {engine.description:28s} {results[backend]:7.3f} s/tile  {1 / results[backend]:7.2f} tiles/s", flush=True)
            engine.close()
        if not tensorrt_status()[0]:
            print(f"tensorrt     skipped: {tensorrt_status()[1]}")
    print(f"model {model.card.encoder}, tile {args.tile}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    for backend, s in results.items():
        if backend != "torch":
            print(f"speed-up {backend} vs torch eager: {results['torch'] / s:.2f}x")


if __name__ == "__main__":
    main()
