"""For the people who look after models: ``init-model``, ``pack-model``, ``pack-verifier``,
``model-card``, ``export-onnx``, ``build-engine``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import GPU_PRECISIONS
from ..engines import EngineOptions
from ..engines.onnx import OPSET
from ..model import ModelCard
from .common import default, load_model_or_exit, model_option, seed_option, verbosity


@click.command("init-model", short_help="Write a randomly initialised checkpoint (demos, tests).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint file to write.")
@click.option("--encoder", default=default(ModelCard, "encoder"), show_default=True,
              help="smp encoder of the U-Net.")
@seed_option()
@click.option("--analysis-mpp", type=float, default=default(ModelCard, "analysis_mpp"), show_default=True,
              help="Resolution the model will analyse at, µm per pixel.")
@verbosity
def init_model(out_path, encoder, seed, analysis_mpp):
    """Write a randomly initialised checkpoint (for demos and tests: it finds nothing real)."""
    from ..model import write_random_checkpoint

    card, sha = write_random_checkpoint(out_path, encoder, seed, analysis_mpp)
    click.echo(f"wrote {out_path} ({card.name}, sha256 {sha[:12]})")


@click.command("pack-model", short_help="Rewrite a checkpoint with fp16 weights and card edits.")
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
@verbosity
def pack_model(checkpoint, out_path, name, trained_on, intended_use, licence, for_real_tissue, validation_json):
    """Rewrite a checkpoint with fp16 weights (half the size; loaded back as fp32) and card edits."""
    from ..model import repack_checkpoint

    edits = {"name": name or None, "trained_on": trained_on or None, "intended_use": intended_use or None,
             "licence": licence or None, "for_real_tissue": for_real_tissue}
    validation = json.loads(validation_json.read_text()) if validation_json is not None else None
    sha = repack_checkpoint(load_model_or_exit(checkpoint), out_path, edits, validation)
    click.echo(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, sha256 {sha[:12]})")


@click.command("pack-verifier", short_help="Rewrite a verifier file with card edits (metrics, grading weight).")
@click.argument("verifier_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trained-on", default=None, help="Replace the card's training-data description.")
@click.option("--intended-use", default=None, help="Replace the card's intended use.")
@click.option("--licence", default=None, help="Terms the weights inherit from their training data.")
@click.option("--grading-weight", type=click.FloatRange(0, 1), default=None,
              help="Weight of the verifier's sclerosed share in the class decision (the rest: the segmentation's).")
@click.option("--min-glomerulus-probability", type=click.FloatRange(0, 1), default=None,
              help="Candidates with p(normal) + p(sclerosed) below this are rejected.")
@click.option("--validation", "validation_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="metrics.json of an evaluation to record in the card.")
@verbosity
def pack_verifier(verifier_path, out_path, trained_on, intended_use, licence, grading_weight,
                  min_glomerulus_probability, validation_json):
    """Rewrite a candidate verifier file with its card edited (weights unchanged)."""
    from ..verify import VerifierError, edit_verifier_card

    edits = {"trained_on": trained_on, "intended_use": intended_use, "licence": licence,
             "grading_weight": grading_weight, "min_glomerulus_probability": min_glomerulus_probability}
    validation = json.loads(validation_json.read_text()) if validation_json is not None else None
    try:
        card = edit_verifier_card(verifier_path, out_path, edits, validation)
    except VerifierError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"wrote {out_path} ({card.name}, grading weight {card.grading_weight}, "
               f"min p(glomerulus) {card.min_glomerulus_probability})")


@click.command("model-card", short_help="Print a model's or verifier's embedded card as markdown.")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--verifier", "is_verifier", is_flag=True, help="MODEL_PATH is a verifier file.")
@click.option("--update", "doc_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Replace the generated section of this markdown file instead of printing.")
@verbosity
def model_card(model_path, is_verifier, doc_path):
    """Print the card embedded in MODEL_PATH (default: the shipped model, or with --verifier the
    shipped verifier) as a markdown table, or write it into DOC's generated section."""
    from ..model import card_markdown, replace_card_section
    from ..shipped import SHIPPED_MODEL, SHIPPED_VERIFIER

    path = model_path or (SHIPPED_VERIFIER if is_verifier else SHIPPED_MODEL)
    if is_verifier:
        from ..verify import VerifierError, load_verifier

        try:
            loaded = load_verifier(path)
        except VerifierError as exc:
            raise click.UsageError(str(exc)) from exc
    else:
        loaded = load_model_or_exit(path)
    section = card_markdown(loaded.card, loaded.model_id, Path(path).name)
    if doc_path is None:
        click.echo(section, nl=False)
        return
    try:
        doc_path.write_text(replace_card_section(doc_path.read_text(), section))
    except ValueError as exc:
        raise click.UsageError(f"{doc_path}: {exc}") from exc
    click.echo(f"updated the card section of {doc_path} from {path}")


