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
from typing import Callable

import pandas as pd

from .config import AnalysisSettings
from .engines.base import Engine, EngineChoice
from .model import LoadedModel
from .pipeline import OUTPUT_FILES, SlideReport, analyze_slide
from .progress import Progress
from .atomic import OUTPUT_ERRNOS, atomic_write_text
from .interrupts import deferred_sigint, raise_if_interrupted
from .slides import SLIDE_EXTENSIONS, SlideError, file_fingerprint, find_slides

log = logging.getLogger(__name__)

STAGING = ".glomscan-staging"
LOCK_FILE = ".glomscan.lock"
SUMMARY_COLUMNS = [
    "slide", "status", "reason", "n_glomeruli", "n_normal", "n_sclerosed",
    "percent_global_glomerulosclerosis", "ci95_low", "ci95_high", "tissue_area_mm2",
    "tissue_area_px", "mpp", "mpp_source", "analysis_mpp", "backend", "model_id", "model_sha256", "verifier_id",
    "n_rejected", "runtime_s", "skipped", "path",
]


@dataclass
class BatchOutcome:
    reports: list[SlideReport]
    skipped: list[str]
    output_error: str | None = None
    """Set when the output folder stopped accepting writes (read-only, full): the batch stopped."""

    @property
    def failed(self) -> list[SlideReport]:
        return [r for r in self.reports if r.status != "ok"]


@dataclass(frozen=True)
class SlideJob:
    """One slide to analyse: where it is, its output folder name, and what makes its result current."""

    path: Path
    name: str
    fingerprint: dict


class OutputNotWritable(Exception):
    """The output folder no longer accepts writes (read-only, disk full, quota). Carries the
    failed report of the slide that hit it, if any."""

    def __init__(self, message: str, report: SlideReport | None = None):
        super().__init__(message, report)

    @classmethod
    def folder(cls, out_dir: Path, exc: OSError, report: SlideReport | None = None) -> "OutputNotWritable":
        return cls(f"cannot write to the output folder {out_dir}: {exc.strerror or exc}", report)

    @property
    def report(self) -> SlideReport | None:
        return self.args[1]

    def __str__(self) -> str:
        return self.args[0]


def output_names(slides: list[Path], root: Path) -> dict[Path, str]:
    """Output folder name per slide: the stem (the whole name when the file has no slide
    extension, e.g. a DICOM named by its UID), or the relative path flattened when stems clash."""
    def stem(p: Path) -> str:
        return p.stem if p.suffix.lower() in SLIDE_EXTENSIONS else p.name

    stems: dict[str, int] = {}
    for s in slides:
        stems[stem(s)] = stems.get(stem(s), 0) + 1
    names = {}
    for s in slides:
        if stems[stem(s)] == 1:
            names[s] = stem(s)
        else:
            names[s] = str(s.relative_to(root)).replace(os.sep, "__").replace(".", "_")
    return names


def slide_fingerprint(path: Path, model_sha256: str, settings: AnalysisSettings) -> dict:
    """What makes a slide's result current: the input file, the model and the result-changing settings."""
    return {"input": file_fingerprint(path), "model_sha256": model_sha256, "settings": settings.fingerprint()}


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
        row["skipped"] = "yes" if r.slide in skipped else "no"
        rows.append(row)
    atomic_write_text(out_dir / "summary.csv", pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(index=False))


Executor = Callable[[list[SlideJob], Callable[[SlideReport], None]], None]
"""Runs the planned jobs, handing each finished slide's report to the callback (in any order).
It only executes: it lets OutputNotWritable (its own or the callback's) and KeyboardInterrupt
(``raise_if_interrupted`` between slides) propagate, and ``run_with_executor`` does the rest."""


def run_batch(slides_dir: Path, out_dir: Path, model: LoadedModel, engine: Engine, choice: EngineChoice,
              settings: AnalysisSettings, force: bool = False, recursive: bool = False,
              quiet: bool = False) -> BatchOutcome:
    """The single-process batch: every slide in this process, one after the other."""
    out_dir = Path(out_dir)

    def execute(jobs: list[SlideJob], done: Callable[[SlideReport], None]) -> None:
        for job in jobs:
            raise_if_interrupted()
            done(process_slide(job, out_dir, model, engine, choice, settings, quiet))

    return run_with_executor(slides_dir, out_dir, model.analysis_sha256, settings, execute, f"backend {choice.backend}",
                             force=force, recursive=recursive, quiet=quiet)


