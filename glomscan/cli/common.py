"""What every command shares: logging verbosity, the model option and its loading, the seed
option. Commands only parse options, call library functions and print short summaries."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path

import click

_QUIET_KEY = "glomscan.quiet"


def setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    logging.getLogger("pyvips").setLevel(logging.WARNING)  # libvips' own INFO chatter


def verbosity(command):
    """Adds ``--quiet/-q`` and ``--verbose/-v`` to a command and sets up logging from them before
    it runs: ``--quiet`` leaves warnings, errors and the command's result (its last lines on
    stdout); ``--verbose`` adds debug messages. Library calls learn it from ``is_quiet()``."""

    @click.option("--quiet", "-q", is_flag=True,
                  help="Only warnings, errors and the result (no progress or information messages).")
    @click.option("--verbose", "-v", is_flag=True, help="Debug logging (tracebacks of failures).")
    @functools.wraps(command)
    def wrapper(*args, quiet: bool, verbose: bool, **kwargs):
        if quiet and verbose:
            raise click.UsageError("--quiet and --verbose exclude each other")
        setup_logging(quiet, verbose)
        click.get_current_context().meta[_QUIET_KEY] = quiet
        return command(*args, **kwargs)

    return wrapper


def is_quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_QUIET_KEY))


def default(settings_class, name: str):
    """The default of a settings dataclass's field: command-line defaults are the settings
    classes' own, decided there once."""
    field = settings_class.__dataclass_fields__[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def seed_option(help: str = "Random seed (same seed, same result).", default: int = 0):
    return click.option("--seed", type=int, default=default, show_default=True, help=help)


def model_option(help: str = "glomscan checkpoint (.pt) or ONNX model file (.onnx, from export-onnx --model-file). "
                              "Default: the model shipped with the package."):
    return click.option("--model", "model_path", type=click.Path(path_type=Path), default=None, help=help)


def load_model_or_exit(model_path: Path | None):
    """The checkpoint or ONNX model file at ``model_path`` (default: the shipped model); a usage
    error (exit 2) naming the problem when it cannot be used."""
    from ..model import CheckpointError, load_model
    from ..shipped import default_model_path

    if model_path is None:
        model_path = default_model_path()
        if model_path is None:
            raise click.UsageError(
                "no --model given and this build ships no default model yet; create a demo "
                "checkpoint with `glomscan init-model --out model.pt` (random weights) or pass a trained one")
    try:
        return load_model(model_path)
    except CheckpointError as exc:
        raise click.UsageError(str(exc)) from exc


def verifier_options(f):
    """``--verifier PATH`` and ``--no-verifier`` (the candidate verifier, second stage)."""
    f = click.option("--no-verifier", is_flag=True,
                     help="Do not run the candidate verifier: every candidate of the segmentation model counts.")(f)
    return click.option("--verifier", "verifier_path", type=click.Path(path_type=Path), default=None,
                        help="Candidate verifier file (.onnx, from 'glomscan train verifier') checking and grading "
                             "every candidate. Default: the verifier shipped with the package, with the shipped "
                             "model only (a verifier is trained on one segmentation model's candidates).")(f)


def attach_verifier_or_exit(model, model_path: Path | None, verifier_path: Path | None, no_verifier: bool):
    """Pair ``model`` with its verifier: the one named, else the shipped one when the shipped
    model is used, else none; a usage error (exit 2) naming the problem when it cannot be used."""
    from ..shipped import default_verifier_path
    from ..verify import VerifierError, load_verifier

    if no_verifier:
        if verifier_path is not None:
            raise click.UsageError("--verifier and --no-verifier contradict each other")
        model.verifier = None
        return model
    if verifier_path is None and model_path is None:
        verifier_path = default_verifier_path()
    if verifier_path is not None:
        try:
            model.verifier = load_verifier(verifier_path)
        except VerifierError as exc:
            raise click.UsageError(str(exc)) from exc
    return model


def warn_if_not_for_real_tissue(model) -> None:
    """Printed even with --quiet: results of such a model must not be read as findings."""
    if not model.card.for_real_tissue:
        click.echo(f"WARNING: model {model.model_id} is not validated on real tissue (its card: "
                   f"{model.card.intended_use}); its glomeruli and percentages mean nothing on real slides.", err=True)


def fail_on(*errors: type[BaseException]):
    """Turns the given library errors into a clean ``Error: ...`` (exit 1) instead of a traceback."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except errors as exc:
                raise click.ClickException(str(exc)) from exc

        return wrapper

    return decorate
