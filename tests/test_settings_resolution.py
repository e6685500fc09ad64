"""Analysis settings are resolved from the user's options and the model card in one place
(``config.analysis_settings_for``): its rules, and that the package builds them nowhere else."""

import ast
from pathlib import Path

import pytest

import glomscan
from glomscan.config import AnalysisSettings, analysis_settings_for, default_overlap
from glomscan.model import ModelCard

PACKAGE = Path(glomscan.__file__).parent


def test_tile_and_overlap_come_from_the_card_unless_given():
    card = ModelCard(name="m", tile=768)
    settings = analysis_settings_for(card, viewer=False, mpp_override=0.5)
    assert (settings.tile, settings.overlap, settings.viewer, settings.mpp_override) == (768, 192, False, 0.5)
    assert settings.target_mpp is None  # the card's, resolved per slide
    assert (analysis_settings_for(card, 512).overlap, analysis_settings_for(card, 512, 128).overlap) == (128, 128)
    # the dataclass's own default is the rule's for its default tile
    assert AnalysisSettings().overlap == default_overlap(AnalysisSettings().tile) == 256


def test_settings_that_cannot_run_are_refused():
    card = ModelCard(name="m", tile=1024)
    with pytest.raises(ValueError, match="multiples of") as refused:
        analysis_settings_for(card, card.tile + card.tile_multiple // 2)
    assert refused.value.setting == "tile"  # a front end points at its own option (the CLI: --tile)
    with pytest.raises(ValueError, match="overlap"):
        analysis_settings_for(card, 512, 512)


def test_no_other_module_builds_analysis_settings_from_options():
    """Outside config.py, AnalysisSettings is only called without arguments (to read a default);
    every caller with options goes through analysis_settings_for."""
    builders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "AnalysisSettings"
                    and (node.args or node.keywords)):
                builders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not builders
    assert AnalysisSettings().tile == ModelCard(name="m").tile  # the defaults agree with the card's
