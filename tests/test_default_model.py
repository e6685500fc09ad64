"""The shipped model: its card (data, licence, intended use, validation numbers), the warning for
models not meant for real tissue, and regressions on real AIDPATH data it never trained on."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.model import load_model
from glomscan.shipped import SAMPLE_DIR, SHIPPED_MODEL, default_model_path, default_verifier_path
from glomscan.imaging import image_to_array
from glomscan.imaging import write_png
from glomscan.train.dataset.data import split_slides
from glomscan.train.evaluation.metrics import instance_matches
from glomscan.train.dataset.sources import read_tile_set

from conftest import SHARED_DATA

shipped = pytest.mark.skipif(default_model_path() is None, reason="no default model shipped in this checkout")
TILES = SHARED_DATA / "aidpath_tiles"
CROPS = SHARED_DATA / "aidpath_glomeruli"
real_data = pytest.mark.skipif(not (TILES.is_dir() and CROPS.is_dir()),
                               reason=f"AIDPATH tiles/crops not present under {SHARED_DATA}")


@shipped
def test_shipped_model_card():
    assert SHIPPED_MODEL.stat().st_size <= 30 * 2**20
    model = load_model(SHIPPED_MODEL)
    card = model.card
    assert card.encoder == "efficientnet-b3" and card.classes == ("normal", "sclerosed")
    assert card.analysis_mpp == 1.0 and card.tile == 1024
    assert card.for_real_tissue
    assert "research" in card.intended_use and "CC BY-NC-SA 4.0" in card.intended_use
    assert "CC BY-NC-SA 4.0" in card.licence and "AIDPATH" in card.trained_on
    validation = card.metrics["validation"]
    for key in ("tile_detection_recall", "composite_detection_recall", "composite_detection_precision",
                "balanced_accuracy", "sclerosed_sensitivity", "sclerosed_specificity", "sclerosis_pct_mae",
                "composite_dice_normal", "composite_dice_sclerosed"):
        assert 0.0 <= validation[key] <= (100.0 if key == "sclerosis_pct_mae" else 1.0), key


@shipped
@pytest.mark.skipif(default_verifier_path() is None, reason="no verifier shipped in this checkout")
def test_shipped_verifier_card_names_its_data_licence_metrics_and_segmentation_model():
    from glomscan.verify import VERIFIER_CLASSES, load_verifier

    verifier = load_verifier(default_verifier_path())
    card = verifier.card
    assert default_verifier_path().stat().st_size <= 25 * 2**20
    assert card.classes == VERIFIER_CLASSES and card.input_px == 128
    assert card.segmentation_model == load_model(SHIPPED_MODEL).model_id
    assert "research" in card.intended_use and "CC BY-NC-SA 4.0" in card.licence and "AIDPATH" in card.trained_on
    validation = card.metrics["validation"]
    for key in ("balanced_accuracy", "composite_detection_recall", "tile_false_detections_per_mm2",
                "tile_segmentation_only_false_detections_per_mm2"):
        assert key in validation, key
    assert card.metrics["samples"]["train mined"] > 0


@shipped
def test_sample_analysed_with_default_model_reports_its_intended_use(tmp_path):
    res = CliRunner().invoke(main, ["analyze", str(SAMPLE_DIR), "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "WARNING" not in res.output
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("aidpath_*/report.json"))]
    assert len(reports) == 3
    for report in reports:
        assert "research" in report["model_intended_use"] and "CC BY-NC-SA" in report["model_licence"]
        if default_verifier_path() is not None:  # report.json names both models
            assert report["verifier_id"].startswith("glomscan-verifier") and report["n_rejected"] is not None
    assert sum(r["n_glomeruli"] for r in reports) >= 2
    html = (tmp_path / "out" / "index.html").read_text()
    assert 'id="intended-use"' in html and "research use only" in html


def test_model_not_for_real_tissue_warns_even_when_quiet(tiny_checkpoint, small_slide, tmp_path):
    from conftest import copy_slide

    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides)
    res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(tmp_path / "out"), "--model",
                                    str(tiny_checkpoint), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "WARNING: model" in res.output and "not for real tissue" in res.output
    html = (tmp_path / "out" / "index.html").read_text()
    assert "not for real tissue" in html


def _validation_tiles():
    tiles = read_tile_set(TILES, tile_mpp=0.5, analysis_mpp=1.0)
    split = split_slides([t.group for t in tiles], 0.2, 0)
    return [t for t in tiles if split[t.group] == "val"]


@shipped
@real_data
def test_shipped_model_finds_most_outlined_glomeruli_of_the_validation_tiles(tmp_path):
    tiles = _validation_tiles()
    slides = tmp_path / "slides"
    slides.mkdir()
    for t in tiles:
        write_png(slides / f"{t.name}.png", t.image)
    res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(tmp_path / "out"), "--mpp", "1.0", "--quiet"])
    assert res.exit_code == 0, res.output
    matched = true = 0
    import pyvips

    for t in tiles:
        mask = image_to_array(pyvips.Image.tiffload(str(tmp_path / "out" / t.name / "mask.tif"), page=0))[..., 0]
        result = instance_matches(mask, t.labels)
        matched, true = matched + result["matched"], true + result["n_true"]
    assert true >= 3 and matched / true >= 0.6, f"{matched} of {true} outlined glomeruli found"


@shipped
@real_data
def test_single_glomerulus_crop_at_its_mpp_gives_one_classified_glomerulus(tmp_path):
    labels = pd.read_csv(CROPS / "labels.csv")
    split = split_slides(list(labels.slide), 0.2, 0)
    val = labels[labels.slide.map(split) == "val"]
    slides = tmp_path / "slides"
    slides.mkdir()
    found = 0
    chosen = val.groupby("globally_sclerosed").head(3)
    for row in chosen.itertuples():
        shutil.copy(CROPS / "images" / row.image, slides / row.image)
    # tight crops resized to 224 px: at 0.9 µm/px a typical outline measures about 180 µm
    res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(tmp_path / "out"), "--mpp", "0.9", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert (summary.status == "ok").all()
    found = int((summary.n_glomeruli == 1).sum())
    assert found >= 4, summary[["slide", "n_glomeruli", "n_sclerosed"]].to_string()


@shipped
@real_data
def test_shipped_model_is_not_fooled_by_scanner_jpeg_compression():
    """Scanners store slides as JPEG with 4:2:0 chroma subsampling; the model must see the same
    glomeruli there as in the lossless image (a model trained without it painted most tissue)."""
    from glomscan.engines.torch_engine import TorchEngine
    from glomscan.train.fit.segment import jpeg_roundtrip

    engine = TorchEngine(load_model(SHIPPED_MODEL), "cpu")
    tiles = read_tile_set(TILES, tile_mpp=0.5, analysis_mpp=1.0)[::3]
    for quality in (85, 70):
        both = either = 0
        for t in tiles:
            lossless = engine.predict(t.image[None])[0].max(axis=0) >= 0.5
            compressed = engine.predict(jpeg_roundtrip(t.image, quality)[None])[0].max(axis=0) >= 0.5
            both, either = both + (lossless & compressed).sum(), either + (lossless | compressed).sum()
            assert compressed.mean() <= 2 * (t.labels > 0).mean() + 0.02, f"{t.name} at Q{quality}: too much foreground"
        # pooled over the tiles (single small glomeruli make per-tile overlaps jumpy)
        assert both / either >= 0.75, f"JPEG Q{quality}: glomerulus masks overlap only {both / either:.2f}"


@shipped
def test_demo_sample_glomeruli_found_through_its_jpeg_pyramid(tmp_path):
    """The demo sample is a JPEG (4:2:0) pyramidal TIFF like a scanner's: most outlined glomeruli
    must be found at IoU >= 0.5 (what `make demo` shows)."""
    import pyvips

    from glomscan.qupath import read_qupath_geojson
    from glomscan.train.dataset.data import DEFAULT_CLASS_MAP, rasterise_polygons

    res = CliRunner().invoke(main, ["analyze", str(SAMPLE_DIR), "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    matched = true = 0
    for tif in sorted(SAMPLE_DIR.glob("*.tif")):
        report = json.loads((tmp_path / "out" / tif.stem / "report.json").read_text())
        mask = image_to_array(pyvips.Image.tiffload(str(tmp_path / "out" / tif.stem / "mask.tif"), page=0))[..., 0]
        polygons, _ = read_qupath_geojson(tif.with_suffix(".geojson"), DEFAULT_CLASS_MAP)
        truth = rasterise_polygons(polygons, 0, 0, mask.shape[1], mask.shape[0], report["analysis_downsample"])
        result = instance_matches(mask, truth)
        matched, true = matched + result["matched"], true + result["n_true"]
    assert true == 3 and matched >= 2, f"{matched} of {true} outlined glomeruli found"


@shipped
@real_data
@pytest.mark.skipif(default_verifier_path() is None, reason="no verifier shipped in this checkout")
def test_shipped_pair_makes_no_more_false_detections_than_segmentation_alone(tmp_path):
    """On the validation tiles (real outlined tissue no part of training saw), the verifier may
    only remove false detections: the pair finds as many outlined glomeruli as the segmentation
    model alone and makes no more false detections."""
    import pyvips

    from glomscan.train.evaluation.prepared_set import false_detections

    tiles = _validation_tiles()
    slides = tmp_path / "slides"
    slides.mkdir()
    for t in tiles:
        write_png(slides / f"{t.name}.png", t.image)
    scores = {}
    for name, flags in (("pair", []), ("segmentation", ["--no-verifier"])):
        out = tmp_path / name
        res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(out), "--mpp", "1.0", "--quiet",
                                        "--no-viewer", *flags])
        assert res.exit_code == 0, res.output
        total = {"matched": 0, "false": 0}
        for t in tiles:
            report = json.loads((out / t.name / "report.json").read_text())
            assert bool(report["verifier_id"]) == (name == "pair")
            mask = image_to_array(pyvips.Image.tiffload(str(out / t.name / "mask.tif"), page=0))[..., 0]
            result = false_detections(mask, t.labels)
            total = {k: total[k] + result[k] for k in total}
        scores[name] = total
    assert scores["pair"]["matched"] >= scores["segmentation"]["matched"], scores
    assert scores["pair"]["false"] <= scores["segmentation"]["false"], scores


def test_card_docs_hold_the_shipped_files_embedded_cards_and_the_command_rewrites_them(tmp_path):
    """docs/model-card.md and docs/verifier-card.md embed `glomscan model-card`'s table of the
    shipped files' cards (so they cannot drift from the files); --update rewrites that section
    only, and a document without the markers is refused."""
    from click.testing import CliRunner

    from glomscan.cli import main
    from glomscan.model import CARD_DOC_BEGIN, CARD_DOC_END

    docs = Path(__file__).resolve().parents[1] / "docs"
    for doc, args in (("model-card.md", []), ("verifier-card.md", ["--verifier"])):
        printed = CliRunner().invoke(main, ["model-card", *args])
        assert printed.exit_code == 0, printed.output
        text = (docs / doc).read_text()
        assert f"{CARD_DOC_BEGIN}\n{printed.output}{CARD_DOC_END}" in text, f"regenerate: glomscan model-card {' '.join(args)} --update docs/{doc}"
        assert "| card_version |" in printed.output and "| outputs |" in printed.output
    target = tmp_path / "card.md"
    target.write_text(f"# title\n\n{CARD_DOC_BEGIN}\nstale\n{CARD_DOC_END}\n\nafter\n")
    res = CliRunner().invoke(main, ["model-card", "--update", str(target)])
    assert res.exit_code == 0, res.output
    updated = target.read_text()
    assert "stale" not in updated and updated.startswith("# title") and updated.endswith("after\n")
    assert "| name | glomscan-aidpath-pas |" in updated
    (tmp_path / "plain.md").write_text("no markers\n")
    res = CliRunner().invoke(main, ["model-card", "--update", str(tmp_path / "plain.md")])
    assert res.exit_code == 2 and "no generated section" in res.output
