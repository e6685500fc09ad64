"""research/ablation_synthetic.py runs end to end on tiny data (issue #15, item 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from glomscan.augment.inpaint import save_generator
from glomscan.augment.inpaint_models import InpaintGenerator
from glomscan.augment.maskgan import MaskGanSettings, train_mask_gan

from test_outline_crops import ellipse, make_crop_set

ROOT = Path(__file__).resolve().parents[2]


def make_tiles(folder, n=6, side=256, seed=1):
    """Pink tissue tiles, each with one outlined glomerulus in a corner."""
    from glomscan.imaging import write_png

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        image = (np.array((215, 150, 195)) + rng.integers(-15, 15, (side, side, 3))).clip(0, 255).astype(np.uint8)
        write_png(folder / "images" / f"{100 + 10 * i}.png", image)
        write_png(folder / "masks" / f"{100 + 10 * i}.png", ellipse(side, side, 20, 20, 12, 12).astype(np.uint8) * 255)
    return folder


def test_ablation_script_on_tiny_settings(tmp_path):
    crops = make_crop_set(tmp_path / "set", side=40, slides=("a", "b", "c", "d", "e", "f", "g"))
    tiles = make_tiles(tmp_path / "tiles")
    torch.manual_seed(0)
    save_generator(tmp_path / "gen.pt", InpaintGenerator(4, 1), {"size": 64})
    masks = [ellipse(64, 64, 32, 32, 20, 14)] * 4
    train_mask_gan(masks, tmp_path / "maskgan.pt", MaskGanSettings(epochs=1, batch_size=4, base_channels=8), quiet=True)
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "research" / "ablation_synthetic.py"), "--work", str(work),
           "--generator", str(tmp_path / "gen.pt"), "--maskgan", str(tmp_path / "maskgan.pt"),
           "--tiles", str(tiles), "--crops", str(crops), "--amounts", "0", "1", "--seeds", "0",
           "--epochs", "1", "--steps", "1", "--batch-size", "2", "--crop", "64", "--bn-steps", "1",
           "--encoder", "resnet18", "--diameter-range", "16", "24", "--mask-size", "64", "--threads", "1",
           "--report", str(tmp_path / "table.md")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(work / "ablation.csv")
    assert list(table.amount_pct) == [0, 100] and list(table.seed) == [0, 0]
    real = table.synthetic_glomeruli.iloc[1]
    assert table.synthetic_glomeruli.iloc[0] == 0 and real > 0
    synthesis = pd.read_csv(work / "plus100" / "synthesis.csv")
    assert len(synthesis) == real
    # the same validation patches score every model: no synthetic patch is in validation
    manifest = pd.read_csv(work / "plus100" / "manifest.csv")
    assert not manifest[manifest.split == "val"].synthetic.any()
    text = (tmp_path / "table.md").read_text()
    assert "| +0 % (0) | 1 |" in text and "| +100 % (" in text
    # a rerun resumes: nothing is trained or synthesized again
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert pd.read_csv(work / "ablation.csv").equals(table.assign(train_minutes=pd.read_csv(work / "ablation.csv").train_minutes))
