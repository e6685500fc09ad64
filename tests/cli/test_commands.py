"""The command tree itself: every command documented, the same verbosity flags everywhere,
summaries that are whole phrases, commands listed by audience."""

from __future__ import annotations

import logging

import click
from click.testing import CliRunner

from glomscan.cli import SECTIONS, main


def leaf_commands(group: click.Group, prefix: str = "glomscan"):
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from leaf_commands(command, path)
        else:
            yield path, command


def all_commands(group: click.Group):
    for command in group.commands.values():
        yield command
        if isinstance(command, click.Group):
            yield from all_commands(command)


def test_every_command_has_help_and_every_option_a_help_text():
    for path, command in leaf_commands(main):
        assert command.help, path
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{path} {param.opts}"


def test_quiet_and_verbose_on_every_command():
    for path, command in leaf_commands(main):
        flags = {opt for p in command.params for opt in p.opts}
        assert {"--quiet", "-q", "--verbose", "-v"} <= flags, path


def test_summaries_are_not_cut_mid_phrase():
    for command in all_commands(main):
        short = command.get_short_help_str(limit=80)
        assert short and not short.endswith("..."), f"{command.name}: {short!r}"


def test_top_level_help_lists_every_command_once_under_its_audience():
    listed = [c.name for _, commands in SECTIONS for c in commands]
    assert sorted(listed) == sorted(main.commands)
    out = CliRunner().invoke(main, ["--help"]).output
    for title, commands in SECTIONS:
        assert f"{title}:" in out
    listing = out.split("Analysis:", 1)[1]
    assert "..." not in listing


def test_quiet_and_verbose_set_the_log_level_the_same_way_everywhere(tmp_path):
    runner = CliRunner()
    levels = {}
    for flag in ("-q", None, "-v"):
        args = ["init-model", "--out", str(tmp_path / f"{flag}.pt"), "--encoder", "resnet18"] + ([flag] if flag else [])
        res = runner.invoke(main, args)
        assert res.exit_code == 0 and res.output.startswith("wrote "), res.output  # the result line stays
        levels[flag] = logging.getLogger("glomscan").getEffectiveLevel()
    assert levels == {"-q": logging.WARNING, None: logging.INFO, "-v": logging.DEBUG}
    both = runner.invoke(main, ["init-model", "--out", str(tmp_path / "c.pt"), "-q", "-v"])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_every_trainer_takes_the_same_device_seed_and_resume_options():
    train = main.commands["train"]
    for name in ("segment", "inpaint", "masks"):
        flags = {opt for p in train.commands[name].params for opt in p.opts}
        assert {"--device", "--seed", "--epochs", "--batch-size", "--max-steps-per-epoch", "--out"} <= flags, name
