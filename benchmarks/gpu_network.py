"""The network alone on a CUDA GPU (input already on the GPU, no pipeline): tiles/s of the
EfficientNet-B3 U-Net per precision and memory layout, each precision's masks against fp32, and
the device-to-host copy of one batch's probabilities into pageable vs pinned memory.

    python benchmarks/gpu_network.py [--model CKPT] [--batch 8] [--tile 1024]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from glomscan.model import load_model
from glomscan.shipped import default_model_path


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tile", type=int, default=1024)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    module = load_model(args.model or default_model_path()).torch_module().cuda().eval()
    x = torch.rand(args.batch, 3, args.tile, args.tile, device="cuda")
    masks = {}
    for name, dtype, channels_last in [("fp32", None, False), ("fp16", torch.float16, False),
                                       ("fp16+channels_last", torch.float16, True),
                                       ("bf16+channels_last", torch.bfloat16, True)]:
        m = module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
        out = {}

        def run():
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                out["y"] = m(xi)

        seconds = timed(run, 20)
        masks[name] = torch.sigmoid(out["y"].float()) > 0.5
        agree = (masks[name] == masks["fp32"]).float().mean().item()
        print(f"{name:20s} {args.batch / seconds:7.1f} tiles/s ({args.tile} px, batch {args.batch}); "
              f"mask pixels agreeing with fp32 {agree:.6f}", flush=True)
    p = torch.rand(args.batch, 2, args.tile, args.tile, device="cuda")
    pinned = torch.empty(p.shape, pin_memory=True)
    half, pinned_half = p.half(), torch.empty(p.shape, dtype=torch.float16, pin_memory=True)
    for name, fn in [("to pageable fp32", lambda: p.cpu()), ("to pinned fp32", lambda: pinned.copy_(p)),
                     ("to pinned fp16", lambda: pinned_half.copy_(half)),
                     ("pinned -> numpy copy", lambda: pinned.numpy().copy())]:
        print(f"device-to-host, one batch of probabilities, {name:22s} {1000 * timed(fn, 5):6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
