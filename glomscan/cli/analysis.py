"""For the people who run glomscan on slides: ``analyze`` and ``demo-slide``."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from ..config import BACKENDS, BLEND_WINDOWS, GPU_PRECISIONS, AnalysisSettings, SettingError, analysis_settings_for
from ..engines import EngineOptions
from .common import attach_verifier_or_exit, default, is_quiet, load_model_or_exit, model_option, seed_option, \
    verbosity, verifier_options, warn_if_not_for_real_tissue

log = logging.getLogger("glomscan")


@click.command(short_help="Analyse a folder of slides (masks, tables, %GS, batch report).")
@click.argument("slides_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("glomscan-out"),
              show_default=True, help="Output folder (one sub-folder per slide, plus summary.csv).")
@model_option()
@verifier_options
@click.option("--backend", type=click.Choice(BACKENDS), default="auto",
              show_default=True,
              help="Inference backend. auto: the first that works here of tensorrt, onnxruntime-CUDA, torch-CUDA, "
                   "openvino, onnxruntime, torch (the choice and its reason go into report.json).")
@click.option("--batch-size", type=int, default=0, show_default=True,
              help="Tiles per inference call; 0: the backend's choice (1 on CPU, 8 on GPU).")
@click.option("--tile", type=int, default=None,
              help="Tile side, analysis pixels. Default: the model card's (1024 for the shipped model).")
@click.option("--overlap", type=int, default=None, help="Tile overlap, analysis pixels. Default: a quarter of the tile (stride 768 for the shipped model's 1024 px tiles).")
@click.option("--target-mpp", type=float, default=None,
              help="Analysis resolution in µm/px. Default: the model's (1.0 for the paper's setup).")
@click.option("--downsample", type=float, default=default(AnalysisSettings, "downsample"), show_default=True,
              help="Level-0 downsample used only for slides whose mpp is unknown.")
@click.option("--mpp", "mpp_override", type=float, default=None,
              help="Level-0 µm/px for slides that carry none in their metadata.")
@click.option("--min-area-um2", type=float, default=default(AnalysisSettings, "min_glomerulus_area_um2"), show_default=True,
              help="Drop glomerulus candidates smaller than this.")
@click.option("--readers", type=int, default=default(AnalysisSettings, "workers"), show_default=True,
              help="Tile reader threads per slide (prefetch tiles while the model runs).")
@click.option("--merge-workers", type=click.IntRange(min=0), default=default(AnalysisSettings, "merge_workers"),
              show_default=True,
              help="Threads that blend tile predictions and find and measure glomeruli; 0: one per CPU this process "
                   "may use (its CPU affinity, or OMP_NUM_THREADS when smaller). Results do not depend on it.")
@click.option("--cluster", default=None, metavar="local|tcp://HOST:8786",
              help="Spread slides over Dask workers: 'local' starts one worker process per visible GPU "
                   "(or --workers on CPU); tcp://... uses a running Dask scheduler.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes of --cluster local (default: one per visible GPU; 2 without GPU).")
@click.option("--slides-in-flight", type=click.IntRange(min=1), default=None,
              help="Slides analysed at once per GPU, each in a worker process with its own CPU side and a share of "
                   "the GPU's memory (with --cluster local: Dask workers per GPU). Default: one per 2 cores of each "
                   "GPU's share, at most 8; 1 without a GPU (the CPU engines use every core for one slide). "
                   "Results do not depend on it.")
@click.option("--blend", type=click.Choice(BLEND_WINDOWS), default=default(AnalysisSettings, "blend"), show_default=True,
              help="Blending window of overlapping tiles.")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache of ONNX exports, OpenVINO models and TensorRT engines [env GLOMSCAN_ENGINE_DIR, "
                   "default ~/.cache/glomscan/engines].")
@click.option("--precision", type=click.Choice(GPU_PRECISIONS), default=default(EngineOptions, "precision"),
              show_default=True,
              help="Precision of the GPU backends (TensorRT engine, torch CUDA autocast); CPUs run fp32.")
@click.option("--viewer/--no-viewer", default=default(AnalysisSettings, "viewer"), show_default=True,
              help="Write OUT/<slide>/viewer.html: the slide zoomable (a Deep Zoom JPEG pyramid at the analysis "
                   "resolution; measured 0.36 MB and 0.06 s on 2 CPU cores per mm² of slide, 24 MB and 4 s for "
                   "67 mm²) with its glomeruli, to review and correct them (docs/outputs.md). Not part of the "
                   "result: changing it redoes no slide.")
@click.option("--recursive", is_flag=True, help="Also look for slides in sub-folders.")
@click.option("--force", is_flag=True, help="Redo slides whose outputs are complete and up to date.")
@verbosity
def analyze(slides_dir, out_dir, model_path, verifier_path, no_verifier, backend, batch_size, tile, overlap, target_mpp, downsample,
            mpp_override, min_area_um2, readers, merge_workers, cluster, workers, slides_in_flight, blend, engine_dir,
            precision, viewer, recursive, force):
    """Analyse every slide in SLIDES_DIR: masks, glomerulus tables, sclerosis reports, and the
    batch report OUT/index.html.

    Exit codes: 0 every slide ok; 1 some slide failed (reasons in summary.csv); 2 usage error
    (bad model, bad settings, output folder busy) before any slide is touched; 3 the output
    folder does not accept writes (read-only, disk full): the batch stopped, finished outputs
    kept; 130 interrupted (Ctrl-C): rerun the same command to resume.
    """
    quiet = is_quiet()
    if workers is not None and cluster != "local":
        raise click.UsageError("--workers sets the worker processes of --cluster local "
                               "(tile reader threads are --readers)")
    if slides_in_flight is not None and cluster not in (None, "local"):
        raise click.UsageError("--slides-in-flight: a running Dask scheduler's workers decide how many slides share "
                               "a GPU (start several workers per GPU, each with --resources GPU=1)")
    if cluster not in (None, "local") and "://" not in cluster:
        raise click.UsageError(f"--cluster {cluster!r}: use 'local' or a scheduler address such as tcp://host:8786")
    model = attach_verifier_or_exit(load_model_or_exit(model_path), model_path, verifier_path, no_verifier)
    # settings the model card owns are resolved here, once, and checked before any slide
    try:
        settings = analysis_settings_for(model.card, tile, overlap, target_mpp=target_mpp, downsample=downsample,
                                         mpp_override=mpp_override, batch_size=max(batch_size, 1), workers=readers,
                                         merge_workers=merge_workers, min_glomerulus_area_um2=min_area_um2,
                                         blend=blend, viewer=viewer, verify_candidates=not no_verifier)
    except SettingError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.setting.replace('_', '-')}") from exc
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    tile = settings.tile
    warn_if_not_for_real_tissue(model)

    from ..batch import OutputNotWritable, run_batch
    from ..engines import create_engine

    options = EngineOptions(precision=precision, max_batch=batch_size or 8, tile=tile,
                            **({"engine_dir": engine_dir} if engine_dir else {}))
    if slides_in_flight is None and cluster in (None, "local"):
        import os

        from ..cluster import default_slides_in_flight, visible_gpus

        slides_in_flight = default_slides_in_flight(visible_gpus(), os.cpu_count() or 1)
    slides_in_flight = slides_in_flight or 1
    try:
        if cluster is not None:
            from ..cluster import BackendEngine, run_cluster_batch

            log.info("model %s (%s); backend %s chosen on each Dask worker", model.model_id, model.card.trained_on,
                     backend)
            outcome = run_cluster_batch(slides_dir, out_dir, model, BackendEngine(backend, options, batch_size == 0),
                                        settings, cluster=cluster, workers=workers, force=force,
                                        recursive=recursive, quiet=quiet, slides_per_gpu=slides_in_flight)
        elif slides_in_flight > 1:
            from ..cluster import BackendEngine, run_slide_workers_batch

            log.info("model %s (%s); backend %s chosen in each of the slide workers", model.model_id,
                     model.card.trained_on, backend)
            outcome = run_slide_workers_batch(slides_dir, out_dir, model, BackendEngine(backend, options, batch_size == 0),
                                              settings, slides_in_flight, force=force, recursive=recursive,
                                              quiet=quiet)
        else:
            try:
                engine, choice = create_engine(backend, model, options)
            except (RuntimeError, ValueError) as exc:
                raise click.UsageError(str(exc)) from exc
            if batch_size == 0:
                settings = dataclasses.replace(settings, batch_size=engine.preferred_batch_size)
            log.info("model %s (%s); backend %s: %s; batch size %d; verifier %s", model.model_id,
                     model.card.trained_on, choice.backend, choice.reason, settings.batch_size,
                     model.verifier.model_id if model.verifier is not None else "none")
            try:
                outcome = run_batch(slides_dir, out_dir, model, engine, choice, settings, force=force,
                                    recursive=recursive, quiet=quiet)
            finally:
                engine.close()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    except OutputNotWritable as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(3)
    except KeyboardInterrupt:
        click.echo(f"Interrupted: finished slides are published in {out_dir}; rerun the same command to resume.",
                   err=True)
        sys.exit(130)
    click.echo(f"{len(outcome.reports)} slide(s): {len(outcome.reports) - len(outcome.failed)} ok, "
        f"{len(outcome.failed)} failed. Summary: {out_dir / 'summary.csv'}, report: {out_dir / 'index.html'}")
    if outcome.output_error:
        click.echo(f"Error: {outcome.output_error}", err=True)
        sys.exit(3)
    sys.exit(1 if outcome.failed else 0)


@click.command("demo-slide", short_help="Write the synthetic demo slide (known glomeruli).")
@click.argument("out_path", type=click.Path(dir_okay=False, path_type=Path))
@seed_option("Random seed of the glomeruli's placement.", default=7)
@verbosity
def demo_slide(out_path, seed):
    """Write the synthetic demo slide (pyramidal TIFF, 0.5 µm/px, known glomeruli)."""
    from ..synthetic import demo_slide as write_demo_slide

    slide = write_demo_slide(out_path, seed=seed)
    n_scl = sum(g.sclerosed for g in slide.glomeruli)
    click.echo(f"wrote {out_path}: {slide.width}x{slide.height} px, {len(slide.glomeruli)} glomeruli "
        f"({n_scl} sclerosed, {100 * n_scl / max(len(slide.glomeruli), 1):.1f}%)")


COMMANDS = (analyze, demo_slide)