def run_with_executor(slides_dir: Path, out_dir: Path, model_sha256: str, settings: AnalysisSettings,
                      execute: Executor, executor_name: str, force: bool = False, recursive: bool = False,
                      quiet: bool = False) -> BatchOutcome:
    """The batch skeleton of the local loop and the cluster: create OUT, take its lock, delete
    an earlier run's staging, apply the resume rule, let ``execute`` run the remaining slides
    while summary.csv follows each report, then write summary.csv and index.html. When the
    output folder stops accepting writes (wherever: a slide's outputs, its failure record,
    summary.csv) the batch stops and every slide without a report is failed with the reason;
    Ctrl-C writes what is finished and re-raises."""
    slides_dir, out_dir = Path(slides_dir), Path(out_dir)
    slides = prepare_output(slides_dir, out_dir, recursive)
    with output_lock(out_dir):
        clean_staging(out_dir)
        log.info("%d slide(s) in %s -> %s (%s)", len(slides), slides_dir, out_dir, executor_name)
        jobs, recorder = plan_batch(slides, slides_dir, out_dir, model_sha256, settings, force)
        with Progress(len(slides), "batch", quiet=quiet, unit="slide") as progress:
            progress.update(len(recorder.skipped))

            def done(report: SlideReport) -> None:
                recorder.add(report)
                progress.update()

            try:
                if jobs:
                    with deferred_sigint():
                        execute(jobs, done)
                else:
                    log.info("every slide is up to date; nothing to analyse")
            except OutputNotWritable as exc:
                recorder.stop(exc, jobs)
            except KeyboardInterrupt:
                recorder.finish(interrupted=True)
                raise
        if recorder.output_error is None:
            clean_staging(out_dir)  # debris of cluster workers that died mid-slide
        return recorder.finish()


def prepare_output(slides_dir: Path, out_dir: Path, recursive: bool) -> list[Path]:
    """The slides to analyse; creates OUT (raising OutputNotWritable when it cannot be written)."""
    slides = find_slides(slides_dir, recursive=recursive)
    _refuse_output_inside_inputs(slides_dir, out_dir, recursive)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / STAGING).mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputNotWritable.folder(out_dir, exc) from exc
    return slides


def plan_batch(slides: list[Path], slides_dir: Path, out_dir: Path, model_sha256: str,
               settings: AnalysisSettings, force: bool) -> tuple[list[SlideJob], "BatchRecorder"]:
    """Resume rule (shared by the local loop and the cluster): a slide whose OUT/<slide>/ is
    complete for the same input, model and settings is skipped; every other slide is a job."""
    names = output_names(slides, slides_dir)
    recorder = BatchRecorder(out_dir, [names[p] for p in slides])
    jobs = []
    for path in slides:
        name = names[path]
        fingerprint = slide_fingerprint(path, model_sha256, settings)
        if not force and is_complete(out_dir / name, fingerprint):
            log.info("%s: outputs complete and up to date, skipping (--force to redo)", name)
            recorder.add(load_report(out_dir / name), skipped=True)
        else:
            jobs.append(SlideJob(Path(os.path.abspath(path)), name, fingerprint))  # reports name it wherever run from
    return jobs, recorder


class BatchRecorder:
    """Collects slide reports in whatever order they finish (local loop or cluster), rewrites
    summary.csv (in slide order) after each one, and index.html at the end."""

    def __init__(self, out_dir: Path, order: list[str]):
        self.out_dir = out_dir
        self.order = order
        self.reports: dict[str, SlideReport] = {}
        self.skipped: set[str] = set()
        self.output_error: str | None = None

    def ordered(self) -> list[SlideReport]:
        return [self.reports[n] for n in self.order if n in self.reports]

    def add(self, report: SlideReport, skipped: bool = False) -> None:
        self.reports[report.slide] = report
        if skipped:
            self.skipped.add(report.slide)
        elif report.status == "ok":
            log.info("%s: %d glomeruli (%d normal, %d sclerosed), %s%% sclerosed, %.1f s", report.slide,
                     report.n_glomeruli, report.n_normal, report.n_sclerosed,
                     report.percent_global_glomerulosclerosis, report.runtime_s)
        else:
            log.error("%s failed: %s", report.slide, report.reason)
        try:
            write_summary(self.out_dir, self.ordered(), self.skipped)
        except OSError as exc:
            if exc.errno in OUTPUT_ERRNOS:
                raise OutputNotWritable(f"cannot write summary.csv in {self.out_dir}: {exc.strerror}") from exc
            raise

    def stop(self, exc: OutputNotWritable, jobs: list[SlideJob]) -> None:
        """The output folder stopped taking writes: the slide that hit it and every one of
        ``jobs`` without a report yet are failed with the reason (kept in memory if summary.csv
        cannot be written)."""
        self.output_error = str(exc)
        log.error("stopping the batch: %s", exc)
        if exc.report is not None:
            self.reports[exc.report.slide] = exc.report
        for job in jobs:
            if job.name not in self.reports:
                self.reports[job.name] = SlideReport(
                    slide=job.name, path=str(job.path), status="failed",
                    reason=f"not analysed: the batch stopped because {exc}", fingerprint=job.fingerprint)

    def finish(self, interrupted: bool = False) -> BatchOutcome:
        """Final summary.csv and index.html (best effort when the output folder is failing)."""
        from .batch_report import write_index

        reports = self.ordered()
        try:
            write_summary(self.out_dir, reports, self.skipped)
            write_index(self.out_dir, reports, self.skipped, interrupted=interrupted)
        except OSError as exc:
            if exc.errno not in OUTPUT_ERRNOS and self.output_error is None:
                raise
            self.output_error = self.output_error or f"cannot write summary.csv/index.html: {exc.strerror}"
            log.error("%s; the slides' results are in the log above", self.output_error)
        outcome = BatchOutcome(reports=reports, skipped=sorted(self.skipped), output_error=self.output_error)
        log.info("batch %s: %d ok (%d skipped as up to date), %d failed", "interrupted" if interrupted else "done",
                 len(reports) - len(outcome.failed), len(self.skipped), len(outcome.failed))
        for r in outcome.failed:
            log.error("FAILED %s: %s", r.slide, r.reason)
        return outcome


