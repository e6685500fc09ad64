"""Peak RSS of `glomscan analyze` on large synthetic slides (mostly glass, a few tissue islands).

The blending canvas and instance extraction hold about one band of tiles, so peak memory must
not grow with slide area. Each size runs in its own process; peak RSS is that child's maxrss.

    python benchmarks/memory.py [--quick] [--sizes 10000 40000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glomscan.synthetic import scatter_glomeruli, write_synthetic_slide


def islands(size: int, n: int = 3, side: int = 2500) -> list[tuple[int, int, int, int]]:
    """n tissue islands of side x side level-0 px along the diagonal."""
    step = size // (n + 1)
    return [(step * (i + 1) - side // 2, step * (i + 1) - side // 2, step * (i + 1) + side // 2, step * (i + 1) + side // 2)
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="6k and 24k slides, small islands, tiny model, 512 px tiles")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    args = ap.parse_args()
    sizes = args.sizes or ([6_000, 24_000] if args.quick else [10_000, 40_000, 100_000])
    side = 1200 if args.quick else 2500
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model.pt"
        init = [sys.executable, "-m", "glomscan.cli", "init-model", "--out", str(model)]
        if args.quick:
            init += ["--encoder", "resnet18"]
        subprocess.run(init, check=True, capture_output=True)
        # export the ONNX once up front, so no measured run pays for the export
        env = {**os.environ, "GLOMSCAN_ENGINE_DIR": str(tmp / "engines")}
        subprocess.run([sys.executable, "-c", "import sys; from glomscan.model import load_model; "
                        "from glomscan.engines.onnx import cached_onnx; cached_onnx(load_model(sys.argv[1]), sys.argv[2])",
                        str(model), str(tmp / "engines")], check=True)
        tile = ["--tile", "512", "--overlap", "256"] if args.quick else []
        rows = []
        for size in sizes:
            slides = tmp / f"s{size}"
            slides.mkdir()
            tissue = islands(size, side=side)
            t0 = time.perf_counter()
            write_synthetic_slide(slides / f"slide{size}.tif", size, size, scatter_glomeruli(tissue, 12, (80, 150), 0.3),
                                  tissue, mpp=0.5, compression="jpeg")
            written = time.perf_counter() - t0
            t0 = time.perf_counter()
            log = open(tmp / f"log{size}", "w+")
            proc = subprocess.Popen([sys.executable, "-m", "glomscan.cli", "analyze", str(slides), "--out",
                                     str(tmp / f"o{size}"), "--model", str(model), "--quiet", *tile],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
            proc.returncode = os.waitstatus_to_exitcode(status)
            elapsed = time.perf_counter() - t0
            peak_mib = usage.ru_maxrss / 1024
            if proc.returncode != 0:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                raise SystemExit(f"analyze failed on {size}²")
            rows.append((size, peak_mib, elapsed, written))
            print(f"{size:>7}² px: peak RSS {peak_mib:8.0f} MiB, analyze {elapsed:6.1f} s (slide written in {written:.1f} s)", flush=True)
    base = rows[0][1]
    for size, peak, _, _ in rows[1:]:
        print(f"peak RSS {size}² / {rows[0][0]}²: {peak / base:.2f}x (slide area {size**2 / rows[0][0]**2:.0f}x)")


if __name__ == "__main__":
    main()
