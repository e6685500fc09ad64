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


def _square(shape, r0, c0, size, value, out=None):
    import numpy as np

    out = np.zeros(shape, np.uint8) if out is None else out
    out[r0:r0 + size, c0:c0 + size] = value
    return out


def test_false_detections_counts_unmatched_components_and_their_class():
    import numpy as np

    from glomscan.train.evaluation.prepared_set import false_detections
    from glomscan.train.evaluation.metrics import instance_matches

    truth = _square((40, 60), 2, 2, 10, 3)          # one outlined glomerulus of unknown class
    _square((40, 60), 25, 45, 10, 3, truth)         # a second one, only grazed by a prediction
    pred = _square((40, 60), 3, 2, 10, 1)           # matches the first (IoU 0.82), normal
    _square((40, 60), 2, 20, 8, 1, pred)            # false, normal
    _square((40, 60), 20, 30, 6, 2, pred)           # false, sclerosed
    _square((40, 60), 33, 52, 3, 2, pred)           # overlaps the second outline with IoU < 0.5: false too
    pred[33, 52] = 1                                # a component's class is its majority label
    counts = false_detections(pred, truth)
    assert counts == {"n_predicted": 4, "n_true": 2, "matched": 1, "false": 3, "false_sclerosed": 2}
    inst = instance_matches(pred, truth)
    assert (inst["n_predicted"], inst["n_true"], inst["matched"]) == (4, 2, 1)

    # the brief's case: one matched, one false normal, one false sclerosed -> 2 false, 1 sclerosed
    pred = _square((40, 60), 2, 2, 10, 2)
    _square((40, 60), 2, 20, 8, 1, pred)
    _square((40, 60), 20, 30, 6, 2, pred)
    counts = false_detections(pred, _square((40, 60), 2, 2, 10, 3))
    assert (counts["matched"], counts["false"], counts["false_sclerosed"]) == (1, 2, 1)
    assert false_detections(np.zeros((5, 5), np.uint8), truth[:5, :5])["false"] == 0


def test_graded_crops_command_is_listed():
    res = CliRunner().invoke(main, ["evaluate", "graded-crops", "--help"])
    assert res.exit_code == 0 and "--mpp" in res.output and "--crops" in res.output
    res = CliRunner().invoke(main, ["evaluate", "real", "--help"])
    assert "false detections per mm²" in res.output