@contextlib.contextmanager
def output_lock(out_dir: Path):
    """One batch per output folder at a time (a second one would delete the first one's staging).
    On the way out the lock file and an empty staging folder are removed, so a finished output
    folder holds only results."""
    path = out_dir / LOCK_FILE
    while True:
        try:
            handle = open(path, "a+")
        except OSError as exc:
            raise OutputNotWritable.folder(out_dir, exc) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ValueError(f"another glomscan batch is writing to {out_dir}; wait for it or use another --out") from None
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            (out_dir / STAGING).rmdir()  # only when empty
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()


def process_slide(job: SlideJob, out_dir: Path, model: LoadedModel, engine: Engine, choice: EngineChoice,
                  settings: AnalysisSettings, quiet: bool = True) -> SlideReport:
    """Analyse one slide into a private staging folder, publish it by rename, or record why it
    failed. The one per-slide step of both the local loop and the cluster task (which runs it
    on a worker, writing straight into the shared OUT). Raises OutputNotWritable when the
    output folder is read-only or full; every other error becomes a failed report."""
    final_dir = out_dir / job.name
    staging_dir = out_dir / STAGING / f"{job.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        staging_dir.mkdir(parents=True)
    except OSError as exc:
        raise OutputNotWritable.folder(out_dir, exc, failed_report(job, model, f"output folder: {exc.strerror or exc}",
                                                                   choice, 0.0)) from exc
    started = time.perf_counter()
    report = failed_report(job, model, "", choice)  # filled in while the slide is analysed
    try:
        report = analyze_slide(job.path, job.name, staging_dir, model, engine, choice, settings,
                               job.fingerprint, quiet, report=report)
        raise_if_interrupted()  # Ctrl-C came after the last tile: this slide is redone, as promised
        publish(staging_dir, final_dir)
        return report
    except KeyboardInterrupt:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    except Exception as exc:  # one slide's failure must not end the overnight batch
        shutil.rmtree(staging_dir, ignore_errors=True)
        reason = str(exc) if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
        log.debug("%s failed:\n%s", job.name, traceback.format_exc())
        report.mark_failed(reason, time.perf_counter() - started)
        if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
            report.reason = f"output folder: {exc.strerror} (while writing {getattr(exc, 'filename', None) or 'outputs'})"
        record_failure(out_dir, report, cause=exc)
        return report


def failed_report(job: SlideJob, model: LoadedModel, reason: str, choice: EngineChoice | None = None,
                  seconds: float | None = None) -> SlideReport:
    """The report of a slide that failed; ``choice`` and ``seconds`` are None when no engine
    on this side ran it (a cluster worker that died)."""
    engine = {"backend": choice.backend, "backend_reason": choice.reason} if choice else {}
    return SlideReport(slide=job.name, path=str(job.path), status="failed", reason=reason, model_id=model.model_id,
                       model_sha256=model.sha256, model_intended_use=model.card.intended_use,
                       model_licence=model.card.licence, fingerprint=job.fingerprint,
                       runtime_s=None if seconds is None else round(seconds, 3), **engine)


def record_failure(out_dir: Path, report: SlideReport, cause: BaseException | None = None) -> None:
    """A failed slide gets OUT/<slide>/report.json saying why, unless that folder holds an
    earlier complete result, which is kept (the summary row still says this run failed).
    Raises OutputNotWritable (carrying the report) when the output folder refuses this write,
    or when ``cause``, why the slide failed, was the output folder refusing one."""
    refused = cause if isinstance(cause, OSError) and cause.errno in OUTPUT_ERRNOS else None
    try:
        _write_failure(out_dir / report.slide, report)
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        refused = refused or exc
    if refused is not None:
        raise OutputNotWritable(f"the output folder {out_dir} does not accept writes: {refused.strerror or refused}",
                                report) from refused


def _write_failure(final_dir: Path, report: SlideReport) -> None:
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
