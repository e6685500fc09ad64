"""Pipeline efficiency: end-to-end analyze tiles/s divided by model-only tiles/s on the same tiles.

A ratio near 1 means reading, tissue filtering, blending, instance extraction and writing hide
behind inference. Both numbers come from one run on the same machine (absolute seconds on a
shared machine are not comparable between runs; the ratio is).

    python benchmarks/pipeline_efficiency.py [--quick] [--backend torch] [--model CKPT]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings
from glomscan.engines import EngineOptions, create_engine
from glomscan.model import ModelCard, build_model, load_model, save_checkpoint
from glomscan.slides import Slide, TileReader
from glomscan.synthetic import scatter_glomeruli, write_synthetic_slide
from glomscan.tiling import TileGrid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small slide and 512 px tiles (about a minute)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--model", type=Path, help="checkpoint (default: random-init EfficientNet-B3 U-Net)")
    ap.add_argument("--batch-size", type=int, default=2, help="tiles per engine call")
    ap.add_argument("--readers", type=int, default=2, help="tile reader threads")
    args = ap.parse_args()
    torch.manual_seed(0)
    tile, size = (512, (4000, 3000)) if args.quick else (1024, (9000, 7000))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model is None:
            card = ModelCard(name="bench-random-b3", tile=tile)
            args.model = tmp / "model.pt"
            save_checkpoint(args.model, build_model(card), card)
        model = load_model(args.model)
        engine, choice = create_engine(args.backend, model, EngineOptions(engine_dir=tmp / "engines", tile=tile))
        w, h = size
        tissue = [(int(w * 0.05), int(h * 0.05), int(w * 0.6), int(h * 0.95)), (int(w * 0.65), int(h * 0.2), int(w * 0.95), int(h * 0.8))]
        slides = tmp / "slides"
        slides.mkdir()
        write_synthetic_slide(slides / "bench.tif", w, h, scatter_glomeruli(tissue, 20, (80, 150), 0.3), tissue,
                              mpp=0.5, compression="jpeg")
        settings = AnalysisSettings(tile=tile, overlap=tile // 2, batch_size=args.batch_size, workers=args.readers)

        # the tiles analyze will infer, read once into memory for the model-only timing
        slide = Slide(slides / "bench.tif")
        image, _ = slide.image_at(2.0)
        tissue_mask = slide.tissue(2.0, 1.0, settings.tissue)
        tiles = TileGrid(image.width, image.height, tile, settings.stride).tissue_tiles(tissue_mask)
        reader = TileReader(image, tile)
        pixels = [reader.read(t.x, t.y) for t in tiles]
        engine.predict(np.stack(pixels[:2]))  # warm-up (allocator, lazy init)

        t0 = time.perf_counter()
        for i in range(0, len(pixels), settings.batch_size):
            engine.predict(np.stack(pixels[i:i + settings.batch_size]))
        model_only = time.perf_counter() - t0

        t0 = time.perf_counter()
        outcome = run_batch(slides, tmp / "out", model, engine, choice, settings, quiet=True)
        end_to_end = time.perf_counter() - t0
        report = outcome.reports[0]
        assert report.status == "ok", report.reason
        assert report.tiles_tissue == len(tiles)

    n = len(tiles)
    print(f"backend: {choice.backend} ({choice.reason}); model {model.card.encoder}; tile {tile}, stride {settings.stride}")
    print(f"slide: {w}x{h} px at 0.5 µm/px -> analysis {image.width}x{image.height}; {n} tissue tiles")
    print(f"model only:  {n / model_only:.3f} tiles/s ({model_only:.1f} s)")
    print(f"end to end:  {n / end_to_end:.3f} tiles/s ({end_to_end:.1f} s, of which inference {report.inference_s:.1f} s)")
    print(f"pipeline efficiency (end-to-end / model-only tiles/s): {model_only / end_to_end:.3f}")


if __name__ == "__main__":
    main()
