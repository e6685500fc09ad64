"""OpenVINO on the CPU: does batching or the throughput hint infer a tile faster than one tile at
a time with the latency hint (what the openvino engine uses)?

The shipped model, bf16 where the CPU has it (f32 elsewhere), one random 1024² tile; in each
round, in turn: the latency hint with batch 1 and batch 2, then the throughput hint with its
optimal number of asynchronous requests (8 tiles in flight). Prints seconds per tile (median of
several calls) and each mode's ratio to latency batch 1 within the round.

    python benchmarks/openvino_modes.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import openvino as ov

    from glomscan.engines.base import normalise
    from glomscan.engines.openvino import cpu_has_bf16
    from glomscan.model import load_model
    from glomscan.shipped import default_model_path

    path = default_model_path()
    model = load_model(path)
    core = ov.Core()
    precision = "bf16" if cpu_has_bf16(core) else "f32"
    print(f"{core.get_property('CPU', 'FULL_DEVICE_NAME')}, OpenVINO {ov.__version__.split('-')[0]}, {precision}, "
          f"{model.model_id}")
    one = normalise(np.random.default_rng(0).integers(0, 255, (1, 1024, 1024, 3), dtype=np.uint8), model.card)
    two = np.concatenate([one, one])
    ratios: dict[str, list[float]] = {"latency, batch 2": [], "throughput": []}
    for r in range(1, args.rounds + 1):
        latency = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                        "PERFORMANCE_HINT": "LATENCY"})
        request = latency.create_infer_request()
        b1 = median_seconds(lambda: request.infer({0: one}), 5)
        b2 = median_seconds(lambda: request.infer({0: two}), 4) / 2
        throughput = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                           "PERFORMANCE_HINT": "THROUGHPUT"})
        n = throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = ov.AsyncInferQueue(throughput, n)

        def eight():
            for _ in range(8):
                queue.start_async({0: one})
            queue.wait_all()

        tp = median_seconds(eight, 3) / 8
        ratios["latency, batch 2"].append(b1 / b2)
        ratios["throughput"].append(b1 / tp)
        print(f"round {r}: s per tile: latency batch 1 {b1:.3f}, batch 2 {b2:.3f} (x{b1 / b2:.2f}), "
              f"throughput with {n} requests {tp:.3f} (x{b1 / tp:.2f})", flush=True)
    for name, values in ratios.items():
        print(f"{name} against latency batch 1 (speed-up): {min(values):.2f}-{max(values):.2f} "
              f"(median {statistics.median(values):.2f}) over {len(values)} rounds")


if __name__ == "__main__":
    main()
