"""What a coarse first pass could save: windows inferred with and without one, on a needle biopsy
holding glomeruli at the density measured on real tissue.

The coarse pass this bounds: infer the tissue once without overlap (stride = tile), take every
candidate blob, then infer at the normal stride only the windows that touch a candidate (dilated
by a margin), so that every pixel of a candidate gets exactly the windows of the full run (the
same answer there). Its cost in windows is (first pass + second pass) against the full run's.
The estimate assumes a perfect first pass (every glomerulus a candidate, no false candidate), so
it is the most such a pass can save.

- Density and size of glomeruli: the outlined glomeruli of ``../shared/data/aidpath_tiles`` (real
  PAS tissue, 0.5 µm/px) per mm² of tissue (glomscan's tissue detection), and their equivalent
  diameters.
- Layout: the needle biopsy of ``vs_monai.py`` (three cores 0.9 mm wide in a 10 x 6 mm region) at
  the analysis resolution (1 µm/px), 1024 px windows at stride 512; glomeruli placed at random
  (Poisson) in the cores at the measured density, and at 1/2, 1/4 and 1/8 of it (cores with less
  cortex), 50 draws each.

    python benchmarks/candidate_windows.py [--draws 50] [--margin-um 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from glomscan.config import TissueSettings
from glomscan.imaging import equivalent_diameter, read_png
from glomscan.slides import TissueMask, detect_tissue
from glomscan.tiling import TileGrid

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "aidpath_tiles"
TILE_MPP = 0.5
ANALYSIS_MPP = 1.0
TILE_PX, STRIDE_PX = 1024, 512  # the full run counted here is at stride 512 (the default before stride 768)
REGION_UM = (10000, 6000)
CORES_UM = [(500, 600, 7500, 1500), (2000, 2700, 8000, 3600), (1000, 4680, 4500, 5580)]
"""(x0, y0, x1, y1) µm: the cores of synthetic.needle_biopsy_slide (0.9 mm wide)."""


def measured_density_and_diameters() -> tuple[float, np.ndarray, int, float]:
    """(glomeruli per mm² of tissue, equivalent diameters µm, glomeruli, tissue mm²)."""
    from scipy import ndimage

    diameters, tissue_mm2 = [], 0.0
    for mask_path in sorted((SHARED / "masks").glob("*.png")):
        mask = read_png(mask_path)
        mask = (mask.max(axis=-1) if mask.ndim == 3 else mask) > 0
        labels, n = ndimage.label(mask)
        for i in range(1, n + 1):
            diameters.append(equivalent_diameter(float((labels == i).sum())) * TILE_MPP)
        image = read_png(SHARED / "images" / mask_path.name)
        tissue = detect_tissue(image[..., :3], 1.0, TILE_MPP, TissueSettings())
        tissue_mm2 += tissue.area_px() * TILE_MPP ** 2 / 1e6
    return len(diameters) / tissue_mm2, np.asarray(diameters), len(diameters), tissue_mm2


def windows(density_per_mm2: float, diameters_um: np.ndarray, margin_um: float, rng) -> tuple[int, int, int]:
    """(full run's windows, first pass's, second pass's) for one random draw of glomeruli."""
    width, height = REGION_UM  # at 1 µm/px, µm = px
    down = 8
    mask = np.zeros((height // down, width // down), bool)
    for x0, y0, x1, y1 in CORES_UM:
        mask[y0 // down:y1 // down, x0 // down:x1 // down] = True
    tissue = TissueMask(mask, float(down), 0.0)
    full = TileGrid(width, height, TILE_PX, STRIDE_PX).tissue_tiles(tissue)
    first = TileGrid(width, height, TILE_PX, TILE_PX).tissue_tiles(tissue)
    boxes = []
    for x0, y0, x1, y1 in CORES_UM:
        n = rng.poisson(density_per_mm2 * (x1 - x0) * (y1 - y0) / 1e6)
        for cx, cy, d in zip(rng.uniform(x0, x1, n), rng.uniform(y0, y1, n), rng.choice(diameters_um, n)):
            r = d / 2 + margin_um
            boxes.append((cx - r, cy - r, cx + r, cy + r))
    second = [t for t in full if any(bx0 < t.x + TILE_PX and t.x < bx1 and by0 < t.y + TILE_PX and t.y < by1
                                     for bx0, by0, bx1, by1 in boxes)]
    return len(full), len(first), len(second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--margin-um", type=float, default=32.0)
    args = parser.parse_args()
    if not (SHARED / "masks").is_dir():
        raise SystemExit(f"needs the real outlined tiles at {SHARED}")
    density, diameters, n, mm2 = measured_density_and_diameters()
    print(f"real PAS tiles: {n} outlined glomeruli in {mm2:.2f} mm² of tissue = {density:.2f} per mm²; "
          f"equivalent diameter {np.median(diameters):.0f} µm median ({diameters.min():.0f}-{diameters.max():.0f})")
    rng = np.random.default_rng(0)
    print("density (per mm²) | full run windows | first pass | second pass (mean, min-max) | coarse pass cost / full run")
    for fraction in (1, 1 / 2, 1 / 4, 1 / 8):
        draws = [windows(density * fraction, diameters, args.margin_um, rng) for _ in range(args.draws)]
        full, first = draws[0][0], draws[0][1]
        second = np.array([d[2] for d in draws])
        ratio = (first + second) / full
        print(f"{density * fraction:.2f} | {full} | {first} | {second.mean():.1f} ({second.min()}-{second.max()}) | "
              f"{ratio.mean():.2f} ({ratio.min():.2f}-{ratio.max():.2f})")


if __name__ == "__main__":
    main()
