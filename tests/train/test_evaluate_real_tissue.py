"""Real-tissue figures of ``evaluate real`` (false detections with and without the verifier) and
``evaluate graded-crops`` (grading on another lab's single-glomerulus crops)."""

import json

import numpy as np
import pandas as pd
import pytest
import pyvips
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.train.evaluation.analyze_outputs import candidate_labels
from glomscan.train.evaluation.graded_crops import (CROP_OUTCOMES, evaluate_graded_crops, read_crop_labels,
                                                    score_graded_crops)
from glomscan.train.evaluation.prepared_set import real_metrics_markdown, score_prepared_set

from conftest import SHARED_DATA

PAS_CROPS = SHARED_DATA / "pas_glomeruli"


def _square(shape, r0, c0, size, value, out=None):
    out = np.zeros(shape, np.uint8) if out is None else out
    out[r0:r0 + size, c0:c0 + size] = value
    return out


def _ring(r0, c0, size, downsample=1.0):
    """A square outline around pixels [r0, r0 + size) x [c0, c0 + size) of the analysis image, as
    analyze writes it: (x, y) pixel-edge coordinates in level-0 pixels."""
    x0, y0, x1, y1 = (v * downsample for v in (c0, r0, c0 + size, r0 + size))
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(ring, candidate_class):
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection", "name": "rejected candidate 1",
                           "classification": {"name": "Not glomerulus", "color": [140, 140, 140]},
                           "measurements": {"glomscan id": 1, "class_probability": 0.6, "p_normal": 0.6,
                                            "p_sclerosed": 0.1},
                           "glomscan": {"candidate_class": candidate_class, "rejected_by": "verifier"}}}


def _write_result(folder, mask=None, report=None, rejected=None):
    """An analyze output folder written by hand: mask.tif, report.json, rejected.geojson."""
    folder.mkdir(parents=True, exist_ok=True)
    if mask is not None:
        pyvips.Image.new_from_array(np.ascontiguousarray(mask)).tiffsave(str(folder / "mask.tif"), tile=True,
                                                                        pyramid=True)
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    if rejected:
        (folder / "rejected.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": rejected}))


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    pyvips.Image.new_from_array(np.ascontiguousarray(array), interpretation="srgb" if array.ndim == 3 else "b-w") \
        .pngsave(str(path))


# --- real outlined tiles --------------------------------------------------------------------

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


def test_rejected_candidates_are_painted_back_as_their_own_objects():
    pred = _square((30, 30), 5, 5, 8, 1)
    rejected = [(np.asarray(_ring(5, 13, 6, downsample=2.0)), 2),  # touches the accepted glomerulus
                (np.asarray(_ring(20, 20, 0.2, downsample=2.0)), 1)]  # smaller than a pixel
    labels, components = candidate_labels(pred, rejected, downsample=2.0)
    assert (labels == 2).sum() == 36 and (labels[5:11, 13:19] == 2).all()
    assert (labels[5:13, 5:13] == 1).all() and labels[20, 20] == 1
    assert components.max() == 3 and set(np.unique(components[5:11, 13:19])) == {2}  # not merged
    same, _ = candidate_labels(pred, [], downsample=2.0)
    assert (same == pred).all()


