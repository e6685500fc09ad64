"""Command line: a thin click layer over glomscan's modules."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .config import BACKENDS, BLEND_WINDOWS, GPU_PRECISIONS, AnalysisSettings

log = logging.getLogger("glomscan")


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    logging.getLogger("pyvips").setLevel(logging.WARNING)  # libvips' own INFO chatter


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glomscan")
def main() -> None:
    """glomscan: glomerulus segmentation and percent global glomerulosclerosis for folders of
    whole-slide images."""


@main.command()
@click.argument("slides_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("glomscan-out"),
              show_default=True, help="Output folder (one sub-folder per slide, plus summary.csv).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="glomscan checkpoint (.pt). Default: the model shipped with the package.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto",
              show_default=True,
              help="Inference backend. auto: the first that works here of tensorrt, onnxruntime-CUDA, torch-CUDA, "
                   "openvino, onnxruntime, torch (the choice and its reason go into report.json).")
@click.option("--batch-size", type=int, default=0, show_default=True,
              help="Tiles per inference call; 0: the backend's choice (1 on CPU, 8 on GPU).")
@click.option("--tile", type=int, default=None,
              help="Tile side, analysis pixels. Default: the model card's (1024 for the shipped model).")
@click.option("--overlap", type=int, default=None, help="Tile overlap, analysis pixels. Default: half the tile.")
@click.option("--target-mpp", type=float, default=None,
              help="Analysis resolution in µm/px. Default: the model's (1.0 for the paper's setup).")
@click.option("--downsample", type=float, default=2.0, show_default=True,
              help="Level-0 downsample used only for slides whose mpp is unknown.")
@click.option("--mpp", "mpp_override", type=float, default=None,
              help="Level-0 µm/px for slides that carry none in their metadata.")
@click.option("--min-area-um2", type=float, default=1500.0, show_default=True,
              help="Drop glomerulus candidates smaller than this.")
@click.option("--readers", type=int, default=2, show_default=True,
              help="Tile reader threads per slide (prefetch tiles while the model runs).")
@click.option("--cluster", default=None, metavar="local|tcp://HOST:8786",
              help="Spread slides over Dask workers: 'local' starts one worker process per visible GPU "
                   "(or --workers on CPU); tcp://... uses a running Dask scheduler.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes of --cluster local (default: one per visible GPU; 2 without GPU).")
@click.option("--blend", type=click.Choice(BLEND_WINDOWS), default="cosine", show_default=True,
              help="Blending window of overlapping tiles.")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache of ONNX exports, OpenVINO models and TensorRT engines [env GLOMSCAN_ENGINE_DIR, "
                   "default ~/.cache/glomscan/engines].")
@click.option("--precision", type=click.Choice(GPU_PRECISIONS), default="fp16", show_default=True,
              help="Precision of the GPU backends (TensorRT engine, torch CUDA autocast); CPUs run fp32.")
@click.option("--recursive", is_flag=True, help="Also look for slides in sub-folders.")
@click.option("--force", is_flag=True, help="Redo slides whose outputs are complete and up to date.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging (tracebacks of failed slides).")
def analyze(slides_dir, out_dir, model_path, backend, batch_size, tile, overlap, target_mpp, downsample,
            mpp_override, min_area_um2, readers, cluster, workers, blend, engine_dir, precision, recursive, force,
            quiet, verbose):
    """Analyse every slide in SLIDES_DIR: masks, glomerulus tables, sclerosis reports, and the
    batch report OUT/index.html.

    Exit codes: 0 every slide ok; 1 some slide failed (reasons in summary.csv); 2 usage error
    (bad model, bad settings, output folder busy) before any slide is touched; 3 the output
    folder does not accept writes (read-only, disk full): the batch stopped, finished outputs
    kept; 130 interrupted (Ctrl-C): rerun the same command to resume.
    """
    _setup_logging(quiet, verbose)
    if workers is not None and cluster != "local":
        raise click.UsageError("--workers sets the worker processes of --cluster local "
                               "(tile reader threads are --readers)")
    if cluster not in (None, "local") and "://" not in cluster:
        raise click.UsageError(f"--cluster {cluster!r}: use 'local' or a scheduler address such as tcp://host:8786")
    model = _load_model_or_exit(model_path)
    # settings the model card owns are resolved here, once, and checked before any slide
    tile = tile or model.card.tile
    overlap = tile // 2 if overlap is None else overlap
    if tile % model.card.tile_multiple:
        raise click.UsageError(f"--tile {tile}: {model.card.name}'s encoder needs tiles that are multiples of "
                               f"{model.card.tile_multiple} px")
    settings = AnalysisSettings(target_mpp=target_mpp, downsample=downsample, mpp_override=mpp_override,
                                tile=tile, overlap=overlap, batch_size=max(batch_size, 1), workers=readers,
                                min_glomerulus_area_um2=min_area_um2, blend=blend)
    try:
        settings.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _warn_if_not_for_real_tissue(model)

    from .batch import OutputNotWritable, run_batch
    from .engines import EngineOptions, create_engine

    options = EngineOptions(precision=precision, max_batch=batch_size or 8, tile=tile,
                            **({"engine_dir": engine_dir} if engine_dir else {}))
    try:
        if cluster is not None:
            from .cluster import BackendEngine, run_cluster_batch

            log.info("model %s (%s); backend %s chosen on each Dask worker", model.model_id, model.card.trained_on,
                     backend)
            outcome = run_cluster_batch(slides_dir, out_dir, model, BackendEngine(backend, options, batch_size == 0),
                                        settings, cluster=cluster, workers=workers, force=force,
                                        recursive=recursive, quiet=quiet)
        else:
            try:
                engine, choice = create_engine(backend, model, options)
            except (RuntimeError, ValueError) as exc:
                raise click.UsageError(str(exc)) from exc
            if batch_size == 0:
                settings = dataclasses.replace(settings, batch_size=engine.preferred_batch_size)
            log.info("model %s (%s); backend %s: %s; batch size %d", model.model_id, model.card.trained_on,
                     choice.backend, choice.reason, settings.batch_size)
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
    if not quiet:
        click.echo(f"{len(outcome.reports)} slide(s): {len(outcome.reports) - len(outcome.failed)} ok, "
                   f"{len(outcome.failed)} failed. Summary: {out_dir / 'summary.csv'}, report: {out_dir / 'index.html'}")
    if outcome.output_error:
        click.echo(f"Error: {outcome.output_error}", err=True)
        sys.exit(3)
    sys.exit(1 if outcome.failed else 0)


def _load_model_or_exit(model_path: Path | None):
    from .model import CheckpointError, load_checkpoint
    from .shipped import default_model_path

    if model_path is None:
        model_path = default_model_path()
        if model_path is None:
            raise click.UsageError(
                "no --model given and this build ships no default model yet; create a demo "
                "checkpoint with `glomscan init-model --out model.pt` (random weights) or pass a trained one")
    try:
        return load_checkpoint(model_path)
    except CheckpointError as exc:
        raise click.UsageError(str(exc)) from exc


def _warn_if_not_for_real_tissue(model) -> None:
    """Printed even with --quiet: results of such a model must not be read as findings."""
    if not model.card.for_real_tissue:
        click.echo(f"WARNING: model {model.model_id} is not validated on real tissue (its card: "
                   f"{model.card.intended_use}); its glomeruli and percentages mean nothing on real slides.", err=True)


@main.command("init-model")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint file to write.")
@click.option("--encoder", default="efficientnet-b3", show_default=True,
              help="smp encoder of the U-Net.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
@click.option("--analysis-mpp", type=float, default=1.0, show_default=True,
              help="Resolution the model will analyse at, µm per pixel.")
def init_model(out_path, encoder, seed, analysis_mpp):
    """Write a randomly initialised checkpoint (for demos and tests: it finds nothing real)."""
    import torch

    from .model import ModelCard, build_model, save_checkpoint

    torch.manual_seed(seed)
    card = ModelCard(name=f"random-init-{encoder}-seed{seed}", encoder=encoder, analysis_mpp=analysis_mpp,
                     trained_on="nothing (random initialisation)",
                     notes="Random weights: the output is meaningless. Demo/testing only.")
    sha = save_checkpoint(out_path, build_model(card), card)
    click.echo(f"wrote {out_path} ({card.name}, sha256 {sha[:12]})")


@main.command("export-onnx")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="glomscan checkpoint (default: the shipped model).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ONNX file to write.")
@click.option("--opset", type=int, default=17, show_default=True,
              help="ONNX opset (17 or later).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare ONNX Runtime with torch on a random batch (max abs difference <= 1e-4).")
def export_onnx_cmd(model_path, out_path, opset, check):
    """Export the U-Net to ONNX (dynamic batch, height, width; sigmoid included)."""
    _setup_logging(quiet=False)
    from .engines.onnx import export_onnx

    model = _load_model_or_exit(model_path)
    try:
        export_onnx(model, out_path, opset=opset)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"wrote {out_path} (opset {opset}, model {model.model_id})")
    if check:
        from .engines.onnx import onnx_parity

        diff = onnx_parity(model, out_path)
        click.echo(f"ONNX Runtime vs torch: max abs difference {diff:.2e}")
        if diff > 1e-4:
            raise click.ClickException(f"parity check failed: {diff:.2e} > 1e-4")


@main.command("build-engine")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="glomscan checkpoint (default: the shipped model).")
@click.option("--precision", type=click.Choice(GPU_PRECISIONS), default="fp16", show_default=True,
              help="Engine precision (the same flag as analyze's, so analyze finds this engine).")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Largest batch the TensorRT profile accepts (analyze asks for --batch-size, else 8).")
@click.option("--tile", type=int, default=None, help="Tile size of the profile (default: the model's).")
@click.option("--workspace", "workspace_gb", type=float, default=4.0, show_default=True, help="Builder workspace, GiB.")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Engine cache [env GLOMSCAN_ENGINE_DIR, default ~/.cache/glomscan/engines].")
def build_engine_cmd(model_path, precision, max_batch, tile, workspace_gb, engine_dir):
    """Build (or find) the TensorRT engine for this model on this GPU."""
    _setup_logging(quiet=False)
    from .engines.base import default_engine_dir
    from .engines.tensorrt import TensorRTUnavailable, prepare_tensorrt

    model = _load_model_or_exit(model_path)
    try:
        _, how = prepare_tensorrt(model, engine_dir or default_engine_dir(), precision, tile or model.card.tile,
                                  max_batch, workspace_gb)
    except TensorRTUnavailable as exc:
        raise click.ClickException(f"cannot build a TensorRT engine here: {exc}") from exc
    click.echo(how)


@main.command("synth-slides")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=int, default=10, show_default=True,
              help="Number of synthetic slides.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
def synth_slides(out_dir, count, seed):
    """Write synthetic training slides (OUT/slides/*.tif) with QuPath GeoJSON annotations
    (OUT/annotations/*.geojson)."""
    import json

    from .synthetic import training_slide

    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(exist_ok=True)
    for i in range(count):
        slide = training_slide(out_dir / "slides" / f"synthetic{i:03d}.tif", seed=seed + i)
        (out_dir / "annotations" / f"synthetic{i:03d}.geojson").write_text(json.dumps(slide.qupath_geojson()))
    click.echo(f"wrote {count} slides and annotations under {out_dir}")


@main.command()
@click.option("--slides", "slides_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Annotated slides (with --annotations).")
@click.option("--annotations", "annotations_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Per slide: <stem>.geojson (QuPath), <stem>_labels.png, or <stem>_normal.png + <stem>_sclerosed.png.")
@click.option("--tiles", "tiles_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Tile set: images/<name> + masks/<name> (binary glomerulus masks, class unknown).")
@click.option("--tiles-mpp", type=float, default=0.5, show_default=True, help="µm/px of the tile set's images.")
@click.option("--crops", "crops_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Glomerulus crop set: labels.csv (image, slide, globally_sclerosed) + images/ + masks/; "
                   "composited into the tile set's tissue.")
@click.option("--composite-uses", type=int, default=3, show_default=True,
              help="Times each training crop is pasted (each time another size, place and stain).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the prepared set (images/, masks/, manifest.csv).")
@click.option("--tile", type=int, default=1024, show_default=True, help="Patch side cut from slides (analysis px).")
@click.option("--stride", type=int, default=512, show_default=True, help="Patch stride on slides (analysis px).")
@click.option("--target-mpp", type=float, default=1.0, show_default=True, help="Analysis resolution, µm/px.")
@click.option("--downsample", type=float, default=2.0, show_default=True, help="For slides without mpp.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of slides (and tile groups) for validation.")
@click.option("--class-map", default=None,
              help='QuPath class names, e.g. "Glomerulus=normal,Sclerotic=sclerosed,Other=ignore" (default: common names).')
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
def prepare(slides_dir, annotations_dir, tiles_dir, tiles_mpp, crops_dir, composite_uses, out_dir, tile, stride,
            target_mpp, downsample, val_fraction, class_map, seed):
    """Build a training set (patches + label masks + manifest.csv) from annotated slides, tile sets
    with glomerulus masks, and graded glomerulus crops composited into tissue."""
    _setup_logging(quiet=False)
    from .train.data import AnnotationError, PrepareSettings, parse_class_map, prepare_dataset
    from .train.sources import SourceError

    try:
        settings = PrepareSettings(target_mpp=target_mpp, downsample=downsample, tile=tile, stride=stride,
                                   validation_fraction=val_fraction, seed=seed, class_map=parse_class_map(class_map),
                                   tiles_mpp=tiles_mpp, composite_uses=composite_uses)
        manifest = prepare_dataset(slides_dir, annotations_dir, out_dir, settings, tiles_dir=tiles_dir,
                                   crops_dir=crops_dir)
    except (AnnotationError, SourceError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    counts = manifest.groupby(["kind", "split"]).size().to_dict()
    click.echo(f"wrote {len(manifest)} patches to {out_dir} ({counts}); manifest {out_dir / 'manifest.csv'}")


@main.group()
def train():
    """Train models: the segmentation U-Net, the inpainting GAN, the mask DCGAN."""


@train.command("segment")
@click.option("--data", "dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Set made by 'glomscan prepare'.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Best checkpoint; OUT.last.pt (resume state) and OUT.metrics.csv are written next to it.")
@click.option("--epochs", type=int, default=200, show_default=True,
              help="Training epochs.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Samples per training step.")
@click.option("--lr", type=float, default=1e-4, show_default=True,
              help="Adam learning rate at the start (cosine schedule).")
@click.option("--min-lr", type=float, default=1e-5, show_default=True,
              help="Learning rate at the end of the cosine schedule.")
@click.option("--crop", type=int, default=None, help="Random training crops of this side (CPU-friendly).")
@click.option("--encoder", default="efficientnet-b3", show_default=True,
              help="smp encoder of the U-Net.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local encoder state dict (no downloads).")
@click.option("--max-steps-per-epoch", type=int, default=None,
              help="Stop each epoch after this many steps (default: one pass over the training set).")
@click.option("--bn-recalibration-steps", type=int, default=20, show_default=True,
              help="Exact BatchNorm statistics over this many batches before each validation (0: off).")
@click.option("--name", default="glomscan-unet", show_default=True,
              help="Model name recorded in the card.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="auto: fp16 autocast on CUDA, bf16 autocast + channels_last on CPUs with bf16 instructions, else fp32.")
@click.option("--tile", "card_tile", type=int, default=None,
              help="Analysis tile the model card records (default: the patch size of the set).")
@click.option("--stain-jitter", type=float, default=0.0, show_default=True,
              help="Whole-patch stain augmentation: optical density gain 1 +- this.")
@click.option("--jpeg-min-quality", type=click.IntRange(1, 95), default=None,
              help="JPEG augmentation: half the patches compressed (4:2:0 chroma, as scanners do) at a quality "
                   "drawn from [this, 95].")
@click.option("--init", "init_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from this glomscan checkpoint's weights (fine-tuning) instead of random ones.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes that load and augment patches while the model trains (0: in the training process).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
@click.option("--quiet", "-q", is_flag=True,
              help="Only warnings and errors.")
def train_segment(dataset_dir, out_path, epochs, batch_size, lr, min_lr, crop, encoder, encoder_weights,
                  max_steps_per_epoch, bn_recalibration_steps, name, precision, card_tile, stain_jitter, jpeg_min_quality,
                  init_path, workers, seed, quiet):
    """Train the U-Net (0.5*BCE + Dice, Adam, cosine LR); resumes from OUT.last.pt if present."""
    _setup_logging(quiet)
    from .train.segment import TrainConfig, train_segmentation

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, crop=crop, encoder=encoder,
                         encoder_weights=encoder_weights, max_steps_per_epoch=max_steps_per_epoch,
                         bn_recalibration_steps=bn_recalibration_steps, name=name, seed=seed,
                         precision=precision, stain_jitter=stain_jitter, tile=card_tile, workers=workers,
                         jpeg_min_quality=jpeg_min_quality, init=init_path)
    try:
        best = train_segmentation(dataset_dir, out_path, config, quiet=quiet)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"best validation Dice {best.get('dice_mean', float('nan')):.4f} -> {out_path}")


@main.group(invoke_without_command=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="glomscan checkpoint (default: the shipped model).")
@click.option("--data", "dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Patch set made by 'glomscan prepare' (with --model).")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Which part of the prepared set to use.")
@click.option("--results", "results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="An analyze output folder (with --truth).")
@click.option("--truth", "truth_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of QuPath GeoJSON outlines named after the slides (with --results).")
@click.option("--out", "out_prefix", type=click.Path(path_type=Path), default=Path("evaluation"), show_default=True,
              help="Writes OUT.csv and OUT.md.")
@click.pass_context
def evaluate(ctx, model_path, dataset_dir, split, results_dir, truth_dir, out_prefix):
    """Segmentation: pixel precision/recall/F1/Dice per class, glomerulus detection (IoU >= 0.5)
    and, for slides, sclerosis % error. Either --model + --data (patch set) or --results + --truth.
    `glomscan evaluate inpaint ...` judges an inpainting generator instead."""
    if ctx.invoked_subcommand is not None:
        return
    from .train.evaluate import evaluate_patch_set, evaluate_results, markdown_table

    if dataset_dir is not None and results_dir is None:
        table = evaluate_patch_set(_load_model_or_exit(model_path), dataset_dir, split)
    elif results_dir is not None and truth_dir is not None:
        table = evaluate_results(results_dir, truth_dir)
    else:
        raise click.UsageError("give --data (with --model) or --results and --truth")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_prefix.with_suffix(".csv"), index=False)
    md = markdown_table(table)
    out_prefix.with_suffix(".md").write_text(md)
    click.echo(md)


@main.command("pack-model")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="New model name for the card.")
@click.option("--trained-on", default=None, help="Replace the card's training-data description.")
@click.option("--intended-use", default=None, help="Replace the card's intended use (shown in every report).")
@click.option("--licence", default=None, help="Terms the weights inherit from their training data.")
@click.option("--for-real-tissue/--not-for-real-tissue", default=None,
              help="Mark the model as validated on real tissue (analyze warns about models that are not).")
@click.option("--validation", "validation_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="metrics.json of 'glomscan evaluate real' to record in the card.")
def pack_model(checkpoint, out_path, name, trained_on, intended_use, licence, for_real_tissue, validation_json):
    """Rewrite a checkpoint with fp16 weights (half the size; loaded back as fp32) and card edits."""
    from dataclasses import replace

    from .model import save_checkpoint

    model = _load_model_or_exit(checkpoint)
    edits = {"name": name, "trained_on": trained_on, "intended_use": intended_use, "licence": licence}
    card = replace(model.card, **{k: v for k, v in edits.items() if v})
    if for_real_tissue is not None:
        card = replace(card, for_real_tissue=for_real_tissue)
    if validation_json is not None:
        import json

        card = replace(card, metrics={**card.metrics, "validation": json.loads(validation_json.read_text())})
    sha = save_checkpoint(out_path, model.module, card, half=True)
    click.echo(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, sha256 {sha[:12]})")


@main.command("demo-slide")
@click.argument("out_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=7, show_default=True,
              help="Random seed of the glomeruli's placement.")
def demo_slide_cmd(out_path, seed):
    """Write the synthetic demo slide (pyramidal TIFF, 0.5 µm/px, known glomeruli)."""
    from .synthetic import demo_slide

    out_path.parent.mkdir(parents=True, exist_ok=True)
    slide = demo_slide(out_path, seed=seed)
    n_scl = sum(g.sclerosed for g in slide.glomeruli)
    click.echo(f"wrote {out_path}: {slide.width}x{slide.height} px, {len(slide.glomeruli)} glomeruli "
               f"({n_scl} sclerosed, {100 * n_scl / max(len(slide.glomeruli), 1):.1f}%)")


# --- inpainting model (issue #5): `train inpaint`, `evaluate inpaint` ---------------------------

@train.command("inpaint")
@click.option("--crops", "crops_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Crops folder made by 'glomscan crops'.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Generator file; OUT.last.pt (resume), OUT.metrics.csv, OUT.samples/ are written next to it.")
@click.option("--epochs", type=int, default=100, show_default=True,
              help="Training epochs.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Samples per training step.")
@click.option("--lr", type=float, default=1e-4, show_default=True,
              help="Adam learning rate of the generator and both discriminators (constant).")
@click.option("--size", type=int, default=None, help="Train at this crop side (resized; CPU-friendly, e.g. 128).")
@click.option("--base-channels", type=int, default=64, show_default=True,
              help="Width of the first convolution layer (network size).")
@click.option("--lambda-local-l1", type=float, default=1.0, show_default=True, help="Weight of the local L1 loss.")
@click.option("--vgg-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local torchvision VGG19 state dict for the perceptual/style losses (without it they are off).")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random flips and 90° rotations.")
@click.option("--max-steps-per-epoch", type=int, default=None,
              help="Stop each epoch after this many steps (default: one pass over the training set).")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
@click.option("--quiet", "-q", is_flag=True,
              help="Only warnings and errors.")
def train_inpaint(crops_dir, out_path, epochs, batch_size, lr, size, base_channels, lambda_local_l1, vgg_weights,
                  augment, max_steps_per_epoch, device, seed, quiet):
    """Train the inpainting GAN (AOT generator, global + local LSGAN discriminators); resumes
    from OUT.last.pt if present."""
    _setup_logging(quiet)
    from .train.inpaint import InpaintSettings, train_inpainting

    settings = InpaintSettings(epochs=epochs, batch_size=batch_size, lr=lr, size=size, base_channels=base_channels,
                               lambda_local_l1=lambda_local_l1, vgg_weights=vgg_weights, augment=augment,
                               max_steps_per_epoch=max_steps_per_epoch, device=device, seed=seed)
    try:
        row = train_inpainting(crops_dir, out_path, settings, quiet=quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if row:
        click.echo(f"epoch {row['epoch']}: held-out MAE {row['test_mae']:.4f}, PSNR {row['test_psnr']:.2f} dB, "
                   f"SSIM {row['test_ssim']:.3f} -> {out_path}")


@evaluate.command("real")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="glomscan checkpoint (default: the shipped model).")
@click.option("--data", "dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A set made by 'glomscan prepare --tiles ... --crops ...'.")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Which part of the prepared set to use.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]), default="auto", show_default=True,
              help="Inference backend (see analyze --help).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("evaluation-real"),
              show_default=True, help="analyze's outputs and the scores (metrics.json, glomeruli.csv, slides.csv).")
def evaluate_real(model_path, dataset_dir, split, backend, out_dir):
    """Score a model through analyze on a prepared tile + crop set: detection and glomerulus Dice
    on real tiles and composites, sclerosed sensitivity / specificity / balanced accuracy per
    graded glomerulus, per-slide %GS error, normal and sclerosed pixel Dice."""
    _setup_logging(quiet=True)
    from .train.evaluate import evaluate_prepared_set, real_metrics_markdown

    try:
        metrics = evaluate_prepared_set(_load_model_or_exit(model_path), dataset_dir, out_dir, backend, split)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    (out_dir / "metrics.md").write_text(real_metrics_markdown(metrics))
    for key, value in metrics.items():
        click.echo(f"  {key:<34} {value:.4f}" if isinstance(value, float) else f"  {key:<34} {value}")
    click.echo(f"-> {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'}")


@evaluate.command("inpaint")
@click.option("--generator", "generator_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True,
              help="Inpainting generator file made by 'glomscan train inpaint'.")
@click.option("--crops", "crops_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Crops folder made by 'glomscan crops'.")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="test", show_default=True,
              help="Which part of the prepared set to use.")
@click.option("--out", "out_prefix", type=click.Path(path_type=Path), default=None,
              help="Writes OUT.csv (one row per crop) and OUT.summary.csv (default: inpaint-evaluation).")
@click.option("--device", default="cpu", show_default=True,
              help="cuda, cuda:1 or cpu (default: cuda if available).")
def evaluate_inpaint(generator_path, crops_dir, split, out_prefix, device):
    """MAE, PSNR and SSIM inside each crop's mask between the original and the inpainted crop
    (generator output pasted inside the mask)."""
    from .train.inpaint import evaluate_crops_dir

    try:
        table, summary = evaluate_crops_dir(generator_path, crops_dir, None if split == "all" else split, device)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    out_prefix = out_prefix or Path("inpaint-evaluation")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_prefix.with_suffix(".csv"), index=False)
    summary.to_csv(Path(f"{out_prefix}.summary.csv"), index=False)
    click.echo(f"{len(table)} {split} crops, inside the generated region (mean over crops):")
    for _, row in summary.iterrows():
        click.echo(f"  {row.metric:<5} {row.value:9.4f}   paper {row.paper:9.4f}")
    click.echo(f"-> {out_prefix.with_suffix('.csv')}")


# --- sclerosed-glomerulus crops, mask GAN, synthesis (issue #5): `crops`, `train masks`,
# `masks generate`, `synthesize` ----------------------------------------------------------------

@main.command("crops")
@click.option("--data", "dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Set made by 'glomscan prepare'.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the glomerulus crops.")
@click.option("--size", type=int, default=256, show_default=True, help="Crop side, px.")
@click.option("--test-fraction", type=float, default=0.2, show_default=True, help="Share of glomeruli for the test split.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="train", show_default=True,
              help="Dataset split the glomeruli come from.")
def crops_cmd(dataset_dir, out_dir, size, test_fraction, seed, split):
    """Crop every sclerosed glomerulus (centred on its minimum enclosing circle) with its mask."""
    _setup_logging(quiet=False)
    from .train.crops import CropSettings, make_crops

    try:
        summary = make_crops(dataset_dir, out_dir, CropSettings(size, test_fraction, seed, split))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    counts = summary.manifest.split.value_counts().to_dict()
    click.echo(f"wrote {len(summary.manifest)} crops to {out_dir} (train {counts.get('train', 0)}, test "
               f"{counts.get('test', 0)}) from {summary.census.total} sclerosed glomeruli; not cropped: "
               f"{summary.too_large} wider than {size} px, {summary.census.cut_only} cut by the patch border everywhere")


@train.command("masks")
@click.option("--crops", "crops_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Crops folder made by 'glomscan crops' (their outlines are the training masks).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Generator file; OUT.last.pt and OUT.metrics.csv are written next to it.")
@click.option("--epochs", type=int, default=200, show_default=True,
              help="Training epochs.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Samples per training step.")
@click.option("--image-size", type=click.Choice(["64", "128"]), default="64", show_default=True,
              help="Side of the generated masks, px.")
@click.option("--latent", type=int, default=100, show_default=True,
              help="Size of the DCGAN's latent vector.")
@click.option("--base-channels", type=int, default=64, show_default=True,
              help="Width of the first convolution layer (network size).")
@click.option("--lr", type=float, default=2e-4, show_default=True,
              help="Adam learning rate.")
@click.option("--steps-per-epoch", type=int, default=None, help="Default: one pass over the masks.")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="train", show_default=True,
              help="Which part of the prepared set to use.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
@click.option("--quiet", "-q", is_flag=True,
              help="Only warnings and errors.")
def train_masks(crops_dir, out_path, epochs, batch_size, image_size, latent, base_channels, lr, steps_per_epoch,
                split, seed, quiet):
    """Train the mask DCGAN on the crops' glomerulus masks; resumes from OUT.last.pt if present."""
    _setup_logging(quiet)
    from .train.crops import read_crops
    from .train.maskgan import MaskGanConfig, train_mask_gan

    try:
        masks = [m for _, m in read_crops(crops_dir, None if split == "all" else split)]
        config = MaskGanConfig(epochs=epochs, batch_size=batch_size, image_size=int(image_size), latent=latent,
                               base_channels=base_channels, lr=lr, steps_per_epoch=steps_per_epoch, seed=seed)
        history = train_mask_gan(masks, out_path, config, quiet=quiet, info={"crops": str(crops_dir)})
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    last = history[-1] if history else {}
    click.echo(f"trained on {len(masks)} masks, epoch {last.get('epoch', 0)}: loss D {last.get('loss_d', float('nan')):.4f}, "
               f"G {last.get('loss_g', float('nan')):.4f} -> {out_path} (losses {out_path.with_suffix('.losses.csv')}, "
               f"samples {out_path.with_suffix('.samples.png')})")


@main.group()
def masks():
    """Glomerulus masks from the mask GAN."""


@masks.command("generate")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Mask generator made by 'glomscan train masks'.")
@click.option("--count", type=click.IntRange(min=1), required=True,
              help="How many to write.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the generated masks.")
@click.option("--size", type=int, default=256, show_default=True, help="Mask canvas side, px.")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Probability above which a generated pixel belongs to the mask.")
@click.option("--min-island-px", type=int, default=64, show_default=True, help="Islands below this area are removed.")
@click.option("--diameter-range", type=(float, float), default=None, metavar="MIN MAX",
              help="Equivalent diameters (px) spread evenly over this range (default: the real masks' range).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
def masks_generate(model_path, count, out_dir, size, threshold, min_island_px, diameter_range, seed):
    """Sample masks, threshold, keep one main contour, spread sizes evenly over a range, save PNGs + masks.csv."""
    from .train.maskgan import MaskSettings, generate_masks, load_mask_generator, write_masks

    try:
        generator, _, info = load_mask_generator(model_path)
        default = (info["diameter_min_px"], info["diameter_max_px"])
        settings = MaskSettings(size, threshold, min_island_px, tuple(diameter_range) if diameter_range else None, seed)
        generated, records = generate_masks(generator, count, settings, default)
        csv_path = write_masks(out_dir, generated, records)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    low, high = settings.diameter_range or default
    click.echo(f"wrote {len(generated)} masks ({size} px, equivalent diameters {low:.0f}-{high:.0f} px) to {out_dir}; "
               f"table {csv_path}")


@main.command("synthesize")
@click.option("--data", "dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Set made by 'glomscan prepare' whose tissue receives the synthetic glomeruli.")
@click.option("--generator", "generator_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Inpainting generator from 'glomscan train inpaint'.")
@click.option("--masks", "mask_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of glomerulus masks (from 'glomscan masks generate' or crops).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the new training patches.")
@click.option("--amount", type=float, default=1.0, show_default=True,
              help="Synthetic glomeruli per real sclerosed glomerulus of the training split.")
@click.option("--feather", "feather_px", type=float, default=0.0, show_default=True,
              help="Blend width (px) inside the mask border.")
@click.option("--min-distance-px", type=int, default=16, show_default=True,
              help="Gap kept to every labelled glomerulus.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (same seed, same result).")
def synthesize_cmd(dataset_dir, generator_path, mask_dir, out_dir, amount, feather_px, min_distance_px, seed):
    """Inpaint synthetic sclerosed glomeruli into training patches; writes a dataset 'train segment' reads."""
    _setup_logging(quiet=False)
    from .train.inpaint import load_inpainter
    from .train.maskgan import read_masks
    from .train.data import synthetic_rows
    from .train.synthesize import SynthesisSettings, synthesize

    try:
        inpainter = load_inpainter(generator_path)
        summary = synthesize(dataset_dir, out_dir, inpainter, read_masks(mask_dir),
                             SynthesisSettings(amount, feather_px, min_distance_px, seed))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    n_patches = int(synthetic_rows(summary.manifest).sum())
    click.echo(f"{len(summary.placements)} synthetic sclerosed glomeruli ({amount:g} x {summary.real_sclerosed} real) "
               f"in {n_patches} new training patches -> {out_dir} (examples {summary.examples_path})")


if __name__ == "__main__":  # pragma: no cover
    main()
