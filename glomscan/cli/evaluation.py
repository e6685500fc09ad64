"""For the people who judge models and results: ``evaluate segment | results | real | graded-crops | inpaint``."""

from __future__ import annotations

from pathlib import Path

import click

from .common import attach_verifier_or_exit, fail_on, is_quiet, load_model_or_exit, model_option, seed_option, verbosity, \
    verifier_options

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group(short_help="Score a model or a batch's results against pathologists' outlines.")
def evaluate():
    """Score segmentation models, analyze results, grading on graded crops and inpainting
    generators against the truth."""


@evaluate.command("segment", short_help="Pixel and detection scores of a model on a prepared set.")
@model_option()
@click.option("--data", "dataset_dir", type=EXISTING_DIR, required=True, help="Patch set made by 'glomscan prepare'.")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Which part of the prepared set to use.")
@click.option("--out", "out_prefix", type=click.Path(path_type=Path), default=Path("evaluation"), show_default=True,
              help="Writes OUT.csv and OUT.md.")
@verbosity
def evaluate_segment(model_path, dataset_dir, split, out_prefix):
    """Pixel precision/recall/F1/Dice per class and glomerulus detection (IoU >= 0.5) of a model
    on the patches of a prepared set."""
    from ..train.evaluation.evaluate import evaluate_patch_set, write_evaluation

    click.echo(write_evaluation(evaluate_patch_set(load_model_or_exit(model_path), dataset_dir, split), out_prefix))


@evaluate.command("results", short_help="Score an analyze output folder against QuPath outlines.")
@click.option("--results", "results_dir", type=EXISTING_DIR, required=True, help="An analyze output folder.")
@click.option("--truth", "truth_dir", type=EXISTING_DIR, required=True,
              help="Folder of QuPath GeoJSON outlines named after the slides.")
@click.option("--out", "out_prefix", type=click.Path(path_type=Path), default=Path("evaluation"), show_default=True,
              help="Writes OUT.csv and OUT.md.")
@verbosity
def evaluate_results(results_dir, truth_dir, out_prefix):
    """Per slide and overall: pixel Dice per class, glomerulus detection (IoU >= 0.5) and the
    error of the percent global glomerulosclerosis, of a batch's results against outlines."""
    from ..train.evaluation.evaluate import evaluate_results as score, write_evaluation

    click.echo(write_evaluation(score(results_dir, truth_dir), out_prefix))


@evaluate.command("real", short_help="Score a model through analyze on a real tile + crop set.")
@model_option()
@verifier_options
@click.option("--data", "dataset_dir", type=EXISTING_DIR, required=True,
              help="A set made by 'glomscan prepare --tiles ... --crops ...'.")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Which part of the prepared set to use.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="Inference backend (see analyze --help).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("evaluation-real"),
              show_default=True, help="analyze's outputs and the scores (metrics.json, glomeruli.csv, slides.csv).")
@verbosity
@fail_on(ValueError)
def evaluate_real(model_path, verifier_path, no_verifier, dataset_dir, split, backend, out_dir):
    """Score a model through analyze on a prepared tile + crop set: detection and glomerulus Dice
    on real tiles and composites, sclerosed sensitivity / specificity / balanced accuracy per
    graded glomerulus, per-slide %GS error, normal and sclerosed pixel Dice.

    On the real outlined tiles also: outlined glomeruli, detections, precision and recall
    (IoU >= 0.5), false detections per mm² of tissue and how many of them are called sclerosed,
    for the accepted glomeruli (tile_...) and for the segmentation model alone, the verifier's
    rejected candidates counted back in (tile_segmentation_only_...)."""
    from ..train.evaluation.prepared_set import evaluate_prepared_set

    model = attach_verifier_or_exit(load_model_or_exit(model_path), model_path, verifier_path, no_verifier)
    _echo_metrics(evaluate_prepared_set(model, dataset_dir, out_dir, backend, split), out_dir)


def _echo_metrics(metrics: dict, out_dir: Path) -> None:
    for key, value in metrics.items():
        click.echo(f"  {key:<46} {value:.4f}" if isinstance(value, float) else f"  {key:<46} {value}")
    click.echo(f"-> {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'}")


@evaluate.command("graded-crops", short_help="Grading through analyze on graded single-glomerulus crops.")
@model_option()
@verifier_options
@click.option("--crops", "crops_dir", type=EXISTING_DIR, required=True,
              help="Folder of single-glomerulus crops (PNG, ...) with labels.csv: image, globally_sclerosed (0/1).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), required=True,
              help="The crops' resolution in µm per pixel (analyze brings them to the model's).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="Inference backend (see analyze --help).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("evaluation-graded-crops"), show_default=True,
              help="analyze's outputs and the scores (crops.csv, metrics.json, metrics.md).")
