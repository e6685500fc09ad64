"""Several slides at once: slide worker processes on this machine, or Dask distributed.

One slide's CPU side (reading, JPEG decoding, blending, labelling) cannot feed a GPU that infers
ten times faster, so the unit of parallelism is the slide: ``analyze --slides-in-flight K``
keeps K slides in flight per GPU in K worker processes (``run_slide_workers_batch``), and the
Dask path below starts K workers per GPU the same way. Each slide is ``batch.process_slide``'s,
as in the single-process loop, so the outputs do not depend on K.

Dask: one task per slide, one slide per GPU (or CPU slot) at a time.

The client (``glomscan analyze --cluster ...``) runs the batch skeleton of the single-process
loop (``batch.run_with_executor``: output lock, resume rule, summary.csv / index.html, stopping
when the output folder refuses writes, Ctrl-C) with a Dask executor; each task runs the same
``batch.process_slide`` as the single-process loop on a worker, which writes its outputs
straight into the shared output folder (staging + rename on the same file system). A worker
that dies mid-slide has its slide retried once on another (or the restarted) worker; a second
death reports the slide failed.

The client hands the scheduler only as many slides as the workers have free slots (GPU or
SLOT resources), so a worker holds just the slide it is analysing. Dask counts a dying worker
against every task assigned to it, queued or running; with all slides submitted at once, two
worker deaths would fail every slide that happened to wait on those workers. Dask itself is
told not to retry (``distributed.scheduler.allowed-failures = 0``: ``--cluster local`` sets it,
an external scheduler should be started with it, see README) and the client resubmits a slide
whose worker died, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .batch import (BatchOutcome, OutputNotWritable, SlideJob, failed_report, process_slide, record_failure,
                    run_with_executor)
from .config import AnalysisSettings
from .engines.base import Engine, EngineChoice
from .interrupts import raise_if_interrupted
from .model import LoadedModel
from .pipeline import SlideReport

log = logging.getLogger(__name__)

SLIDE_RETRIES = 1
"""Times a slide whose worker died is resubmitted before it is reported failed."""
DASK_ALLOWED_FAILURES = 0
"""Dask's own retries of a task whose worker died: none, the client retries (SLIDE_RETRIES)."""
WORKER_START_TIMEOUT_S = 120
POLL_S = 0.5
CORES_PER_SLIDE_WORKER = 2
MAX_SLIDES_IN_FLIGHT = 8
GPU_MEMORY_FRACTION_ENV = "GLOMSCAN_GPU_MEMORY_FRACTION"
"""Set in a slide worker's environment when several share a GPU: the share of its memory the
worker's torch engine may allocate (torch.cuda.set_per_process_memory_fraction)."""


@dataclass(frozen=True)
class BackendEngine:
    """How a worker makes its engine: ``create_engine(backend, model, options)``. Picklable, so
    the client sends the recipe, not the engine; each worker builds its own (on its own GPU)."""

    backend: str = "auto"
    options: object = None  # EngineOptions
    batch_size_auto: bool = True

    def __call__(self, model: LoadedModel) -> tuple[Engine, EngineChoice]:
        from .engines import EngineOptions, create_engine

        options = self.options or EngineOptions()
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if options.cpu_threads is None and threads.isdigit():  # this worker's share of the cores
            options = replace(options, cpu_threads=int(threads))
        return create_engine(self.backend, model, options)


# -- worker environments ------------------------------------------------------------------------
def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set (empty = none), else every
    GPU the CUDA runtime sees (none without an NVIDIA driver; torch is not needed)."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    from .engines.base import cuda_device_count

    return [str(i) for i in range(cuda_device_count())]


