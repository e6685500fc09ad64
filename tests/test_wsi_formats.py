"""Real scanner files (../shared/data/wsi_formats, see its sources.tsv): Aperio SVS (JPEG, and
JPEG 2000 without mpp), Hamamatsu NDPI, generic pyramidal TIFF, DICOM WSI sets. Levels, sizes,
mpp and its source, tile reads against OpenSlide's own reading, analysis end to end with a tiny
model, and every slide-like file reported."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import openslide  # noqa: I001  (glomscan, imported by conftest, has already loaded it before pyvips)

from glomscan.batch import run_batch
from glomscan.config import AnalysisSettings
from glomscan.engines.base import EngineChoice
from glomscan.engines.torch_engine import TorchEngine
from glomscan.model import load_checkpoint
from glomscan.slides import Slide, SlideError, TileReader, find_slides, slide_files

from conftest import SHARED_DATA

FORMATS = SHARED_DATA / "wsi_formats"
pytestmark = pytest.mark.skipif(not FORMATS.is_dir(), reason=f"real scanner files not present at {FORMATS}")

SVS = FORMATS / "svs" / "CMU-1-Small-Region.svs"
TCGA = FORMATS / "svs" / "tcga-cr-7395-01a-01-ts1.svs"
NDPI = FORMATS / "ndpi" / "test3-DAPI-2-(387).ndpi"
DICOM = FORMATS / "dicom"


@pytest.mark.parametrize("path, levels, size, mpp", [
    (SVS, 1, (2220, 2967), 0.499),
    (TCGA, 2, (4443, 3567), None),
    (NDPI, 7, (3968, 4864), 0.2282),
    (FORMATS / "tiff" / "small_HE_levels.tiff", 4, (300, 250), None),
    (DICOM / "gcp_wsi2dcm_jpeg.dcm", 1, (957, 715), 16.783),
    (DICOM / "boxes_0.dcm", 1, (16, 16), 0.499),
])
def test_levels_size_and_mpp(path, levels, size, mpp):
    slide = Slide(path)
    assert len(slide.levels) == levels
    assert (slide.levels[0].width, slide.levels[0].height) == size
    if mpp is None:
        assert slide.mpp is None  # absent, or implausible (TIFF without resolution tags)
    else:
        assert slide.mpp == pytest.approx(mpp, rel=1e-3) and slide.mpp_from_metadata == slide.mpp


@pytest.mark.parametrize("path", [SVS, TCGA, NDPI, DICOM / "gcp_wsi2dcm_jpeg.dcm", DICOM / "gcp_wsi2dcm_raw.dcm"])
def test_tile_reads_match_openslide(path):
    slide = Slide(path)
    reference = openslide.OpenSlide(str(path))
    level = len(slide.levels) - 1 if len(slide.levels) > 1 else 0
    image = slide.level_image(level)
    x, y, t = image.width // 4, image.height // 4, 128
    ours = TileReader(image, t).read(x, y).astype(np.int16)
    ds = reference.level_downsamples[level]
    rgba = np.asarray(reference.read_region((int(x * ds), int(y * ds)), level, (t, t))).astype(np.int16)
    alpha = rgba[..., 3:] / 255.0  # outside the image OpenSlide is transparent
    theirs = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.int16)
    h, w = min(t, image.height - y), min(t, image.width - x)  # compare inside the image only
    ours, theirs = ours[:h, :w], theirs[:h, :w]
    # the same compressed tiles decoded by libvips' and OpenSlide 4's own decoders
    assert np.abs(ours - theirs).mean() < 1.5, np.abs(ours - theirs).mean()


@pytest.mark.parametrize("path, reader", [
    (SVS, "tiff"),  # Aperio JPEG: libvips' TIFF reader gives OpenSlide's pixels exactly
    (TCGA, "openslide"),  # Aperio JPEG 2000: it does not (colours differ), so OpenSlide decodes
    (NDPI, "openslide"),  # not a vendor whose levels are plain TIFF pages
])
def test_vendor_pixels_decoded_by_tiff_reader_only_when_identical(path, reader):
    slide = Slide(path)
    assert slide.pixel_reader == reader
    reference = openslide.OpenSlide(str(path))
    for level in range(len(slide.levels)):
        image = slide.level_image(level)
        x, y, t = image.width // 3, image.height // 3, 200
        ours = TileReader(image, t).read(x, y)
        ds = reference.level_downsamples[level]
        rgba = np.asarray(reference.read_region((int(x * ds), int(y * ds)), level, (t, t)))
        h, w = min(t, image.height - y), min(t, image.width - x)
        if reader == "tiff":
            assert np.array_equal(ours[:h, :w], rgba[:h, :w, :3])


def test_dicom_series_are_one_slide_and_other_files_are_kept_for_reporting():
    found = [p.name for p in find_slides(DICOM)]
    assert "boxes_0.dcm" in found and "boxes_1.dcm" not in found  # one series: level + thumbnail
    assert sorted(p.name for p in slide_files(DICOM / "boxes_0.dcm")) == ["boxes_0.dcm", "boxes_1.dcm"]
    assert len(found) == 8
    with pytest.raises(SlideError, match="BitsAllocated"):
        Slide(DICOM / "highdicom_sm_image_grayscale.dcm")
    with pytest.raises(SlideError, match="transfer syntax"):
        Slide(DICOM / "highdicom_sm_image_jpegls.dcm")


def test_dicom_codecs_decode_alike():
    images = [TileReader(Slide(DICOM / f"gcp_wsi2dcm_{kind}.dcm").level_image(0), 256).read(300, 200).astype(np.int16)
              for kind in ("raw", "jpeg", "jpeg2000")]
    assert np.abs(images[0] - images[1]).mean() < 3 and np.abs(images[0] - images[2]).mean() < 3


def test_not_a_dicom_and_not_a_slide(tmp_path):
    (tmp_path / "notes.dcm").write_text("not dicom")
    with pytest.raises(SlideError, match="not a readable DICOM file"):
        Slide(tmp_path / "notes.dcm")


def _tiny(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    return model, TorchEngine(model)


def test_every_slide_like_file_is_analysed_or_failed_with_a_reason(tmp_path, tiny_checkpoint):
    slides = tmp_path / "slides"
    shutil.copytree(FORMATS, slides)
    model, engine = _tiny(tiny_checkpoint)
    settings = AnalysisSettings(tile=1024, overlap=512, batch_size=1, workers=1)
    run_batch(slides, tmp_path / "out", model, engine, EngineChoice("torch", "test"), settings, recursive=True,
              quiet=True)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("slide")
    expected_files = [p for p in slides.rglob("*") if p.suffix.lower() in {".svs", ".ndpi", ".tif", ".tiff", ".dcm"}]
    reported = set(summary.path.map(lambda p: p.split("/slides/")[-1]))
    for p in expected_files:
        rel = str(p.relative_to(slides))
        if p.name == "boxes_1.dcm":
            continue  # the thumbnail instance of boxes_0's series
        assert rel in reported, f"{rel} not in summary.csv"
    assert summary.reason.fillna("").str.len()[summary.status == "failed"].gt(0).all()
    ok = set(summary.index[summary.status == "ok"])
    assert {"CMU-1-Small-Region", "tcga-cr-7395-01a-01-ts1", "test3-DAPI-2-(387)", "boxes", "small_HE_levels"} <= ok
    reasons = summary.reason.fillna("")
    assert "too small to hold a glomerulus" in reasons["small"]
    assert "too small to hold a glomerulus" in reasons["boxes_0"]
    assert "too coarse" in reasons["gcp_wsi2dcm_jpeg"]
    assert "Couldn't get image flavor" in reasons["pathml_small_dicom"]
    tcga = json.loads((tmp_path / "out" / "tcga-cr-7395-01a-01-ts1" / "report.json").read_text())
    assert tcga["mpp"] is None and tcga["mpp_source"] == "unknown" and tcga["analysis_downsample"] == 2.0
    svs = json.loads((tmp_path / "out" / "CMU-1-Small-Region" / "report.json").read_text())
    assert svs["mpp_source"] == "metadata" and svs["pyramid_level"] == 0 and svs["pixel_reader"] == "tiff"
    assert tcga["pixel_reader"] == "openslide"


def test_dicom_slide_analysed_end_to_end(tmp_path, tiny_checkpoint):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(DICOM / "gcp_wsi2dcm_jpeg.dcm", slides)
    model, engine = _tiny(tiny_checkpoint)
    # scanned at 16.8 µm/px: analysed at its own resolution (a format check, not a diagnosis)
    settings = AnalysisSettings(target_mpp=16.783, tile=256, overlap=128, batch_size=1, workers=1,
                                min_glomerulus_area_um2=0)
    outcome = run_batch(slides, tmp_path / "out", model, engine, EngineChoice("torch", "test"), settings, quiet=True)
    assert not outcome.failed
    report = json.loads((tmp_path / "out" / "gcp_wsi2dcm_jpeg" / "report.json").read_text())
    assert report["status"] == "ok" and report["mpp"] == pytest.approx(16.783) and report["mpp_source"] == "metadata"
    assert (report["width"], report["height"]) == (957, 715) and report["tiles_tissue"] >= 1
    assert (tmp_path / "out" / "gcp_wsi2dcm_jpeg" / "mask.tif").stat().st_size > 0


def test_slides_found_by_content_without_a_known_extension(tmp_path):
    shutil.copy(DICOM / "gcp_wsi2dcm_jpeg.dcm", tmp_path / "1.2.276.0.7230010")  # PACS-style name
    shutil.copy(FORMATS / "tiff" / "boxes.tiff", tmp_path / "scan.bin")
    (tmp_path / "README").write_text("notes")
    (tmp_path / "outline.geojson").write_text("{}")
    assert [p.name for p in find_slides(tmp_path)] == ["1.2.276.0.7230010", "scan.bin"]
    assert Slide(tmp_path / "1.2.276.0.7230010").vendor == "dicom"
    assert len(Slide(tmp_path / "scan.bin").levels) == 4
