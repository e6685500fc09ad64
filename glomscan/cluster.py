"""Scale-out with Dask distributed: one task per slide, one slide per GPU (or CPU slot) at a time.

The client (``glomscan analyze --cluster ...``) holds the output lock, applies the resume rule
and writes summary.csv / index.html; each task runs the same ``batch.process_slide`` as the
single-process loop on a worker, which writes its outputs straight into the shared output
folder (staging + rename on the same file system). A worker that dies mid-slide has its slide
retried once on another (or the restarted) worker; a second death reports the slide failed.
That rule is Dask's own ``distributed.scheduler.allowed-failures = 1`` (``--cluster local``
sets it; an external scheduler must be started with it, see README).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from .batch import (BatchOutcome, OutputNotWritable, SlideJob, clean_staging, output_lock, plan_batch,
                    prepare_output, process_slide, record_failure)
from .config import AnalysisSettings
from .engines.base import Engine, EngineChoice
from .model import LoadedModel
from .pipeline import SlideReport

log = logging.getLogger(__name__)

ALLOWED_FAILURES = 1
"""Worker deaths a slide may cause before it is reported failed: 1 = retried once."""
WORKER_START_TIMEOUT_S = 120


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
    GPU torch sees (none without CUDA)."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA build: no GPU
        return []


def worker_environments(gpus: list[str], workers: int | None, cpu_count: int) -> list[dict[str, str]]:
    """One environment per local worker process. With GPUs: one worker per GPU (the first
    ``workers`` if given), each seeing only its own GPU (CUDA_VISIBLE_DEVICES=<id>, so torch,
    ONNX Runtime and TensorRT all call it cuda:0). Without: ``workers`` processes (default 2)
    that see no GPU and share the CPU cores between them."""
    if workers is not None and workers < 1:
        raise ValueError("--workers must be >= 1")
    if gpus:
        chosen = gpus[: workers or len(gpus)]
        if workers and workers > len(gpus):
            log.warning("%d workers requested but %d GPU(s) visible: one worker per GPU", workers, len(gpus))
        threads = max(1, cpu_count // len(chosen))
        return [{"CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": str(threads)} for g in chosen]
    n = workers or 2
    threads = max(1, cpu_count // n)
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)} for _ in range(n)]


def resource_name(gpus: list[str]) -> str:
    return "GPU" if gpus else "SLOT"


def start_local_cluster(envs: list[dict[str, str]], resource: str):
    """A LocalCluster of processes (1 thread each), each worker with its own environment and the
    resource ``{resource: 1}``, with Dask's allowed-failures set to ALLOWED_FAILURES."""
    import dask
    from distributed import LocalCluster

    class PinnedLocalCluster(LocalCluster):
        """LocalCluster whose n-th worker gets the n-th environment (scaling uses new_worker_spec)."""

        def new_worker_spec(self):
            index = len(self.worker_spec)
            spec = {"cls": self.new_spec["cls"],
                    "options": {**self.new_spec["options"], "env": envs[index % len(envs)]}}
            return {f"worker-{index}": spec}

    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        cluster = PinnedLocalCluster(n_workers=0, processes=True, threads_per_worker=1,
                                     resources={resource: 1}, dashboard_address=":0",
                                     host="127.0.0.1", scheduler_kwargs={"allowed_failures": ALLOWED_FAILURES},
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


def _worker_engine(model_path: str, model_sha256: str, make_engine) -> tuple[LoadedModel, Engine, EngineChoice]:
    """The model and engine of this worker process, loaded once (keyed by path + checksum)."""
    from .model import load_checkpoint

    key = (model_path, model_sha256, repr(make_engine))
    with _WORKER_LOCK:
        if key not in _WORKER_CACHE:
            model = load_checkpoint(Path(model_path))
            if model.sha256 != model_sha256:
                raise RuntimeError(f"model file {model_path} on this worker is not the client's "
                                   f"(sha256 {model.sha256[:12]} != {model_sha256[:12]}); share the same file")
            engine, choice = make_engine(model)
            threads = os.environ.get("OMP_NUM_THREADS")
            if threads and threads.isdigit():
                import torch

                torch.set_num_threads(int(threads))
            log.info("worker %d: model %s, backend %s (%s), CUDA_VISIBLE_DEVICES=%r", os.getpid(), model.model_id,
                     choice.backend, choice.reason, os.environ.get("CUDA_VISIBLE_DEVICES"))
            _WORKER_CACHE[key] = (model, engine, choice)
        return _WORKER_CACHE[key]


def analyze_on_worker(job: SlideJob, out_dir: str, model_path: str, model_sha256: str, make_engine,
                      settings: AnalysisSettings) -> SlideReport:
    """The Dask task: one slide, with this worker's cached model and engine."""
    model, engine, choice = _worker_engine(model_path, model_sha256, make_engine)
    if getattr(make_engine, "batch_size_auto", False):
        settings = replace(settings, batch_size=engine.preferred_batch_size)
    return process_slide(job, Path(out_dir), model, engine, choice, settings, quiet=True)


# -- on the client ------------------------------------------------------------------------------
def run_cluster_batch(slides_dir: Path, out_dir: Path, model: LoadedModel, make_engine,
                      settings: AnalysisSettings, cluster: str = "local", workers: int | None = None,
                      force: bool = False, recursive: bool = False, quiet: bool = False) -> BatchOutcome:
    """The batch on Dask: ``cluster`` is ``local`` (start a LocalCluster here) or the address
    of a running scheduler (``tcp://host:8786``)."""
    from distributed import Client

    if model.path is None:
        raise ValueError("the cluster path needs a model file the workers can load")
    slides_dir, out_dir = Path(slides_dir), Path(out_dir)
    if not log.isEnabledFor(logging.DEBUG):  # Dask's INFO lines (workers joining, closing) drown the slides'
        logging.getLogger("distributed").setLevel(logging.WARNING)
    slides = prepare_output(slides_dir, out_dir, recursive)
    with output_lock(out_dir):
        clean_staging(out_dir)
        jobs, recorder = plan_batch(slides, slides_dir, out_dir, model.sha256, settings, force)
        if not jobs:
            log.info("every slide is up to date; no cluster needed")
            return recorder.finish()
        local = None
        try:
            if cluster == "local":
                gpus = visible_gpus()
                envs = worker_environments(gpus, workers, os.cpu_count() or 1)
                resource = resource_name(gpus)
                log.info("starting a local Dask cluster: %d worker process(es), %s", len(envs),
                         f"one per GPU {gpus}" if gpus else "CPU only")
                local = start_local_cluster(envs, resource)
                client = Client(local, timeout=WORKER_START_TIMEOUT_S)
                client.wait_for_workers(len(envs), timeout=WORKER_START_TIMEOUT_S)
            else:
                client = Client(cluster, timeout=WORKER_START_TIMEOUT_S)
                client.wait_for_workers(1, timeout=WORKER_START_TIMEOUT_S)
                resource = _cluster_resource(client)
            try:
                _run_jobs(client, jobs, recorder, out_dir, model, make_engine, settings, resource, quiet)
            finally:
                client.close()
        except KeyboardInterrupt:
            recorder.finish(interrupted=True)
            raise
        finally:
            if local is not None:
                local.close()
        if recorder.output_error is None:
            clean_staging(out_dir)  # debris of workers that died mid-slide
        return recorder.finish()


def _cluster_resource(client) -> str:
    """The resource the running cluster's workers declare (GPU preferred, SLOT for CPU workers)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values() if _accepts_n_workers(client) \
        else client.scheduler_info()["workers"].values()
    declared = {name for w in workers for name in (w.get("resources") or {})}
    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    if allowed != ALLOWED_FAILURES:
        log.warning("the scheduler allows %s worker deaths per task (distributed.scheduler.allowed-failures); "
                    "glomscan's rule is %d (retry a slide once). Start the scheduler with "
                    "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=%d", allowed, ALLOWED_FAILURES, ALLOWED_FAILURES)
    for name in ("GPU", "SLOT"):
        if name in declared:
            return name
    raise ValueError("the Dask workers declare neither a GPU nor a SLOT resource, so nothing stops two slides "
                     "sharing one GPU; start each worker with `dask worker SCHEDULER --nthreads 1 --resources GPU=1`")


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _run_jobs(client, jobs: list[SlideJob], recorder, out_dir: Path, model: LoadedModel, make_engine,
              settings: AnalysisSettings, resource: str, quiet: bool) -> None:
    from distributed import as_completed

    from .progress import Progress

    futures = {}
    for job in jobs:
        future = client.submit(analyze_on_worker, job, str(out_dir), str(model.path), model.sha256, make_engine,
                               settings, key=f"glomscan-slide-{job.name}-{uuid.uuid4().hex[:8]}",
                               resources={resource: 1}, pure=False)
        futures[future] = job
    try:
        with Progress(len(jobs), "batch", quiet=quiet, unit="slide") as progress:
            for future in as_completed(list(futures)):
                job = futures[future]
                try:
                    report = future.result()
                except OutputNotWritable as exc:
                    client.cancel(list(futures))
                    recorder.stop(exc, [j for j in jobs if j.name not in recorder.reports])
                    return
                except Exception as exc:  # the worker died (twice), the task could not run, ...
                    report = _lost_slide(job, model, exc)
                    try:
                        record_failure(out_dir / job.name, report)
                    except OSError as write_exc:
                        log.error("%s: cannot record the failure: %s", job.name, write_exc)
                recorder.add(report)
                progress.update()
    except BaseException:
        client.cancel(list(futures))
        raise


def _lost_slide(job: SlideJob, model: LoadedModel, exc: BaseException) -> SlideReport:
    from distributed.scheduler import KilledWorker

    if isinstance(exc, KilledWorker):
        reason = (f"the worker analysing this slide died {ALLOWED_FAILURES + 1} times (retried once): "
                  f"{type(exc).__name__} (out of memory or killed?)")
    else:
        reason = f"{type(exc).__name__} on the cluster: {exc}"
    return SlideReport(slide=job.name, path=str(job.path), status="failed", reason=reason,
                       model_id=model.model_id, model_sha256=model.sha256, fingerprint=job.fingerprint)
