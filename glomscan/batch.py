"""A folder of slides, overnight: resume, failure isolation, atomic publishing, summary.csv.

Each slide is analysed into a private staging folder inside OUT/.glomscan-staging/ and only
moved to OUT/<slide>/ once every file including report.json is complete. A process killed at
any moment therefore leaves either the previous complete output, nothing, or staging debris
that the next run deletes, never a half-written OUT/<slide>/ that looks done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import AnalysisSettings
from .engines.base import Engine, EngineChoice
from .model import LoadedModel
from .pipeline import OUTPUT_FILES, SlideReport, analyze_slide
from .progress import Progress
from .atomic import atomic_write_text
from .slides import SlideError, file_fingerprint, find_slides

log = logging.getLogger(__name__)

STAGING = ".glomscan-staging"
SUMMARY_COLUMNS = [
    "slide", "status", "reason", "n_glomeruli", "n_normal", "n_sclerosed",
    "percent_global_glomerulosclerosis", "ci95_low", "ci95_high", "tissue_area_mm2",
    "tissue_area_px", "mpp", "mpp_source", "analysis_mpp", "backend", "model_id", "model_sha256",
    "runtime_s", "skipped", "path",
]


@dataclass
class BatchOutcome:
    reports: list[SlideReport]
    skipped: list[str]

    @property
    def failed(self) -> list[SlideReport]:
        return [r for r in self.reports if r.status != "ok"]


def output_names(slides: list[Path], root: Path) -> dict[Path, str]:
    """Output folder name per slide: the stem, or the relative path flattened when stems clash."""
    stems: dict[str, int] = {}
    for s in slides:
        stems[s.stem] = stems.get(s.stem, 0) + 1
    names = {}
    for s in slides:
        if stems[s.stem] == 1:
            names[s] = s.stem
        else:
            names[s] = str(s.relative_to(root)).replace(os.sep, "__").replace(".", "_")
    return names


def slide_fingerprint(path: Path, model: LoadedModel, settings: AnalysisSettings) -> dict:
    return {"input": file_fingerprint(path), "model_sha256": model.sha256, "settings": settings.fingerprint()}


def is_complete(folder: Path, fingerprint: dict) -> bool:
    """True when folder holds every output and its report says ok for the same inputs."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return (report.get("status") == "ok" and report.get("fingerprint") == fingerprint
            and all((folder / f).is_file() for f in OUTPUT_FILES))


