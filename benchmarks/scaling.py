"""Analyze time against tissue area and against slide area.

Same slide size with 1, 2 and 4 tissue islands (time should grow with tissue tiles), and the
same tissue on a slide 4x larger in each direction (time should barely change).

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from glomscan.batch import run_batch
from glomscan.config import analysis_settings_for
from glomscan.engines import EngineOptions, create_engine
from glomscan.model import ModelCard, build_model, load_model, save_checkpoint
from glomscan.synthetic import scatter_glomeruli, write_synthetic_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny network and 512 px tiles")
    args = ap.parse_args()
    tile, side = (512, 2000) if args.quick else (1024, 3000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        card = ModelCard(name="bench", tile=tile, **({"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": (32, 16, 8)} if args.quick else {}))
        save_checkpoint(tmp / "m.pt", build_model(card), card)
        model = load_model(tmp / "m.pt")
        engine, choice = create_engine("onnxruntime", model, EngineOptions(engine_dir=tmp / "engines", tile=tile))
        settings = analysis_settings_for(model.card, tile)
        cases = []
        base = 12_000
        for n_islands, size in ((1, base), (2, base), (4, base), (1, 4 * base)):
            tissue = [(1000 + i * (side + 1000), 1000, 1000 + i * (side + 1000) + side, 1000 + side) for i in range(n_islands)]
            d = tmp / f"case{len(cases)}"
            d.mkdir()
            write_synthetic_slide(d / "s.tif", size, size, scatter_glomeruli(tissue, 4 * n_islands, (80, 150), 0.3), tissue,
                                  mpp=0.5, compression="jpeg")
            t0 = time.perf_counter()
            report = run_batch(d, tmp / f"out{len(cases)}", model, engine, choice, settings, quiet=True).reports[0]
            elapsed = time.perf_counter() - t0
            assert report.status == "ok", report.reason
            cases.append((n_islands, size, report.tiles_tissue, report.tiles_total, elapsed))
            print(f"{size:>6}² px, {n_islands} island(s): {report.tiles_tissue:4d} of {report.tiles_total:5d} tiles inferred, "
                  f"{elapsed:6.1f} s, {elapsed / report.tiles_tissue:.3f} s/tissue tile", flush=True)
    per_tile = [c[4] / c[2] for c in cases[:3]]
    print(f"time per tissue tile, 1/2/4 islands: {per_tile[0]:.3f} / {per_tile[1]:.3f} / {per_tile[2]:.3f} s "
          f"(max/min {max(per_tile) / min(per_tile):.2f})")
    print(f"same tissue, 16x the slide area: time ratio {cases[3][4] / cases[0][4]:.2f}")


if __name__ == "__main__":
    main()
