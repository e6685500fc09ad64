import json

import pandas as pd
import pytest
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings

from conftest import ORACLE_CHOICE, TEST_GLOMERULI, OracleEngine, copy_slide, oracle_model


def test_evaluate_analyze_results_against_geojson_truth(small_slide, tmp_path):
    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    run_batch(slides, tmp_path / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE,
              AnalysisSettings(tile=256, overlap=128), quiet=True)
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "case01.geojson").write_text(json.dumps(small_slide.qupath_geojson()))
    res = CliRunner().invoke(main, ["evaluate", "results", "--results", str(tmp_path / "out"), "--truth", str(tmp_path / "truth"),
                                    "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "eval.csv")
    overall = table[table["item"] == "ALL"].iloc[0]
    assert overall.dice_normal > 0.97 and overall.dice_sclerosed > 0.97
    assert overall.matched == len(TEST_GLOMERULI) and overall.detection_f1 == 1.0
    assert table.iloc[0].sclerosis_pct_error == pytest.approx(0.0, abs=0.01)  # report rounds to 2 decimals
    md = (tmp_path / "eval.md").read_text()
    assert "| sclerosed |" in md and "detection" in md


def test_evaluate_needs_a_mode():
    res = CliRunner().invoke(main, ["evaluate"])
    assert res.exit_code == 2


def test_graded_crops_command_is_listed():
    res = CliRunner().invoke(main, ["evaluate", "graded-crops", "--help"])
    assert res.exit_code == 0 and "--mpp" in res.output and "--crops" in res.output
    res = CliRunner().invoke(main, ["evaluate", "real", "--help"])
    assert "false detections per mm²" in res.output
