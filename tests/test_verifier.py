"""The candidate verifier (second stage): its samples, its decision rule, and analyze with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyvips

from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings
from glomscan.engines.base import EngineChoice
from glomscan.postprocess import REJECTED, glomerulus_class
from glomscan.imaging import image_to_array
from glomscan.verify import Verifier, VerifierCard, candidate_crop, crop_square, read_candidate_crop

from conftest import OracleEngine, oracle_model

# -- the decision rule ------------------------------------------------------------------------


def test_decision_rule_without_a_verifier_is_the_segmentation_argmax():
    assert glomerulus_class((0.6, 0.4)) == 0
    assert glomerulus_class((0.3, 0.7)) == 1


def test_decision_rule_rejects_what_the_verifier_calls_not_a_glomerulus():
    assert glomerulus_class((0.9, 0.1), (0.7, 0.2, 0.1)) == REJECTED
    assert glomerulus_class((0.9, 0.1), (0.49, 0.3, 0.21)) == 0  # p(glomerulus) 0.51 >= 0.5
    assert glomerulus_class((0.9, 0.1), (0.7, 0.2, 0.1), min_glomerulus_probability=0.2) == 0


def test_decision_rule_grades_by_the_weighted_sclerosed_shares():
    segmentation, verifier = (0.8, 0.2), (0.0, 0.3, 0.7)
    assert glomerulus_class(segmentation, verifier, verifier_grading_weight=1.0) == 1
    assert glomerulus_class(segmentation, verifier, verifier_grading_weight=0.0) == 0
    # 0.5 * 0.7 + 0.5 * 0.2 = 0.45: normal; 0.75 * 0.7 + 0.25 * 0.2 = 0.575: sclerosed
    assert glomerulus_class(segmentation, verifier, verifier_grading_weight=0.5) == 0
    assert glomerulus_class(segmentation, verifier, verifier_grading_weight=0.75) == 1


# -- crops --------------------------------------------------------------------------------------


def test_crop_frames_the_box_with_its_margin_and_mirrors_past_the_edges():
    assert crop_square((100, 100, 200, 150), 0.25) == (75, 50, 150)
    image = np.zeros((300, 300, 3), np.uint8)
    image[:, :150] = 200
    crop = candidate_crop(image, (0, 100, 100, 200), 0.25, 64)
    assert crop.shape == (64, 64, 3)
    assert (crop[:, :8] == 200).all()  # mirrored at x = 0: tissue on both sides, no glass


def test_the_lazy_slide_crop_equals_the_array_crop():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    image = pyvips.Image.new_from_array(array, interpretation="srgb")
    for bbox in [(10, 10, 60, 90), (450, 350, 500, 400), (200, 150, 260, 230)]:
        assert np.array_equal(read_candidate_crop(image, bbox, 0.2, 48), candidate_crop(array, bbox, 0.2, 48))


# -- mining --------------------------------------------------------------------------------------


def test_mined_negatives_never_overlap_an_outlined_glomerulus():
    from glomscan.train.fit.verifier import box_is_clear, jittered_boxes, mine_candidates, random_tissue_boxes

    labels = np.zeros((256, 256), np.uint8)
    labels[40:100, 40:100] = 3  # an outlined glomerulus
    probabilities = np.zeros((2, 256, 256), np.float32)
    probabilities[0, 50:90, 50:90] = 0.9  # the model finds it: not a negative
    probabilities[0, 150:220, 150:220] = 0.2  # tempted by something else: a hard negative
    probabilities[1, 95:140, 95:140] = 0.3  # tempted next to the glomerulus: its box touches it, left out
    probabilities[1, 10:20, 200:210] = 0.9  # too small
    boxes, touching = mine_candidates(probabilities, labels, threshold=0.15, min_area_px=400)
    assert boxes == [(150, 150, 220, 220)] and touching == 2
    rng = np.random.default_rng(0)
    image = np.full((256, 256, 3), 255, np.uint8)
    image[:, :] = (180, 120, 170)  # all tissue
    around = jittered_boxes(boxes[0], labels, 20, rng, tries=200)
    randoms = random_tissue_boxes(image, labels, 30, (40, 120), rng, tries=300)
    assert around and randoms
    for box in boxes + around + randoms:
        assert box_is_clear(labels, box)
        x0, y0, x1, y1 = box
        assert not (labels[max(0, y0):y1, max(0, x0):x1] > 0).any()


def test_unknown_class_glomeruli_supervise_glomerulus_versus_not_only():
    import torch

    from glomscan.train.fit.verifier import verifier_loss

    targets = torch.tensor([3, 3])
    weights = torch.ones(2)
    # the same p(glomerulus), split differently between normal and sclerosed: the same loss
    a = torch.log(torch.tensor([[0.2, 0.7, 0.1], [0.2, 0.7, 0.1]]))
    b = torch.log(torch.tensor([[0.2, 0.1, 0.7], [0.2, 0.4, 0.4]]))
    assert torch.isclose(verifier_loss(a, targets, weights), verifier_loss(b, targets, weights))
    assert torch.isclose(verifier_loss(a, targets, weights), -torch.log(torch.tensor(0.8)))
    known = verifier_loss(a, torch.tensor([2, 2]), weights)
    assert torch.isclose(known, -torch.log(torch.tensor(0.1)))


# -- analyze with a verifier -------------------------------------------------------------------


class RejectLeftmost(Verifier):
    """A stand-in verifier: the candidate crop with the darkest mean is judged not a glomerulus,
    every other one sclerosed."""

    def __init__(self):
        super().__init__(Path("stand-in.onnx"), VerifierCard(name="stand-in", grading_weight=1.0), "f" * 64)
        self.seen = 0

    def probabilities(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        self.seen += len(crops)
        out = np.tile(np.asarray([[0.0, 0.1, 0.9]], np.float32), (len(crops), 1))
        out[int(np.argmin(crops.reshape(len(crops), -1).mean(axis=1)))] = (0.9, 0.05, 0.05)
        return out


def _analyse(slide_dir: Path, out: Path, verifier, viewer: bool = False):
    model = oracle_model()
    model.verifier = verifier
    settings = AnalysisSettings(tile=512, overlap=256, viewer=viewer)
    return run_batch(slide_dir, out, model, OracleEngine(), EngineChoice("oracle", "test"), settings, quiet=True)


def test_a_rejected_candidate_is_counted_nowhere_but_kept_for_review(small_slide, tmp_path):
    from glomscan.viewer import page_data
    from glomscan.pipeline import SlideReport

    from conftest import copy_slide

    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    _analyse(slides, tmp_path / "plain", None)
    verifier = RejectLeftmost()
    outcome = _analyse(slides, tmp_path / "verified", verifier, viewer=True)
    assert not outcome.failed
    plain = json.loads((tmp_path / "plain" / "case01" / "report.json").read_text())
    folder = tmp_path / "verified" / "case01"
    report = json.loads((folder / "report.json").read_text())
    assert verifier.seen == plain["n_glomeruli"] == report["n_candidates"] >= 3
    assert report["n_rejected"] == 1 and report["n_glomeruli"] == plain["n_glomeruli"] - 1
    assert report["verifier_id"].startswith("stand-in@")
    # every accepted one was called sclerosed by the stand-in: %GS follows the accepted only
    assert report["n_sclerosed"] == report["n_glomeruli"] and report["percent_global_glomerulosclerosis"] == 100.0
    table = pd.read_csv(folder / "glomeruli.csv")
    assert list(table.id) == list(range(1, report["n_glomeruli"] + 1))
    assert (table["class"] == "sclerosed").all() and table.verifier_p_sclerosed.notna().all()
    features = json.loads((folder / "glomeruli.geojson").read_text())["features"]
    assert len(features) == report["n_glomeruli"]
    rejected = json.loads((folder / "rejected.geojson").read_text())["features"]
    assert len(rejected) == 1
    props = rejected[0]["properties"]
    assert props["classification"]["name"] == "Not glomerulus"
    assert props["glomscan"]["rejected_by"] == "verifier" and props["glomscan"]["candidate_class"] in ("normal", "sclerosed")
    assert props["measurements"]["glomscan id"] == report["n_glomeruli"] + 1
    assert props["measurements"]["verifier_p_not_glomerulus"] == pytest.approx(0.9)
    # the mask: the rejected candidate erased, the accepted ones painted sclerosed
    mask = image_to_array(pyvips.Image.tiffload(str(folder / "mask.tif"), page=0))[..., 0]
    plain_mask = image_to_array(pyvips.Image.tiffload(str(tmp_path / "plain" / "case01" / "mask.tif"), page=0))[..., 0]
    x0, y0, x1, y1 = (int(v) for v in (props["measurements"]["bbox_x0"], props["measurements"]["bbox_y0"],
                                        props["measurements"]["bbox_x1"], props["measurements"]["bbox_y1"]))
    ds = report["analysis_downsample"]
    box = (slice(int(y0 / ds), int(np.ceil(y1 / ds))), slice(int(x0 / ds), int(np.ceil(x1 / ds))))
    assert (plain_mask[box] > 0).any() and not (mask[box] > 0).any()
    assert set(np.unique(mask)) <= {0, 2}
    assert ((mask > 0) == (plain_mask > 0)).sum() > 0.99 * mask.size
    # the review page lists it as rejected by the verifier (counted only when restored)
    data = page_data(folder, SlideReport(**{k: v for k, v in report.items() if k in SlideReport.__dataclass_fields__}),
                     report["width"], report["height"])
    assert data["analysed"]["n_sclerosed"] == report["n_sclerosed"] and data["analysed"]["n_normal"] == 0
    listed = {g["id"]: g for g in data["glomeruli"]}
    assert listed[report["n_glomeruli"] + 1].get("rejected_by") == "verifier"


def test_no_verifier_flag_and_the_verifier_are_part_of_the_resume_fingerprint(small_slide, tmp_path):
    from conftest import copy_slide

    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    _analyse(slides, tmp_path / "out", None)
    first = json.loads((tmp_path / "out" / "case01" / "report.json").read_text())
    assert first["n_rejected"] is None and first["verifier_id"] == ""
    assert not (tmp_path / "out" / "case01" / "rejected.geojson").exists()
    _analyse(slides, tmp_path / "out", RejectLeftmost())  # a verifier now: the slide is redone
    second = json.loads((tmp_path / "out" / "case01" / "report.json").read_text())
    assert second["n_rejected"] == 1 and second["fingerprint"] != first["fingerprint"]


# -- the verifier file and its card ---------------------------------------------------------


@pytest.fixture(scope="module")
def verifier_file(tmp_path_factory) -> Path:
    import torch

    from glomscan.train.fit.verifier import build_verifier_network, export_verifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("verifier") / "verifier.onnx"
    card = VerifierCard(name="test-verifier", licence="CC0 test", metrics={"validation": {"x": 1}})
    return export_verifier(build_verifier_network(), card, path, "a" * 64)


def test_verifier_file_carries_its_card_and_runs_like_the_network(verifier_file, tmp_path):
    import torch

    from glomscan.train.fit.verifier import VerifierProbabilities, build_verifier_network
    from glomscan.verify import load_verifier, normalise_crops

    verifier = load_verifier(verifier_file)
    assert verifier.card.name == "test-verifier" and verifier.card.licence == "CC0 test"
    assert verifier.sha256 == "a" * 64 and verifier.model_id == "test-verifier@aaaaaaaaaaaa"
    crops = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    p = verifier.probabilities(crops)
    assert p.shape == (3, 3) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    torch.manual_seed(0)
    network = VerifierProbabilities(build_verifier_network()).eval()
    with torch.no_grad():  # the file stores the weights rounded to float16
        for tensor in network.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    with torch.inference_mode():
        expected = network(torch.from_numpy(normalise_crops(crops, verifier.card))).numpy()
    assert np.allclose(p, expected, atol=1e-4)
    parameters = sum(v.numel() for v in network.state_dict().values())
    assert verifier_file.stat().st_size < 2.2 * parameters  # float16 storage: about 2 bytes per weight


def test_pack_verifier_edits_the_card_and_keeps_the_weights(verifier_file, tmp_path):
    from click.testing import CliRunner

    from glomscan.cli import main
    from glomscan.verify import load_verifier

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"tile_detection_precision": 0.9}))
    out = tmp_path / "packed.onnx"
    result = CliRunner().invoke(main, ["pack-verifier", str(verifier_file), str(out), "--grading-weight", "0.5",
                                       "--validation", str(metrics)])
    assert result.exit_code == 0, result.output
    packed, original = load_verifier(out), load_verifier(verifier_file)
    assert packed.card.grading_weight == 0.5 and original.card.grading_weight == 1.0
    assert packed.card.metrics["validation"] == {"tile_detection_precision": 0.9}
    assert packed.sha256 == original.sha256
    crops = np.zeros((1, 128, 128, 3), np.uint8)
    assert np.array_equal(packed.probabilities(crops), original.probabilities(crops))


def test_a_file_that_is_not_a_verifier_is_refused_with_its_reason(tmp_path):
    from glomscan.shipped import SHIPPED_MODEL
    from glomscan.verify import VerifierError, load_verifier

    with pytest.raises(VerifierError, match="not found"):
        load_verifier(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(VerifierError, match="not a readable ONNX"):
        load_verifier(tmp_path / "junk.onnx")
    if SHIPPED_MODEL.is_file():
        with pytest.raises(VerifierError, match="not a glomscan verifier"):
            load_verifier(SHIPPED_MODEL)


def test_analyze_pairs_the_shipped_verifier_only_with_the_shipped_model(tmp_path, verifier_file):
    from click.testing import CliRunner

    from glomscan.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["analyze", str(tmp_path), "--verifier", str(verifier_file), "--no-verifier"])
    assert result.exit_code == 2 and "contradict" in result.output
    result = runner.invoke(main, ["analyze", str(tmp_path), "--verifier", str(tmp_path / "nope.onnx")])
    assert result.exit_code == 2 and "verifier file not found" in result.output


# -- cross-validation bookkeeping --------------------------------------------------------------


def test_crossval_folds_cover_the_training_groups_once_and_pool_counts():
    from glomscan.train.evaluation.crossval import pooled, tile_folds

    manifest = pd.DataFrame({"kind": ["tile"] * 6 + ["composite"], "split": ["train"] * 5 + ["val", "train"],
                             "slide": ["a", "b", "c", "d", "d", "v", "a"]})
    folds = tile_folds(manifest, 2)
    assert sorted(g for f in folds for g in f) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError):
        tile_folds(manifest, 5)
    table = pd.DataFrame([
        {"fold": "fold1", "groups": "a c", "tile_glomeruli_true": 4, "tile_tissue_mm2": 1.0,
         "tile_glomeruli_predicted": 5, "tile_glomeruli_matched": 3, "tile_false_detections": 2,
         "tile_false_detections_sclerosed": 1, "tile_segmentation_only_glomeruli_predicted": 8,
         "tile_segmentation_only_glomeruli_matched": 4, "tile_segmentation_only_false_detections": 4,
         "tile_segmentation_only_false_detections_sclerosed": 2},
        {"fold": "fold2", "groups": "b d", "tile_glomeruli_true": 6, "tile_tissue_mm2": 3.0,
         "tile_glomeruli_predicted": 5, "tile_glomeruli_matched": 5, "tile_false_detections": 0,
         "tile_false_detections_sclerosed": 0, "tile_segmentation_only_glomeruli_predicted": 7,
         "tile_segmentation_only_glomeruli_matched": 5, "tile_segmentation_only_false_detections": 2,
         "tile_segmentation_only_false_detections_sclerosed": 1}])
    row = pooled(table)
    assert row["tile_detection_precision"] == pytest.approx(8 / 10)
    assert row["tile_detection_recall"] == pytest.approx(8 / 10)
    assert row["tile_false_detections_per_mm2"] == pytest.approx(2 / 4)
    assert row["tile_segmentation_only_detection_precision"] == pytest.approx(9 / 15)
    assert row["tile_segmentation_only_false_detections_per_mm2"] == pytest.approx(6 / 4)


def test_mining_with_several_models_keeps_each_box_once(monkeypatch, tmp_path):
    """``train verifier --also-mine-with``: the false candidates of the model being paired and of
    another (the one it replaces) are both hard negatives; a box both found counts once."""
    import types

    import pandas as pd

    import glomscan.engines
    from glomscan.train.fit import verifier as v
    from glomscan.train.settings import VerifierSettings

    columns = ["patch_id", "split", "x0", "y0", "x1", "y1", "max_probability"]
    found = {"new": [["tile_1", "train", 0, 0, 50, 50, 0.9]],
             "old": [["tile_1", "train", 0, 0, 50, 50, 0.8], ["tile_2", "train", 5, 5, 60, 60, 0.3]]}
    engines = []

    class Engine:
        def __init__(self, model):
            self.model, self.closed = model, False
            engines.append(self)

        def close(self):
            self.closed = True

    monkeypatch.setattr(glomscan.engines, "create_engine",
                        lambda backend, model, options: (Engine(model), types.SimpleNamespace(backend=backend, reason="test")))
    monkeypatch.setattr(v, "mine_hard_negatives", lambda engine, *args: pd.DataFrame(found[engine.model.model_id], columns=columns))
    models = [types.SimpleNamespace(model_id=name, card=types.SimpleNamespace(tile=1024)) for name in ("new", "old")]
    mined = v.mine_with_models(models, tmp_path, pd.DataFrame(), VerifierSettings(), "onnxruntime", tmp_path)
    assert mined[["patch_id", "x0", "max_probability"]].values.tolist() == [["tile_1", 0, 0.9], ["tile_2", 5, 0.3]]
    assert [e.model.model_id for e in engines] == ["new", "old"] and all(e.closed for e in engines)


def test_cards_name_keys_they_do_not_know_instead_of_dropping_them_silently(caplog):
    from glomscan.model import ModelCard
    from glomscan.verify import VerifierCard

    with caplog.at_level("WARNING", logger="glomscan.model"):
        card = ModelCard.from_dict({"name": "m", "tile": 512, "calibration": {"t": 1.2}})
        verifier = VerifierCard.from_dict({"name": "v", "mean": [0.5, 0.5, 0.5], "new_rule": 1})
    assert card.tile == 512 and verifier.mean == (0.5, 0.5, 0.5)
    text = caplog.text
    assert "ModelCard 'm'" in text and "calibration" in text
    assert "VerifierCard 'v'" in text and "new_rule" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="glomscan.model"):
        ModelCard.from_dict(ModelCard(name="m").__dict__)
    assert not caplog.text  # a card of this version loads without a warning


def test_cards_carry_a_version_and_say_what_their_outputs_mean(caplog):
    """A card written now is version CARD_VERSION and states its outputs; a stored card without
    the key is version 1 (the cards before versioning, e.g. the shipped ones); a newer version is
    read with a warning."""
    from glomscan.model import CARD_VERSION, ModelCard
    from glomscan.verify import VerifierCard

    assert ModelCard(name="m").card_version == VerifierCard(name="v").card_version == CARD_VERSION >= 2
    assert "sigmoid per class" in ModelCard(name="m").outputs and "softmax" in VerifierCard(name="v").outputs
    with caplog.at_level("WARNING", logger="glomscan.model"):
        assert ModelCard.from_dict({"name": "old"}).card_version == 1
        assert VerifierCard.from_dict({"name": "old"}).card_version == 1
        assert ModelCard.from_dict(ModelCard(name="now").__dict__).card_version == CARD_VERSION
    assert not caplog.text
    with caplog.at_level("WARNING", logger="glomscan.model"):
        newer = ModelCard.from_dict({"name": "new", "card_version": CARD_VERSION + 1})
    assert newer.card_version == CARD_VERSION + 1
    assert f"card version {CARD_VERSION + 1}" in caplog.text and f"up to version {CARD_VERSION}" in caplog.text
