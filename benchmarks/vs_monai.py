"""glomscan vs MONAI sliding-window inference on the same slide region.

Both use the same model through the same ONNX Runtime session settings, 1024 px windows with
50 % overlap and gaussian blending (glomscan --blend gaussian, MONAI mode="gaussian",
sigma_scale=0.125). MONAI needs the region in memory: the whole analysis-resolution image is
read into one tensor first (that read is part of its time, as reading is part of glomscan's).
Each side runs in its own process; peak RSS is that process's maxrss.

    python benchmarks/vs_monai.py [--quick] [--model CKPT]     (needs: pip install monai)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_monai(slide_path: Path, model_path: Path, tile: int, engine_dir: Path, out_npy: Path) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from glomscan.engines.base import normalise
    from glomscan.engines.onnx import OnnxRuntimeEngine, cached_onnx
    from glomscan.model import load_model
    from glomscan.imaging import image_to_array
    from glomscan.slides import Slide

    t0 = time.perf_counter()
    model = load_model(model_path)
    engine = OnnxRuntimeEngine(model, cached_onnx(model, engine_dir))
    slide = Slide(slide_path)
    image, _ = slide.image_at(model.card.analysis_mpp / slide.mpp)
    pixels = image_to_array(image)
    x = torch.from_numpy(normalise(pixels[None], model.card))

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(engine.session.run(["probabilities"], {"image": batch.numpy()})[0])

    probs = sliding_window_inference(x, roi_size=(tile, tile), sw_batch_size=1, predictor=predictor, overlap=0.5,
                                     mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0.0)[0].numpy()
    fg = probs.max(axis=0) >= 0.5
    labels = np.where(fg, probs.argmax(axis=0) + 1, 0).astype(np.uint8)
    np.save(out_npy, labels)
    return {"seconds": time.perf_counter() - t0, "windows": None}


def run_glomscan(slide_path: Path, model_path: Path, tile: int, engine_dir: Path, out_dir: Path) -> dict:
    from glomscan.batch import run_batch
    from glomscan.config import analysis_settings_for
    from glomscan.engines import EngineOptions, create_engine
    from glomscan.model import load_model

    t0 = time.perf_counter()
    model = load_model(model_path)
    engine, choice = create_engine("onnxruntime", model, EngineOptions(engine_dir=engine_dir, tile=tile))
    settings = analysis_settings_for(model.card, tile, tile // 2, batch_size=1, workers=2, blend="gaussian",
                                     min_glomerulus_area_um2=0.0)  # 50 % overlap, as MONAI's
    outcome = run_batch(slide_path.parent, out_dir, model, engine, choice, settings, quiet=True)
    report = outcome.reports[0]
    assert report.status == "ok", report.reason
    return {"seconds": time.perf_counter() - t0, "tiles": report.tiles_tissue, "tiles_total": report.tiles_total}


def child(kind: str, args: list[str]) -> tuple[dict, float]:
    """Run one side in a fresh process; returns its JSON result and peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{kind} run failed")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller slide, 512 px windows")
    ap.add_argument("--model", type=Path, help="checkpoint (default: the shipped model, else random-init B3)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, slide, model, tile, engine_dir, out = args.child
        fn = run_monai if kind == "monai" else run_glomscan
        print(json.dumps(fn(Path(slide), Path(model), int(tile), Path(engine_dir), Path(out))))
        return

    from glomscan.model import ModelCard, build_model, save_checkpoint
    from glomscan.shipped import default_model_path
    from glomscan.synthetic import needle_biopsy_slide

    tile = 512 if args.quick else 1024
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or default_model_path()
        if model is None:
            import torch

            torch.manual_seed(0)
            card = ModelCard(name="bench-random-b3", tile=tile)
            model = tmp / "model.pt"
            save_checkpoint(model, build_model(card), card)
        # a transplant needle-biopsy layout (synthetic.needle_biopsy_slide)
        slides = tmp / "slides"
        slides.mkdir()
        slide = needle_biopsy_slide(slides / "region.tif", args.quick)
        common = [str(slide.path), str(model), str(tile), str(tmp / "engines")]
        # export once up front so neither side pays for it
        subprocess.run([sys.executable, "-c", "import sys; from glomscan.model import load_model; "
                        "from glomscan.engines.onnx import cached_onnx; cached_onnx(load_model(sys.argv[1]), sys.argv[2])",
                        str(model), str(tmp / "engines")], check=True)
        g, g_rss = child("glomscan", [*common, str(tmp / "out")])
        m, m_rss = child("monai", [*common, str(tmp / "monai.npy")])

        import pyvips

        mask = pyvips.Image.tiffload(str(tmp / "out" / "region" / "mask.tif"), page=0)
        ours = np.frombuffer(mask.write_to_memory(), np.uint8).reshape(mask.height, mask.width)
        theirs = np.load(tmp / "monai.npy")
    print(f"region {slide.width}x{slide.height} px at 0.5 µm/px -> analysis {ours.shape[1]}x{ours.shape[0]}; window {tile}, overlap 50 %, "
          f"gaussian; onnxruntime CPU, batch 1 on both sides")
    print(f"glomscan: {g['seconds']:.1f} s, {g['tiles']} of {g['tiles_total']} tiles inferred (tissue only), peak RSS {g_rss:.0f} MiB")
    print(f"MONAI:    {m['seconds']:.1f} s, every window inferred, peak RSS {m_rss:.0f} MiB")
    print(f"speed-up glomscan vs MONAI: {m['seconds'] / g['seconds']:.2f}x; memory glomscan/MONAI: {g_rss / m_rss:.2f}")
    print(f"mask agreement (Dice): glomerulus {dice(ours > 0, theirs > 0):.4f}, normal {dice(ours == 1, theirs == 1):.4f}, "
          f"sclerosed {dice(ours == 2, theirs == 2):.4f}")


if __name__ == "__main__":
    main()