def clean_staging(out_dir: Path) -> None:
    staging = out_dir / STAGING
    if staging.exists():
        for entry in staging.iterdir():
            log.info("removing leftover from an interrupted run: %s", entry)
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def publish(staging_dir: Path, final_dir: Path) -> None:
    """Replace final_dir by staging_dir with renames only (same filesystem)."""
    old = None
    if final_dir.exists():
        old = staging_dir.parent / f"{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final_dir, old)
    os.rename(staging_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_report(folder: Path) -> SlideReport:
    data = json.loads((folder / "report.json").read_text())
    known = {k: v for k, v in data.items() if k in SlideReport.__dataclass_fields__}
    return SlideReport(**known)


def write_summary(out_dir: Path, reports: list[SlideReport], skipped: set[str]) -> None:
    rows = []
    for r in reports:
        row = {c: getattr(r, c, None) for c in SUMMARY_COLUMNS}
        row["skipped"] = r.slide in skipped
        rows.append(row)
    atomic_write_text(out_dir / "summary.csv", pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(index=False))


def run_batch(slides_dir: Path, out_dir: Path, model: LoadedModel, engine: Engine, choice: EngineChoice,
              settings: AnalysisSettings, force: bool = False, recursive: bool = False,
              quiet: bool = False) -> BatchOutcome:
    slides_dir, out_dir = Path(slides_dir), Path(out_dir)
    slides = find_slides(slides_dir, recursive=recursive)
    out_dir.mkdir(parents=True, exist_ok=True)
    _refuse_output_inside_inputs(slides_dir, out_dir, recursive)
    with output_lock(out_dir):
        return _run_locked(slides, slides_dir, out_dir, model, engine, choice, settings, force, quiet)


@contextlib.contextmanager
def output_lock(out_dir: Path):
    """One batch per output folder at a time (a second one would delete the first one's staging)."""
    with open(out_dir / ".glomscan.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another glomscan batch is writing to {out_dir}; wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_locked(slides: list[Path], slides_dir: Path, out_dir: Path, model: LoadedModel, engine: Engine,
                choice: EngineChoice, settings: AnalysisSettings, force: bool, quiet: bool) -> BatchOutcome:
    clean_staging(out_dir)
    (out_dir / STAGING).mkdir(exist_ok=True)
    names = output_names(slides, slides_dir)
    log.info("%d slide(s) in %s -> %s (backend %s: %s)", len(slides), slides_dir, out_dir,
             choice.backend, choice.reason)
    reports: list[SlideReport] = []
    skipped: set[str] = set()
    with Progress(len(slides), "batch", quiet=quiet, unit="slide") as progress:
        for path in slides:
            name = names[path]
            final_dir = out_dir / name
            fingerprint = slide_fingerprint(path, model, settings)
            if not force and is_complete(final_dir, fingerprint):
                log.info("%s: outputs complete and up to date, skipping (--force to redo)", name)
                reports.append(load_report(final_dir))
                skipped.add(name)
            else:
                reports.append(_analyze_one(path, name, out_dir, final_dir, model, engine, choice,
                                            settings, fingerprint, quiet))
            write_summary(out_dir, reports, skipped)
            progress.update()
    failed = [r for r in reports if r.status != "ok"]
    log.info("batch done: %d ok (%d skipped as up to date), %d failed", len(reports) - len(failed),
             len(skipped), len(failed))
    for r in failed:
        log.error("FAILED %s: %s", r.slide, r.reason)
    return BatchOutcome(reports=reports, skipped=sorted(skipped))


def _analyze_one(path: Path, name: str, out_dir: Path, final_dir: Path, model: LoadedModel,
                 engine: Engine, choice: EngineChoice, settings: AnalysisSettings,
                 fingerprint: dict, quiet: bool) -> SlideReport:
    staging_dir = out_dir / STAGING / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    staging_dir.mkdir(parents=True)
    started = time.perf_counter()
    try:
        report = analyze_slide(path, name, staging_dir, model, engine, choice, settings, fingerprint, quiet)
        publish(staging_dir, final_dir)
        log.info("%s: %d glomeruli (%d normal, %d sclerosed), %s%% sclerosed, %.1f s", name,
                 report.n_glomeruli, report.n_normal, report.n_sclerosed,
                 report.percent_global_glomerulosclerosis, report.runtime_s)
        return report
    except KeyboardInterrupt:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    except Exception as exc:  # one slide's failure must not end the overnight batch
        shutil.rmtree(staging_dir, ignore_errors=True)
        reason = str(exc) if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
        log.debug("%s failed:\n%s", name, traceback.format_exc())
        report = SlideReport(slide=name, path=str(path), status="failed", reason=reason,
                             backend=choice.backend, backend_reason=choice.reason, model_id=model.model_id,
                             model_sha256=model.sha256, fingerprint=fingerprint,
                             runtime_s=round(time.perf_counter() - started, 3))
        _record_failure(final_dir, report)
        return report


def _record_failure(final_dir: Path, report: SlideReport) -> None:
    """A failed slide gets OUT/<slide>/report.json saying why, unless that folder holds an
    earlier complete result, which is kept (the summary row still says this run failed)."""
    if (final_dir / "report.json").exists():
        try:
            if load_report(final_dir).status == "ok":
                report.reason += " (earlier complete outputs kept)"
                return
        except (OSError, ValueError, TypeError):
            pass
    final_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(final_dir / "report.json", report.to_json())


def _refuse_output_inside_inputs(slides_dir: Path, out_dir: Path, recursive: bool) -> None:
    """With --recursive, an output folder inside the slide folder would be scanned as input."""
    if recursive and out_dir.resolve().is_relative_to(slides_dir.resolve()):
        raise ValueError(f"--out {out_dir} is inside the slide folder; with --recursive its mask "
                         "TIFFs would be read as slides. Choose an output folder elsewhere.")
