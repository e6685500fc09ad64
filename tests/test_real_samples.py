"""Real public samples from ../shared/data (see its README); skipped when the folder is absent."""

import numpy as np
import pyvips
import pytest

from glomscan.config import AnalysisSettings, TissueSettings
from glomscan.merge import BlendingCanvas
from glomscan.postprocess import InstanceStream
from glomscan.imaging import image_to_array
from glomscan.slides import Slide, TileReader, detect_tissue
from glomscan.tiling import TileGrid

from conftest import SHARED_DATA, ORACLE_CHOICE, OracleEngine, oracle_model

VEGF = SHARED_DATA / "vegf_roi"
pytestmark = pytest.mark.skipif(not VEGF.is_dir(), reason=f"real samples not present at {SHARED_DATA}")
FIELDS = ["R22_VEGF_2_15.0xC1", "R22_VEGF_2_15.0xC2"]


def load_rgb(path):
    im = pyvips.Image.new_from_file(str(path))
    return image_to_array(im)[..., :3]


@pytest.mark.parametrize("field", FIELDS)
def test_real_field_as_pyramidal_tiff_reads_back_exactly(field, tmp_path):
    source = pyvips.Image.new_from_file(str(VEGF / f"{field}.jpg"))
    out = tmp_path / f"{field}.tif"
    source.tiffsave(str(out), tile=True, pyramid=True, compression="deflate", xres=1000 / 0.66, yres=1000 / 0.66, resunit="cm")
    slide = Slide(out)
    assert slide.mpp == pytest.approx(0.66, rel=1e-3) and len(slide.levels) >= 2
    reader = TileReader(slide.level_image(0), 512)
    pixels = image_to_array(source)
    tile = reader.read(1536, 512)  # crosses the right and bottom edges
    assert np.array_equal(tile[:506, :384], pixels[512:1018, 1536:1920])
    assert np.array_equal(tile[506:, :384], pixels[1012:1018, 1536:1920][::-1])  # mirrored past the edge


@pytest.mark.parametrize("field", FIELDS)
def test_tissue_detection_on_real_cortex(field):
    rgb = load_rgb(VEGF / f"{field}.jpg")
    thumb = rgb[::8, ::8]
    tissue = detect_tissue(thumb, 8, 1.0, TissueSettings())
    assert tissue.mask.mean() > 0.6  # a cortex field is mostly tissue
    glom = np.asarray(pyvips.Image.new_from_file(str(VEGF / f"{field}_mask.png")).numpy())[::8, ::8] > 0
    assert tissue.mask[glom].mean() > 0.95  # glomeruli lie inside detected tissue


def test_tissue_detection_on_real_pas_patches():
    for path in sorted((SHARED_DATA / "pas_patches").glob("*.png")):
        tissue = detect_tissue(load_rgb(path)[::4, ::4], 4, 1.0, TissueSettings(min_tissue_area_um2=100))
        assert tissue.mask.mean() > 0.3, path.name


@pytest.mark.parametrize("field", FIELDS)
def test_real_glomerulus_shapes_survive_blending_and_streaming(field):
    """Tiles cut from the biologists' mask, blended and streamed, give back their instances."""
    mask = np.asarray(pyvips.Image.new_from_file(str(VEGF / f"{field}_mask.png")).numpy()) > 0
    instances = np.load(VEGF / f"{field}_instances.npy")
    h, w = mask.shape
    grid = TileGrid(w, h, 256, 128)
    canvas = BlendingCanvas(grid, 2)
    painted = np.zeros((h, w), np.uint8)

    def sink(y0, rows):
        painted[y0:y0 + rows.shape[0]] = rows

    stream = InstanceStream(w, ("normal", "sclerosed"), min_area_px=0, row_sink=sink)
    padded = np.zeros((h + 256, w + 256), np.float32)
    padded[:h, :w] = mask
    for t in grid.tiles():
        p = np.stack([padded[t.y:t.y + 256, t.x:t.x + 256], np.zeros((256, 256), np.float32)])
        for band in canvas.add(t, p):
            stream.push(band)
    for band in canvas.finish():
        stream.push(band)
    found = stream.finish()
    assert np.array_equal(painted > 0, mask)
    assert len(found) == len(np.unique(instances)) - 1
    areas = sorted(g.area_px for g in found)
    assert areas == sorted(np.bincount(instances.ravel())[1:][np.bincount(instances.ravel())[1:] > 0].tolist())


def test_analyze_real_jpeg_without_mpp(tmp_path):
    from glomscan.batch import run_batch

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "field.jpg").write_bytes((VEGF / f"{FIELDS[0]}.jpg").read_bytes())
    outcome = run_batch(slides, tmp_path / "out", oracle_model(), OracleEngine(), ORACLE_CHOICE,
                        AnalysisSettings(tile=256, overlap=128), quiet=True)
    report = outcome.reports[0]
    assert report.status == "ok", report.reason
    assert report.mpp_source == "unknown" and report.analysis_downsample == 2.0
    assert report.tiles_tissue > 0 and report.tissue_area_mm2 is None and report.tissue_area_px > 1e6