def test_rejected_geojson_of_analyze_paints_back_what_the_verifier_erased(small_slide, tmp_path):
    """Through the real writer: the verifier's rejected candidate, painted back from
    rejected.geojson, restores the analysis without a verifier (pixels, class, detections)."""
    from pathlib import Path

    from glomscan.batch import run_batch
    from glomscan.config import AnalysisSettings
    from glomscan.train.evaluation.analyze_outputs import read_mask, read_rejected
    from glomscan.train.evaluation.prepared_set import false_detections
    from glomscan.verify import Verifier, VerifierCard

    from conftest import ORACLE_CHOICE, OracleEngine, copy_slide, oracle_model

    class RejectDarkest(Verifier):  # the darkest candidate is not a glomerulus; the grading is left alone
        def __init__(self):
            super().__init__(Path("stand-in.onnx"), VerifierCard(name="stand-in", grading_weight=0.0), "e" * 64)

        def probabilities(self, crops, batch_size=32):
            out = np.tile(np.asarray([[0.0, 0.5, 0.5]], np.float32), (len(crops), 1))
            out[int(np.argmin(crops.reshape(len(crops), -1).mean(axis=1)))] = (0.9, 0.05, 0.05)
            return out

    copy_slide(small_slide.path, tmp_path / "slides")
    results = {}
    for name, verifier in (("plain", None), ("verified", RejectDarkest())):
        model = oracle_model()
        model.verifier = verifier
        run_batch(tmp_path / "slides", tmp_path / name, model, OracleEngine(), ORACLE_CHOICE,
                  AnalysisSettings(tile=512, overlap=256, viewer=False), quiet=True)
        results[name] = tmp_path / name / "case01"
    plain, verified = read_mask(results["plain"]), read_mask(results["verified"])
    rejected = read_rejected(results["verified"])
    assert len(rejected) == 1
    ds = json.loads((results["verified"] / "report.json").read_text())["analysis_downsample"]
    labels, components = candidate_labels(verified, rejected, ds)
    restored = (labels > 0) & (verified == 0)
    erased = (plain > 0) & (verified == 0)
    assert erased.sum() > 100 and (restored & erased).sum() >= 0.97 * erased.sum()
    assert (restored & ~erased).sum() <= 0.03 * erased.sum()
    assert (labels[restored & erased] == plain[restored & erased]).all()  # the candidate class
    truth = np.where(plain > 0, 3, 0).astype(np.uint8)
    alone = false_detections(labels, truth, components=components)
    assert alone == false_detections(plain, truth) and alone["false"] == 0
    after = false_detections(verified, truth)
    assert after["n_predicted"] == alone["n_predicted"] - 1 and after["matched"] == alone["matched"] - 1


def _tile_set(root):
    """Two real tiles with outlines (label 3) and analyze outputs written by hand.

    tile_a (analysed at downsample 2): outlines at A and B; analyze accepted a normal glomerulus on
    A and a false sclerosed one; the verifier rejected the glomerulus on B (candidate sclerosed)
    and a false normal candidate. tile_b: no outline, one false normal glomerulus, a verifier ran
    and rejected nothing (no rejected.geojson)."""
    data, out = root / "data", root / "out"
    shape = (48, 48)
    truth_a = _square(shape, 2, 2, 12, 3)
    _square(shape, 30, 30, 12, 3, truth_a)
    truth_b = np.zeros(shape, np.uint8)
    rows = []
    for patch_id, truth in (("tile_a", truth_a), ("tile_b", truth_b)):
        _write_png(data / "images" / f"{patch_id}.png", np.full((*shape, 3), 200, np.uint8))
        _write_png(data / "masks" / f"{patch_id}.png", truth)
        rows.append({"patch_id": patch_id, "kind": "tile", "split": "val", "image": f"images/{patch_id}.png",
                     "mask": f"masks/{patch_id}.png", "slide": patch_id})
    pred_a = _square(shape, 2, 3, 12, 1)
    _square(shape, 20, 5, 6, 2, pred_a)
    _write_result(out / "analysis" / "tile_a", pred_a,
                  {"status": "ok", "tissue_area_mm2": 0.5, "analysis_downsample": 2.0, "n_candidates": 4,
                   "n_rejected": 2},
                  [_feature(_ring(30, 30, 12, 2.0), "sclerosed"), _feature(_ring(5, 30, 5, 2.0), "normal")])
    _write_result(out / "analysis" / "tile_b", _square(shape, 10, 10, 7, 1),
                  {"status": "ok", "tissue_area_mm2": 1.5, "analysis_downsample": 1.0, "n_candidates": 1,
                   "n_rejected": 0})
    return data, out, pd.DataFrame(rows)


