"""What an analysis-only install saves: its size on disk, and the peak memory of `glomscan
analyze` per backend, with and without torch in the process.

Each run analyses the shipped real-tissue sample (glomscan/sample, the shipped model) in its own
process; peak RSS is that process's maxrss, and the process reports whether torch got imported.
The first run per backend starts with an empty engine cache (OpenVINO then compiles bf16 and
f32 models for its parity check); the later runs find the cache warm, as every run after the
first on a machine does.

    python benchmarks/analysis_footprint.py --venv FULL=.venv --venv ANALYSIS=/tmp/analysis-venv \\
        [--backends torch onnxruntime openvino] [--runs 2]

Make the analysis-only environment with:
    python3 -m venv /tmp/analysis-venv && /tmp/analysis-venv/bin/pip install ".[analysis]"
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, resource, sys, time
from glomscan.cli import main
from glomscan.shipped import SAMPLE_DIR
start = time.perf_counter()
code = 0
try:
    main(["analyze", str(SAMPLE_DIR), *sys.argv[1:]], standalone_mode=False)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_imported": "torch" in sys.modules}))
"""


def venv_size_mib(venv: Path) -> float:
    out = subprocess.run(["du", "-sk", str(venv)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def has_torch(python: Path) -> bool:
    return subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0


def run_once(python: Path, backend: str, work: Path) -> dict:
    out = work / f"out-{backend}"
    proc = subprocess.run([str(python), "-c", RUN, "--out", str(out), "--backend", backend, "--force", "--quiet",
                           "--engine-dir", str(work / "engines")],
                          capture_output=True, text=True, cwd=work)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{python} {backend} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", action="append", required=True, metavar="NAME=PATH",
                    help="A virtual environment with glomscan installed (repeat).")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "openvino"])
    ap.add_argument("--runs", type=int, default=3, help="Runs per backend: one with a cold engine cache, then warm ones.")
    args = ap.parse_args()
    rows = []
    for spec in args.venv:
        name, path = spec.split("=", 1)
        venv = Path(path).resolve()
        python = venv / "bin" / "python"
        torch_installed = has_torch(python)
        print(f"{name}: {venv} {venv_size_mib(venv):,.0f} MiB on disk, torch installed: {torch_installed}")
        with tempfile.TemporaryDirectory() as tmp:
            for backend in args.backends:
                if backend == "torch" and not torch_installed:
                    continue
                runs = [run_once(python, backend, Path(tmp)) for _ in range(args.runs)]
                cold, warm = runs[0], runs[1:] or runs
                rss = [r["peak_rss_mib"] for r in warm]
                rows.append((name, backend, statistics.median(rss), min(rss), max(rss), cold["peak_rss_mib"],
                             statistics.median(r["seconds"] for r in warm), any(r["torch_imported"] for r in runs)))
    print(f"\n{'install':<10} {'backend':<12} {'peak RSS MiB, warm cache (median, min-max)':>44} "
          f"{'cold cache':>11} {'s/run warm':>11}  torch imported")
    for name, backend, median, low, high, cold_rss, seconds, imported in rows:
        print(f"{name:<10} {backend:<12} {median:>26,.0f} ({low:,.0f}-{high:,.0f}) {'':>6} {cold_rss:>11,.0f} "
              f"{seconds:>11.1f}  {imported}")
    by = {(n, b): m for n, b, m, *_ in rows}
    for name, backend, median, *_ in rows:
        if backend != "torch" and (name, "torch") in by:
            print(f"{name} {backend}: {by[(name, 'torch')] - median:,.0f} MiB less than {name} torch "
                  f"({median / by[(name, 'torch')]:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