@click.command("export-onnx", short_help="Export the U-Net to an ONNX model file (runs without torch).")
@model_option()
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ONNX file to write.")
@click.option("--opset", type=int, default=OPSET, show_default=True,
              help="ONNX opset (17 or later).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare ONNX Runtime with torch on a random batch (max abs difference <= 1e-4).")
@click.option("--model-file", is_flag=True,
              help="Write a glomscan ONNX model file: the whole checkpoint inside (float16 where exact, as "
                   "pack-model stores it), so analyze, evaluate and train --init can use it instead of the .pt. "
                   "How the shipped default.onnx is made.")
@verbosity
def export_onnx(model_path, out_path, opset, check, model_file):
    """Export the U-Net to ONNX (dynamic batch, height, width; sigmoid included). The file
    carries the model card and the checkpoint's sha256, so `analyze --model FILE.onnx` runs it
    with onnxruntime or openvino without torch."""
    from ..engines.onnx import export_onnx as export, onnx_parity

    model = load_model_or_exit(model_path)
    try:
        export(model, out_path, opset=opset, model_file=model_file)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"wrote {out_path} (opset {opset}, model {model.model_id})")
    if check:
        diff = onnx_parity(model, out_path)
        click.echo(f"ONNX Runtime vs torch: max abs difference {diff:.2e}")
        if diff > 1e-4:
            raise click.ClickException(f"parity check failed: {diff:.2e} > 1e-4")


@click.command("build-engine", short_help="Build (or find) the TensorRT engine for this GPU.")
@model_option()
@click.option("--precision", type=click.Choice(GPU_PRECISIONS), default=default(EngineOptions, "precision"),
              show_default=True,
              help="Engine precision (the same flag as analyze's, so analyze finds this engine).")
@click.option("--max-batch", type=int, default=default(EngineOptions, "max_batch"), show_default=True,
              help="Largest batch the TensorRT profile accepts (analyze asks for --batch-size, else 8).")
@click.option("--tile", type=int, default=None, help="Tile size of the profile (default: the model's).")
@click.option("--workspace", "workspace_gb", type=float, default=default(EngineOptions, "workspace_gb"), show_default=True,
              help="Builder workspace, GiB.")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Engine cache [env GLOMSCAN_ENGINE_DIR, default ~/.cache/glomscan/engines].")
@verbosity
def build_engine(model_path, precision, max_batch, tile, workspace_gb, engine_dir):
    """Build (or find) the TensorRT engine for this model on this GPU."""
    from ..engines.base import default_engine_dir
    from ..engines.tensorrt import TensorRTUnavailable, prepare_tensorrt

    model = load_model_or_exit(model_path)
    try:
        _, how = prepare_tensorrt(model, engine_dir or default_engine_dir(), precision, tile or model.card.tile,
                                  max_batch, workspace_gb)
    except TensorRTUnavailable as exc:
        raise click.ClickException(f"cannot build a TensorRT engine here: {exc}") from exc
    click.echo(how)


COMMANDS = (init_model, pack_model, pack_verifier, model_card, export_onnx, build_engine)