def test_real_tiles_false_detections_with_and_without_the_verifier(tmp_path):
    data, out, manifest = _tile_set(tmp_path)
    m = score_prepared_set(data, manifest, out)
    assert m["tile_glomeruli_true"] == 2 and m["tile_tissue_mm2"] == 2.0 and m["tile_patches"] == 2
    # with the verifier: 3 detections, 1 matched, 2 false (1 called sclerosed)
    assert (m["tile_glomeruli_predicted"], m["tile_glomeruli_matched"]) == (3, 1)
    assert m["tile_detection_precision"] == pytest.approx(1 / 3) and m["tile_detection_recall"] == 0.5
    assert (m["tile_false_detections"], m["tile_false_detections_sclerosed"]) == (2, 1)
    assert m["tile_false_detections_per_mm2"] == pytest.approx(1.0)
    # the segmentation model alone: + the rejected true glomerulus and the rejected false one
    assert (m["tile_segmentation_only_glomeruli_predicted"], m["tile_segmentation_only_glomeruli_matched"]) == (5, 2)
    assert m["tile_segmentation_only_detection_precision"] == pytest.approx(0.4)
    assert m["tile_segmentation_only_detection_recall"] == 1.0
    assert (m["tile_segmentation_only_false_detections"], m["tile_segmentation_only_false_detections_sclerosed"]) \
        == (3, 1)
    assert m["tile_segmentation_only_false_detections_per_mm2"] == pytest.approx(1.5)
    assert (m["tile_verifier_ran"], m["tile_rejected_candidates"]) == (2, 2)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tile_segmentation_only_false_detections"] == 3
    md = (out / "metrics.md").read_text()
    assert md.startswith("| measure |") and "2 outlined glomeruli" in md
    assert "| segmentation alone | 2 | 5 | 2 | 0.400 | 1.000 | 1.50 (3) | 1 of 3 |" in md
    assert "| with verifier | 2 | 3 | 1 | 0.333 | 0.500 | 1.00 (2) | 1 of 2 |" in md
    assert "rejected 2 candidates" in md


def test_real_tiles_without_a_verifier_give_equal_rows(tmp_path):
    data, out, manifest = _tile_set(tmp_path)
    (out / "analysis" / "tile_a" / "rejected.geojson").unlink()
    for folder in ("tile_a", "tile_b"):
        report_path = out / "analysis" / folder / "report.json"
        report = json.loads(report_path.read_text())
        report.pop("n_rejected"), report.pop("n_candidates")  # older outputs carry neither
        report_path.write_text(json.dumps(report))
    m = score_prepared_set(data, manifest, out)
    for key in ("glomeruli_matched", "false_detections", "false_detections_sclerosed", "false_detections_per_mm2",
                "detection_precision", "detection_recall", "glomeruli_predicted"):
        assert m[f"tile_segmentation_only_{key}"] == m[f"tile_{key}"], key
    assert m["tile_verifier_ran"] == 0 and "No verifier ran" in real_metrics_markdown(m)
    # no report.json (mpp unknown): the rate per mm² is unknown, the counts stay
    for folder in ("tile_a", "tile_b"):
        (out / "analysis" / folder / "report.json").unlink()
    m = score_prepared_set(data, manifest, out)
    assert m["tile_false_detections_per_mm2"] is None and m["tile_false_detections"] == 2
    assert "| with verifier | 2 | 3 | 1 | 0.333 | 0.500 | n/a (2) | 1 of 2 |" in real_metrics_markdown(m)


# --- graded crops -----------------------------------------------------------------------------

def _crop_results(out):
    """Six crops' analyze outputs written by hand (analysis images 20 x 20, downsample 4)."""
    shape, ok = (20, 20), {"status": "ok", "width": 80, "height": 80, "analysis_downsample": 4.0,
                           "analysis_mpp": 1.0}
    a = out / "analysis"
    _write_result(a / "s_found", _square(shape, 5, 5, 10, 2), ok)                      # centre, sclerosed
    _write_result(a / "s_missed", np.zeros(shape, np.uint8), {**ok, "n_rejected": 0})   # nothing
    _write_result(a / "s_rejected", np.zeros(shape, np.uint8), {**ok, "n_rejected": 1},
                  [_feature(_ring(4, 4, 12, 4.0), "sclerosed")])                        # verifier said no
    two = _square(shape, 0, 0, 3, 1)
    _square(shape, 12, 12, 7, 2, two)                                                   # off-centre: largest
    _write_result(a / "n_wrong", two, ok)
    _write_result(a / "n_found", _square(shape, 6, 6, 9, 1), ok)
    _write_result(a / "n_failed", None, {"status": "failed", "reason": "image too small to hold a glomerulus"})
    return pd.DataFrame({"image": [f"{n}.png" for n in ("s_found", "s_missed", "s_rejected", "n_wrong", "n_found",
                                                         "n_failed")],
                         "globally_sclerosed": [1, 1, 1, 0, 0, 0]})


