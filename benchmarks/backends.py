"""Per-tile inference time of each available backend on this machine, as ratios to torch eager
and to ONNX Runtime, and each backend's masks against ONNX Runtime fp32 on the real PAS tiles of
the shipped sample (mask Dice).

    python benchmarks/backends.py [--tile 1024] [--batch 1] [--repeats 3] [--model CKPT]

Default model: the shipped one (timing does not depend on the weights; the masks do).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glomscan.engines import EngineOptions, create_engine
from glomscan.engines.openvino import openvino_status
from glomscan.engines.parity import mask_dice, real_tissue_tiles
from glomscan.engines.tensorrt import tensorrt_status
from glomscan.model import ModelCard, build_model, load_model, save_checkpoint
from glomscan.shipped import default_model_path


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
        args.model = args.model or default_model_path()
        if args.model is None:
            torch.manual_seed(0)
            card = ModelCard(name="bench-random-b3", tile=args.tile)
            args.model = Path(tmp) / "model.pt"
            save_checkpoint(args.model, build_model(card), card)
        model = load_model(args.model)
        tiles = np.random.default_rng(0).integers(0, 256, (args.batch, args.tile, args.tile, 3), dtype=np.uint8)
        real = real_tissue_tiles(args.tile, model.card.analysis_mpp)
        options = EngineOptions(engine_dir=Path(tmp) / "engines", tile=args.tile, max_batch=args.batch)
        runs = [("torch", "fp16"), ("onnxruntime", "fp16")]
        if openvino_status()[0]:
            runs += [("openvino", "fp32"), ("openvino", "fp16")]  # fp16 flag: OpenVINO's auto (bf16 where the CPU has it)
        if tensorrt_status()[0]:
            runs.append(("tensorrt", "fp16"))
        results, reference = {}, None
        for backend, precision in runs:
            engine, choice = create_engine(backend, model, EngineOptions(**{**options.__dict__, "precision": precision}))
            name = engine.description
            results[name] = seconds_per_tile(engine, tiles, args.repeats)
            agreement = ""
            if real is not None:
                masks = engine.predict(real)
                reference = masks if backend == "onnxruntime" else reference
                if reference is not None:
                    agreement = f"  mask Dice vs onnxruntime on {len(real)} real tiles {mask_dice(masks, reference):.4f}"
            print(f"{name:28s} {results[name]:7.3f} s/tile  {1 / results[name]:7.2f} tiles/s{agreement}", flush=True)
            engine.close()
        if not tensorrt_status()[0]:
            print(f"tensorrt     skipped: {tensorrt_status()[1]}")
    print(f"model {model.card.encoder}, tile {args.tile}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    torch_s = next(v for k, v in results.items() if k.startswith("torch"))
    ort_s = next(v for k, v in results.items() if k.startswith("onnxruntime"))
    for name, seconds in results.items():
        if not name.startswith("torch"):
            print(f"speed-up {name}: {torch_s / seconds:.2f}x vs torch eager, {ort_s / seconds:.2f}x vs onnxruntime")


if __name__ == "__main__":
    main()
