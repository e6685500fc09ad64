"""Command line, grouped by audience: analysis (``analyze``, ``demo-slide``), models
(``init-model``, ``pack-model``, ``export-onnx``, ``build-engine``), training data and training
(``prepare``, ``synth-slides``, ``train ...``), evaluation (``evaluate ...``) and augmentation
(``augment ...``). A thin click layer: library functions do the work and write the files."""

from __future__ import annotations

import click

from .. import __version__
from . import analysis, augmentation, evaluation, models, training

SECTIONS = (
    ("Analysis", analysis.COMMANDS),
    ("Models", models.COMMANDS),
    ("Training", training.COMMANDS),
    ("Evaluation", evaluation.COMMANDS),
    ("Augmentation", augmentation.COMMANDS),
)


class _SectionedGroup(click.Group):
    """Lists the commands under their audience's heading in ``glomscan --help``."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, commands in SECTIONS:
            rows = [(c.name, c.get_short_help_str(limit=formatter.width)) for c in commands if not c.hidden]
            with formatter.section(title):
                formatter.write_dl(rows)


@click.group(cls=_SectionedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glomscan")
def main() -> None:
    """glomscan: glomerulus segmentation and percent global glomerulosclerosis for folders of
    whole-slide images."""


for _title, _commands in SECTIONS:
    for _command in _commands:
        main.add_command(_command)