def test_graded_crop_bookkeeping(tmp_path):
    labels = _crop_results(tmp_path)
    m = score_graded_crops(tmp_path, labels, mpp=0.25)
    table = pd.read_csv(tmp_path / "crops.csv", keep_default_na=False)
    assert list(table.image) == list(labels.image)
    assert list(table.outcome) == ["sclerosed", "not found", "rejected", "sclerosed", "normal", "failed"]
    assert list(table.chosen_by) == ["centre", "", "", "largest", "centre", ""]
    assert list(table.segmentation_only_outcome) == ["sclerosed", "not found", "sclerosed", "sclerosed", "normal",
                                                     "failed"]
    assert float(table.area_um2.iloc[0]) == 100.0  # 10 x 10 analysis pixels at 1 µm/px
    assert (m["crops"], m["sclerosed_crops"], m["normal_crops"]) == (6, 3, 3)
    # over all crops a glomerulus not found / rejected / not analysed is a miss
    assert m["sclerosed_sensitivity"] == pytest.approx(1 / 3) and m["specificity"] == pytest.approx(1 / 3)
    assert m["sclerosed_sensitivity_found"] == 1.0 and m["specificity_found"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx(1 / 3) and m["balanced_accuracy_found"] == 0.75
    assert m["segmentation_only_sclerosed_sensitivity"] == pytest.approx(2 / 3)
    assert m["segmentation_only_specificity"] == pytest.approx(1 / 3)
    for p in ("", "segmentation_only_"):
        for cls, other in (("sclerosed", "normal"), ("normal", "sclerosed")):
            parts = [m[f"{p}{cls}_called_{cls}"], m[f"{p}{cls}_called_{other}"], m[f"{p}{cls}_not_found"],
                     m[f"{p}{cls}_failed"], m.get(f"{cls}_rejected", 0) if not p else 0]
            assert sum(parts) == m[f"{cls}_crops"], (p, cls)
            assert m[f"{p}{cls}_found"] == parts[0] + parts[1]
    assert (m["sclerosed_rejected"], m["sclerosed_not_found"], m["normal_failed"]) == (1, 1, 1)
    assert (m["chosen_by_centre"], m["chosen_by_largest"]) == (2, 1)
    assert m["verifier_ran"] == 2 and m["mpp"] == 0.25
    assert json.loads((tmp_path / "metrics.json").read_text())["crops"] == 6
    md = (tmp_path / "metrics.md").read_text()
    assert "| with verifier | 0.333 (1/3) | 0.333 (1/3) |" in md
    assert "| with verifier | sclerosed | 3 | 1 | 0 | 1 | 1 | 0 |" in md
    assert "| segmentation alone | sclerosed | 3 | 2 | 0 | – | 1 | 0 |" in md
    assert "grading is that of a run with --no-verifier" in md


def test_crop_labels_are_checked(tmp_path):
    _write_png(tmp_path / "a.png", np.full((8, 8, 3), 200, np.uint8))
    (tmp_path / "labels.csv").write_text("image,globally_sclerosed,predicted\na.png,1,0\n")
    labels = read_crop_labels(tmp_path)
    assert list(labels.columns) == ["image", "globally_sclerosed"] and labels.globally_sclerosed.tolist() == [1]
    (tmp_path / "labels.csv").write_text("image,globally_sclerosed\na.png,1\nb.png,0\n")
    with pytest.raises(ValueError, match="not in"):
        read_crop_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("image,globally_sclerosed\na.png,yes\n")
    with pytest.raises(ValueError, match="0 or 1"):
        read_crop_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("image,label\na.png,1\n")
    with pytest.raises(ValueError, match="globally_sclerosed"):
        read_crop_labels(tmp_path)


def _write_crops(crops_dir):
    """Three small RGBA crops (alpha 255) of a pink disc on paler tissue, at 0.5 µm/px."""
    rng = np.random.default_rng(0)
    names = []
    for i, size in enumerate((180, 200, 220)):
        yy, xx = np.mgrid[:size, :size]
        image = np.empty((size, size, 4), np.uint8)
        image[..., :3] = rng.integers(200, 230, (size, size, 3))
        disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        image[disc, :3] = (150 + 10 * i, 80, 150)
        image[..., 3] = 255
        names.append(f"crop{i}.png")
        _write_png(crops_dir / names[-1], image)
    (crops_dir / "labels.csv").write_text("image,globally_sclerosed,predicted_globally_sclerosed\n"
                                          + "".join(f"{n},{int(i == 1)},0\n" for i, n in enumerate(names)))
    return names


def _check_crop_outputs(out, n):
    table = pd.read_csv(out / "crops.csv", keep_default_na=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(table) == n == metrics["crops"]
    assert set(table.outcome) <= set(CROP_OUTCOMES) and set(table.segmentation_only_outcome) <= set(CROP_OUTCOMES)
    for p in ("", "segmentation_only_"):
        for cls, other in (("sclerosed", "normal"), ("normal", "sclerosed")):
            total = (metrics[f"{p}{cls}_called_{cls}"] + metrics[f"{p}{cls}_called_{other}"]
                     + metrics[f"{p}{cls}_not_found"] + metrics[f"{p}{cls}_failed"]
                     + (metrics[f"{cls}_rejected"] if not p else 0))
            assert total == metrics[f"{cls}_crops"] == (table.true_class == cls).sum()
    assert metrics["sclerosed_crops"] + metrics["normal_crops"] == n
    assert (out / "metrics.md").read_text().startswith("Grading on")
    return table, metrics


def test_evaluate_graded_crops_runs_analyze_on_each_crop(tmp_path, tiny_checkpoint):
    names = _write_crops(tmp_path / "crops")
    res = CliRunner().invoke(main, ["evaluate", "graded-crops", "--model", str(tiny_checkpoint), "--crops",
                                    str(tmp_path / "crops"), "--mpp", "0.5", "--backend", "torch", "--out",
                                    str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "sclerosed_sensitivity" in res.output and "metrics.md" in res.output
    table, metrics = _check_crop_outputs(tmp_path / "ev", len(names))
    assert (tmp_path / "ev" / "analysis" / "crop0" / "report.json").is_file()
    assert metrics["mpp"] == 0.5 and metrics["verifier_ran"] == 0
    report = json.loads((tmp_path / "ev" / "analysis" / "crop1" / "report.json").read_text())
    assert report["mpp"] == 0.5 and report["status"] == "ok"


def test_evaluate_graded_crops_needs_labels(tmp_path, tiny_checkpoint):
    (tmp_path / "crops").mkdir()
    res = CliRunner().invoke(main, ["evaluate", "graded-crops", "--model", str(tiny_checkpoint), "--crops",
                                    str(tmp_path / "crops"), "--mpp", "0.5", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 1 and "labels.csv" in res.output


@pytest.mark.skipif(not (PAS_CROPS / "labels.csv").is_file(), reason=f"shared data absent: {PAS_CROPS}")
def test_real_foreign_crops_through_the_shipped_model(tmp_path):
    """A few of the 53 PAS crops of another lab through the shipped model (onnxruntime): the
    bookkeeping on real RGBA crops at 0.25 µm/px. (All 53 take minutes on 2 busy cores: that is
    ``glomscan evaluate graded-crops``' job, not a test's.)"""
    pytest.importorskip("onnxruntime")
    from glomscan.model import load_model
    from glomscan.shipped import default_model_path

    if default_model_path() is None:
        pytest.skip("this build ships no default model")
    labels = pd.read_csv(PAS_CROPS / "labels.csv").sort_values("image")
    subset = pd.concat([labels[labels.globally_sclerosed == 1].head(2), labels[labels.globally_sclerosed == 0].head(2)])
    crops = tmp_path / "crops"
    crops.mkdir()
    for name in subset.image:
        (crops / name).symlink_to(PAS_CROPS / name)
    subset.to_csv(crops / "labels.csv", index=False)
    metrics = evaluate_graded_crops(load_model(default_model_path()), crops, tmp_path / "ev", 0.25,
                                    backend="onnxruntime")
    table, saved = _check_crop_outputs(tmp_path / "ev", 4)
    assert saved.keys() == metrics.keys() and saved["crops"] == metrics["crops"] == 4
    assert list(table.image) == list(subset.image) and (table.true_class == "sclerosed").sum() == 2
    assert "failed" not in set(table.outcome)  # 256-915 px at 0.25 µm/px is 64-229 px at 1 µm/px