@verbosity
@fail_on(ValueError)
def evaluate_graded_crops(model_path, verifier_path, no_verifier, crops_dir, mpp, backend, out_dir):
    """Grading on graded crops of single glomeruli (e.g. another lab's): analyze each crop whole;
    its glomerulus is the detection containing the crop's centre, else the largest. Sclerosed
    sensitivity and specificity over all crops (not found or rejected is a miss) and over the
    crops whose glomerulus was found, balanced accuracy, outcome counts per true class; with the
    verifier's decisions and for the segmentation model alone (segmentation_only_...)."""
    from ..train.evaluation.graded_crops import evaluate_graded_crops as run

    model = attach_verifier_or_exit(load_model_or_exit(model_path), model_path, verifier_path, no_verifier)
    _echo_metrics(run(model, crops_dir, out_dir, mpp, backend), out_dir)


@evaluate.command("crossval", short_help="Cross-validate the verifier by tile group on real outlined tiles.")
@model_option("Segmentation model (default: the shipped model).")
@click.option("--data", "dataset_dir", type=EXISTING_DIR, required=True,
              help="A set made by 'glomscan prepare --tiles ... --crops ...'.")
@click.option("--folds", type=int, default=3, show_default=True, help="Folds over the training split's tile groups.")
@click.option("--epochs", type=int, default=12, show_default=True, help="Verifier training epochs per fold.")
@click.option("--hard-negatives/--no-hard-negatives", default=True, show_default=True,
              help="Train the fold verifiers on the mined negatives (--no-hard-negatives: to measure what they bring).")
@click.option("--validation-verifier", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Verifier trained on all training groups, scored on the validation groups (default: train one).")
@click.option("--samples-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cached samples of 'train verifier' on the same set and model (default: cut them into OUT/samples).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="Inference backend of the segmentation model.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Per fold: the verifier, analyze's outputs and scores; crossval.csv / crossval.json.")
@seed_option()
@verbosity
@fail_on(ValueError)
def evaluate_crossval(model_path, dataset_dir, folds, epochs, hard_negatives, validation_verifier, samples_dir, backend, out_dir, seed):
    """For each fold of the training split's tile groups, train a verifier without the fold's
    patches and score the pair through analyze on the fold's real tiles (the validation groups:
    with --validation-verifier or one trained on all training groups). The segmentation model is
    not retrained: it has seen the training tiles."""
    from ..train.evaluation.crossval import cross_validate
    from ..train.settings import VerifierSettings

    model = load_model_or_exit(model_path)
    if samples_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "samples"
        if not target.exists():
            target.symlink_to(Path(samples_dir).resolve())
    table = cross_validate(dataset_dir, out_dir, model, VerifierSettings(epochs=epochs, seed=seed, hard_negatives=hard_negatives), folds, backend,
                           validation_verifier, quiet=is_quiet())
    click.echo(table.to_string(index=False))
    click.echo(f"-> {out_dir / 'crossval.csv'}")


@evaluate.command("inpaint", short_help="MAE, PSNR, SSIM of an inpainting generator on crops.")
@click.option("--generator", "generator_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Inpainting generator file made by 'glomscan train inpaint'.")
@click.option("--crops", "crops_dir", type=EXISTING_DIR, required=True,
              help="Crops folder made by 'glomscan augment crops'.")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="test", show_default=True,
              help="Which part of the crops folder to use.")
@click.option("--out", "out_prefix", type=click.Path(path_type=Path), default=Path("inpaint-evaluation"),
              show_default=True, help="Writes OUT.csv (one row per crop) and OUT.summary.csv.")
@click.option("--device", default="cpu", show_default=True, help="cuda, cuda:1 or cpu.")
@verbosity
@fail_on(ValueError, FileNotFoundError)
def evaluate_inpaint(generator_path, crops_dir, split, out_prefix, device):
    """MAE, PSNR and SSIM inside each crop's mask between the original and the inpainted crop
    (generator output pasted inside the mask)."""
    from ..train.evaluation.inpainting import write_inpaint_evaluation
    from ..augment.inpaint import evaluate_crops_dir

    table, summary = evaluate_crops_dir(generator_path, crops_dir, None if split == "all" else split, device)
    per_crop = write_inpaint_evaluation(table, summary, out_prefix)
    click.echo(f"{len(table)} {split} crops, inside the generated region (mean over crops):")
    for _, row in summary.iterrows():
        click.echo(f"  {row.metric:<5} {row.value:9.4f}   paper {row.paper:9.4f}")
    click.echo(f"-> {per_crop}")


COMMANDS = (evaluate,)