def default_slides_in_flight(gpus: list[str], cpu_count: int) -> int:
    """Slides analysed at once per GPU when not asked: one per ``CORES_PER_SLIDE_WORKER`` cores
    of each GPU's share of the CPU, at most ``MAX_SLIDES_IN_FLIGHT``, since one slide's CPU side
    (reading, JPEG decoding, blending) cannot feed a GPU alone. Without a GPU, 1: the CPU
    engines already use every core for one slide."""
    if not gpus:
        return 1
    return max(1, min(MAX_SLIDES_IN_FLIGHT, cpu_count // len(gpus) // CORES_PER_SLIDE_WORKER))


def worker_environments(gpus: list[str], workers: int | None, cpu_count: int,
                        slides_per_gpu: int = 1) -> list[dict[str, str]]:
    """One environment per local worker process. With GPUs: ``slides_per_gpu`` workers per GPU
    (of the first ``workers`` GPUs if given), each seeing only its GPU (CUDA_VISIBLE_DEVICES=<id>,
    so torch, ONNX Runtime and TensorRT all call it cuda:0) and allowed 1 / ``slides_per_gpu``
    of its memory (``GPU_MEMORY_FRACTION_ENV``, applied by torch engines). Without: ``workers``
    processes (default 2) that see no GPU. The workers share the CPU cores (OMP_NUM_THREADS)."""
    if workers is not None and workers < 1:
        raise ValueError("--workers must be >= 1")
    if slides_per_gpu < 1:
        raise ValueError("slides in flight must be >= 1")
    if gpus:
        chosen = gpus[: workers or len(gpus)]
        if workers and workers > len(gpus):
            log.warning("%d workers requested but %d GPU(s) visible: one worker per GPU", workers, len(gpus))
        threads = max(1, cpu_count // (len(chosen) * slides_per_gpu))
        share = {GPU_MEMORY_FRACTION_ENV: f"{1 / slides_per_gpu:.4f}"} if slides_per_gpu > 1 else {}
        return [{"CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": str(threads), **share}
                for _ in range(slides_per_gpu) for g in chosen]
    n = workers or 2
    threads = max(1, cpu_count // n)
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)} for _ in range(n)]


def local_worker_environments(workers: int | None, slides_per_gpu: int, cpu_workers: int | None = None
                              ) -> tuple[list[str], list[dict[str, str]]]:
    """(visible GPUs, one environment per worker process) for this machine's cores and GPUs:
    :func:`worker_environments` with ``workers``, or ``cpu_workers`` processes when no GPU is
    visible and it is given (the slide workers: as many as slides in flight)."""
    gpus = visible_gpus()
    chosen = workers if gpus or cpu_workers is None else cpu_workers
    return gpus, worker_environments(gpus, chosen, os.cpu_count() or 1, slides_per_gpu=slides_per_gpu)


def resource_name(gpus: list[str]) -> str:
    return "GPU" if gpus else "SLOT"


def start_local_cluster(envs: list[dict[str, str]], resource: str):
    """A LocalCluster of processes (1 thread each), each worker with its own environment and the
    resource ``{resource: 1}``, with Dask's allowed-failures set to DASK_ALLOWED_FAILURES."""
    import dask
    from distributed import LocalCluster

    class PinnedLocalCluster(LocalCluster):
        """LocalCluster whose n-th worker gets the n-th environment (scaling uses new_worker_spec)."""

        def new_worker_spec(self):
            index = len(self.worker_spec)
            spec = {"cls": self.new_spec["cls"],
                    "options": {**self.new_spec["options"], "env": envs[index % len(envs)]}}
            return {f"worker-{index}": spec}

    with dask.config.set({"distributed.scheduler.allowed-failures": DASK_ALLOWED_FAILURES}):
        cluster = PinnedLocalCluster(n_workers=0, processes=True, threads_per_worker=1,
                                     resources={resource: 1}, dashboard_address=":0",
                                     host="127.0.0.1", scheduler_kwargs={"allowed_failures": DASK_ALLOWED_FAILURES},
                                     memory_limit=0, silence_logs=logging.WARNING)
        try:
            cluster.scale(len(envs))
        except BaseException:
            cluster.close()
            raise
    return cluster


# -- on the worker ------------------------------------------------------------------------------
_WORKER_CACHE: dict[tuple, tuple[LoadedModel, Engine, EngineChoice]] = {}
_WORKER_LOCK = threading.Lock()


def _worker_engine(model_path: str, model_sha256: str, make_engine, verifier_path: str | None = None
                   ) -> tuple[LoadedModel, Engine, EngineChoice]:
    """The model (with its verifier, when one is named) and engine of this worker process,
    loaded once (keyed by paths + checksum)."""
    from .model import load_model

    key = (model_path, model_sha256, repr(make_engine), verifier_path)
    with _WORKER_LOCK:
        if key not in _WORKER_CACHE:
            model = load_model(Path(model_path))
            if model.sha256 != model_sha256:
                raise RuntimeError(f"model file {model_path} on this worker is not the client's "
                                   f"(sha256 {model.sha256[:12]} != {model_sha256[:12]}); share the same file")
            if verifier_path is not None:
                from .verify import load_verifier

                model.verifier = load_verifier(Path(verifier_path))
            engine, choice = make_engine(model)
            bound_gpu_memory()
            threads = os.environ.get("OMP_NUM_THREADS")
            if threads and threads.isdigit() and "torch" in sys.modules:  # torch only where the engine uses it
                sys.modules["torch"].set_num_threads(int(threads))
            log.info("worker %d: model %s, backend %s (%s), CUDA_VISIBLE_DEVICES=%r", os.getpid(), model.model_id,
                     choice.backend, choice.reason, os.environ.get("CUDA_VISIBLE_DEVICES"))
            _WORKER_CACHE[key] = (model, engine, choice)
        return _WORKER_CACHE[key]


def analyze_on_worker(job: SlideJob, out_dir: str, model_path: str, model_sha256: str, make_engine,
                      settings: AnalysisSettings, verifier_path: str | None = None) -> SlideReport:
    """The Dask task: one slide, with this worker's cached model, verifier and engine."""
    model, engine, choice = _worker_engine(model_path, model_sha256, make_engine, verifier_path)
    if getattr(make_engine, "batch_size_auto", False):
        settings = replace(settings, batch_size=engine.preferred_batch_size)
    return process_slide(job, Path(out_dir), model, engine, choice, settings, quiet=True)


def bound_gpu_memory() -> None:
    """Hold this worker's torch allocations on the GPU to its share (``GPU_MEMORY_FRACTION_ENV``,
    set when several slide workers share a GPU): one worker's large slide cannot starve the
    others; a worker over its share fails its slide with CUDA's out-of-memory error."""
    fraction = os.environ.get(GPU_MEMORY_FRACTION_ENV)
    torch = sys.modules.get("torch")
    if fraction and torch is not None and torch.cuda.is_initialized():
        torch.cuda.set_per_process_memory_fraction(float(fraction))
        log.info("worker %d: at most %.0f %% of the GPU's memory", os.getpid(), 100 * float(fraction))


# -- several slides in flight on one machine, without Dask -----------------------------------------
def _start_slide_worker(environments) -> None:
    """A slide worker process takes its environment (its GPU, CPU threads and memory share)
    before anything imports torch, ONNX Runtime or TensorRT."""
    os.environ.update(environments.get())


def run_slide_workers_batch(slides_dir: Path, out_dir: Path, model: LoadedModel, make_engine,
                            settings: AnalysisSettings, slides_in_flight: int, force: bool = False,
                            recursive: bool = False, quiet: bool = False) -> BatchOutcome:
    """The batch with ``slides_in_flight`` slides analysed at once on this machine, each in a
    worker process of its own (its own reader threads, blending, engine and CUDA context:
    ``slides_in_flight`` per visible GPU, sharing its memory), as the Dask cluster does but
    without Dask. The batch skeleton is ``batch.run_with_executor``'s, each slide
    ``batch.process_slide``'s, so the outputs are those of one slide at a time. A worker that
    dies (killed, out of memory) fails the slides it and the pool had not finished, with the
    reason; the next run redoes them."""
    if model.path is None:
        raise ValueError("slide workers need a model file they can load")
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    out_dir = Path(out_dir)
    gpus, envs = local_worker_environments(None, slides_in_flight, cpu_workers=slides_in_flight)
    verifier_path = str(model.verifier.path) if model.verifier is not None else None

    def execute(jobs: list[SlideJob], done: Callable[[SlideReport], None]) -> None:
        # workers start from a clean server process: a fork of this one could inherit libvips
        # or CUDA state mid-use
        context = multiprocessing.get_context("forkserver")
        environments = context.SimpleQueue()
        for env in envs:
            environments.put(env)
        pool = ProcessPoolExecutor(len(envs), mp_context=context, initializer=_start_slide_worker,
                                   initargs=(environments,))
        try:
            running = {pool.submit(analyze_on_worker, job, str(out_dir), str(model.path), model.sha256, make_engine,
                                   settings, verifier_path): job for job in jobs}
            while running:
                raise_if_interrupted()
                finished, _ = wait(list(running), timeout=POLL_S, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    try:
                        report = future.result()
                    except (OutputNotWritable, KeyboardInterrupt):
                        raise
                    except BrokenProcessPool as exc:
                        report = _lost_slide(job, model, exc, 1, retried=False)
                    except Exception as exc:  # the task could not run at all (unpicklable, missing import, ...)
                        report = _lost_slide(job, model, exc, 0)
                    else:
                        done(report)  # ok or failed, the worker wrote its folder
                        continue
                    _record_lost_slide(out_dir, report, done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    where = f"{slides_in_flight} per GPU on {len(gpus)} GPU(s)" if gpus else "on the CPU"
    return run_with_executor(slides_dir, out_dir, model.analysis_sha256, settings, execute,
                             f"{len(envs)} slide workers, {where}", force=force, recursive=recursive, quiet=quiet)


# -- on the client ------------------------------------------------------------------------------
def run_cluster_batch(slides_dir: Path, out_dir: Path, model: LoadedModel, make_engine,
                      settings: AnalysisSettings, cluster: str = "local", workers: int | None = None,
                      force: bool = False, recursive: bool = False, quiet: bool = False,
                      slides_per_gpu: int = 1) -> BatchOutcome:
    """The batch on Dask: ``cluster`` is ``local`` (start a LocalCluster here) or the address
    of a running scheduler (``tcp://host:8786``). The batch itself (lock, resume rule, summary,
    a stopped output folder, Ctrl-C) is ``batch.run_with_executor``'s; this only executes."""
    if model.path is None:
        raise ValueError("the cluster path needs a model file the workers can load")
    out_dir = Path(out_dir)
    if not log.isEnabledFor(logging.DEBUG):  # Dask's INFO lines (workers joining, closing) drown the slides'
        logging.getLogger("distributed").setLevel(logging.WARNING)

    def execute(jobs: list[SlideJob], done: Callable[[SlideReport], None]) -> None:
        with dask_client(cluster, workers, slides_per_gpu) as (client, resource):
            _run_jobs(client, jobs, done, out_dir, model, make_engine, settings, resource)

    return run_with_executor(slides_dir, out_dir, model.analysis_sha256, settings, execute, f"Dask cluster {cluster}",
                             force=force, recursive=recursive, quiet=quiet)


@contextlib.contextmanager
def dask_client(cluster: str, workers: int | None, slides_per_gpu: int = 1):
    """(client, resource) of a LocalCluster started here (``cluster == "local"``: one worker per
    GPU, or ``slides_per_gpu``) or of the scheduler at the address ``cluster``; closed (and the
    LocalCluster stopped) on the way out."""
    from distributed import Client

    local = None
    if cluster == "local":
        gpus, envs = local_worker_environments(workers, slides_per_gpu)
        resource = resource_name(gpus)
        log.info("starting a local Dask cluster: %d worker process(es), %s", len(envs),
                 f"{slides_per_gpu} per GPU {gpus}" if gpus else "CPU only")
        local = start_local_cluster(envs, resource)
    try:
        client = Client(local if local is not None else cluster, timeout=WORKER_START_TIMEOUT_S)
        try:
            if local is not None:
                client.wait_for_workers(len(envs), timeout=WORKER_START_TIMEOUT_S)
            else:
                client.wait_for_workers(1, timeout=WORKER_START_TIMEOUT_S)
                resource = _cluster_resource(client)
            yield client, resource
        finally:
            client.close()
    finally:
        if local is not None:
            local.close()


def _cluster_resource(client) -> str:
    """The resource the running cluster's workers declare (GPU preferred, SLOT for CPU workers)."""
    declared = {name for w in _workers(client) for name in (w.get("resources") or {})}
    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    if allowed != DASK_ALLOWED_FAILURES:
        log.warning("the scheduler itself retries a task %s times when its worker dies "
                    "(distributed.scheduler.allowed-failures), on top of glomscan's one retry per slide; "
                    "start the scheduler with DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=%d",
                    allowed, DASK_ALLOWED_FAILURES)
    for name in ("GPU", "SLOT"):
        if name in declared:
            return name
    raise ValueError("the Dask workers declare neither a GPU nor a SLOT resource, so nothing stops two slides "
                     "sharing one GPU; start each worker with `dask worker SCHEDULER --nthreads 1 --resources GPU=1`")


def _workers(client) -> list[dict]:
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return list(info["workers"].values())


def free_slots(client, resource: str) -> int:
    """How many slides the cluster can analyse at once now: the workers' ``resource`` summed
    (a worker being restarted after a crash is not counted until it is back)."""
    return int(sum(float((w.get("resources") or {}).get(resource, 0)) for w in _workers(client)))


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _run_jobs(client, jobs: list[SlideJob], done: Callable[[SlideReport], None], out_dir: Path,
              model: LoadedModel, make_engine, settings: AnalysisSettings, resource: str) -> None:
    """Keep the cluster's free slots busy, one slide per slot; resubmit a slide whose worker died
    (once); hand every report to ``done``. On any exception (OutputNotWritable from a worker or
    from ``done``, Ctrl-C) the slides still queued on the cluster are cancelled."""
    from distributed import wait
    from distributed.scheduler import KilledWorker

    waiting = deque(jobs)
    running: dict = {}  # future -> job
    deaths: dict[str, int] = {}
    no_workers_since = None

    def submit(job: SlideJob) -> None:
        verifier_path = str(model.verifier.path) if model.verifier is not None else None
        future = client.submit(analyze_on_worker, job, str(out_dir), str(model.path), model.sha256, make_engine,
                               settings, verifier_path, key=f"glomscan-slide-{job.name}-{uuid.uuid4().hex[:8]}",
                               resources={resource: 1}, pure=False)
        running[future] = job

    try:
        while waiting or running:
            raise_if_interrupted()
            slots = free_slots(client, resource)
            while waiting and len(running) < slots:
                submit(waiting.popleft())
            if not running:  # every worker gone (restarting, or the cluster lost them)
                no_workers_since = no_workers_since or time.monotonic()
                if time.monotonic() - no_workers_since > WORKER_START_TIMEOUT_S:
                    raise RuntimeError(f"no Dask worker with a {resource} resource for "
                                       f"{WORKER_START_TIMEOUT_S} s; {len(waiting)} slide(s) not analysed")
                time.sleep(POLL_S)
                continue
            no_workers_since = None
            try:
                finished, _ = wait(list(running), timeout=POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished: look at the slots again
                continue
            for future in finished:
                job = running.pop(future)
                try:
                    report = future.result()
                except OutputNotWritable:
                    raise
                except KilledWorker as exc:
                    deaths[job.name] = deaths.get(job.name, 0) + 1
                    if deaths[job.name] <= SLIDE_RETRIES:
                        log.warning("%s: the worker analysing it died; retrying the slide", job.name)
                        waiting.appendleft(job)
                        continue
                    report = _lost_slide(job, model, exc, deaths[job.name])
                except Exception as exc:  # the task could not run at all (unpicklable, missing import, ...)
                    report = _lost_slide(job, model, exc, deaths.get(job.name, 0))
                else:
                    done(report)  # ok or failed, the worker wrote its folder
                    continue
                _record_lost_slide(out_dir, report, done)
    except BaseException:
        client.cancel(list(running))
        raise


def _record_lost_slide(out_dir: Path, report: SlideReport, done: Callable[[SlideReport], None]) -> None:
    """No worker finished this slide: the client records why in its folder (as far as the output
    folder lets it) and hands the report on."""
    try:
        record_failure(out_dir, report)
    except OSError as write_exc:
        log.error("%s: cannot record the failure: %s", report.slide, write_exc)
    done(report)


def _lost_slide(job: SlideJob, model: LoadedModel, exc: BaseException, deaths: int, retried: bool = True
                ) -> SlideReport:
    """The report of a slide that no worker finished: its worker died too often (``retried``:
    after the cluster's retries), or the task itself could not run."""
    if deaths and not retried:
        reason = "a slide worker died before this slide was finished: out of memory or killed? (rerun to redo it)"
    elif deaths:
        retried_text = "once" if SLIDE_RETRIES == 1 else f"{SLIDE_RETRIES} times"
        reason = f"the worker analysing this slide died {deaths} times (retried {retried_text}): out of memory or killed?"
    else:
        reason = f"{type(exc).__name__} on the cluster: {exc}"
    return failed_report(job, model, reason)
