import numpy as np
import pytest
import pyvips

from glomscan.config import TissueSettings
from glomscan.imaging import image_to_array
from glomscan.slides import Slide, SlideError, TileReader, detect_tissue, find_slides, otsu_threshold
from glomscan.synthetic import write_synthetic_slide

from conftest import TEST_TISSUE


def test_pyramid_levels_and_mpp(small_slide):
    slide = Slide(small_slide.path)
    assert slide.mpp == pytest.approx(0.5)
    assert [lv.downsample for lv in slide.levels[:3]] == pytest.approx([1, 2, 4], rel=0.01)
    assert (slide.levels[0].width, slide.levels[0].height) == (3600, 3200)


def test_level_selection_reads_level_without_resampling(small_slide):
    slide = Slide(small_slide.path)
    # 0.5 µm/px slide, 1.0 µm/px target: downsample 2 is level 1 itself
    image, level = slide.image_at(2.0)
    assert level.index == 1
    assert (image.width, image.height) == (1800, 1600)
    # read from level 1 unchanged: identical pixels to the level image
    a = image_to_array(image.crop(100, 100, 64, 64))
    b = image_to_array(slide.level_image(1).crop(100, 100, 64, 64))
    assert np.array_equal(a, b)
    # downsample 4 -> level 2; downsample 3 -> level 1 resampled by 1.5
    assert slide.image_at(4.0)[1].index == 2
    image3, level3 = slide.image_at(3.0)
    assert level3.index == 1 and image3.width == 1200


def test_best_level_never_coarser_than_asked(small_slide):
    slide = Slide(small_slide.path)
    assert slide.best_level(1.9).index == 0
    assert slide.best_level(2.03).index == 1  # 2 % tolerance
    assert slide.best_level(0.5).index == 0


def test_mpp_missing_then_override(tmp_path):
    s = write_synthetic_slide(tmp_path / "nompp.tif", 600, 500, [], mpp=None)
    assert Slide(s.path).mpp is None
    slide = Slide(s.path, mpp_override=0.25)
    assert slide.mpp == 0.25 and slide.mpp_from_metadata is None


def test_flat_png_is_one_level(tmp_path):
    arr = np.full((300, 400, 4), 200, np.uint8)
    pyvips.Image.new_from_array(arr).write_to_file(str(tmp_path / "x.png"))
    slide = Slide(tmp_path / "x.png")
    assert len(slide.levels) == 1
    im = slide.level_image(0)
    assert im.bands == 3 and im.format == "uchar"


def test_tissue_mask_matches_drawn_tissue(small_slide):
    slide = Slide(small_slide.path)
    thumb, _ = slide.image_at(2.0 * 16)
    tissue = detect_tissue(image_to_array(thumb), 16, 1.0, TissueSettings())
    # truth: the tissue rectangle at 32 level-0 px per thumbnail px
    truth = np.zeros_like(tissue.mask)
    x0, y0, x1, y1 = (v / 32 for v in TEST_TISSUE[0])
    yy, xx = np.mgrid[0:truth.shape[0], 0:truth.shape[1]] + 0.5
    truth[(xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)] = True
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.9
    assert tissue.area_px() == pytest.approx(truth.sum() * 256, rel=0.1)


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(245, 3, size=(100, 120, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(glass, 16, 1.0, TissueSettings()).mask.any()


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(1000, 0.1), np.full(1000, 0.6)])
    assert 0.1 < otsu_threshold(values) < 0.6


def test_tile_reader_mirrors_past_the_edge(small_slide):
    slide = Slide(small_slide.path)
    image, _ = slide.image_at(2.0)
    reader = TileReader(image, 256)
    tile = reader.read(image.width - 100, image.height - 50)
    assert tile.shape == (256, 256, 3)
    inside = image_to_array(image.crop(image.width - 100, image.height - 50, 100, 50))
    assert np.array_equal(tile[:50, :100], inside)
    assert np.array_equal(tile[50:100, :100], inside[::-1])  # mirrored below the edge
    assert np.array_equal(tile[:50, 100:200], inside[:, ::-1])  # and right of it
    assert (reader.read(image.width + 10, 0) == 255).all()  # wholly outside: glass


def test_find_slides_by_extension(tmp_path):
    for name in ("a.svs", "b.TIF", "c.ndpi", "d.txt", ".hidden.tif", "e.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.tiff").write_bytes(b"x")
    assert [p.name for p in find_slides(tmp_path)] == ["a.svs", "b.TIF", "c.ndpi", "e.png"]
    assert "f.tiff" in [p.name for p in find_slides(tmp_path, recursive=True)]


@pytest.mark.parametrize("content, expected", [(b"", "empty file"), (b"this is not a tiff", "cannot open")])
def test_unusable_files_raise_slide_error(tmp_path, content, expected):
    p = tmp_path / "bad.tif"
    p.write_bytes(content)
    with pytest.raises(SlideError, match=expected):
        Slide(p)


def test_svs_extension_with_garbage_is_a_slide_error(tmp_path):
    p = tmp_path / "bad.svs"
    p.write_bytes(b"\x00" * 4096)
    with pytest.raises(SlideError):
        Slide(p)


def test_real_tissue_slide_is_paved_with_the_sample_tiles(tmp_path):
    from glomscan.shipped import SAMPLE_DIR
    from glomscan.synthetic import GLASS, write_real_tissue_slide

    if not sorted(SAMPLE_DIR.glob("*.tif")):
        pytest.skip("the shipped sample is not installed")
    placed = write_real_tissue_slide(tmp_path / "real.tif", 3000, 2500, [(100, 200, 2148, 1224)], seed=3)
    assert placed == 2  # two 1024 px tiles across, one down
    slide = Slide(tmp_path / "real.tif")
    assert slide.mpp == pytest.approx(0.5) and len(slide.levels) > 1
    image = image_to_array(slide.image_at(1.0)[0]).astype(int)
    assert np.abs(image[2400, 2900] - GLASS).max() <= 3  # glass off the tissue rectangle
    first = image[200:1224, 100:1124]
    samples = [image_to_array(pyvips.Image.new_from_file(str(p)))[..., :3].astype(int)
               for p in sorted(SAMPLE_DIR.glob("*.tif"))]
    turned = [np.rot90(s, k)[:, ::f] for s in samples for k in range(4) for f in (1, -1)]
    assert min(np.abs(first - t).mean() for t in turned) < 3  # one sample tile, turned (JPEG-close)


def test_generic_tiff_through_openslide_reads_its_pages_with_libvips(small_slide, tmp_path):
    """An OpenSlide-only name (.svs) on a generic tiled TIFF: OpenSlide describes the levels,
    libvips' TIFF reader decodes them (same pixels, checked against OpenSlide 4's at every level:
    openslide-python with openslide-bin; Debian 12's OpenSlide 3.4.1 with libtiff 4.5.0-6+deb12u4
    returns pixels that change between processes for the coarsest level, one partial tile)."""
    import openslide

    link = tmp_path / "case01.svs"
    link.symlink_to(small_slide.path)
    slide = Slide(link)
    assert slide.vendor == "generic-tiff" and slide.pixel_reader == "tiff"
    reference = openslide.OpenSlide(str(link))
    for level in slide.levels:
        ours = image_to_array(slide.level_image(level.index).crop(0, 0, 96, 96))
        theirs = np.asarray(reference.read_region((0, 0), level.index, (96, 96)))
        assert (theirs[..., 3] == 255).all() and np.array_equal(ours, theirs[..., :3])
    assert Slide(small_slide.path).pixel_reader == "tiff"


def test_openslide_keeps_decoding_when_the_tiff_reader_differs(small_slide, tmp_path, monkeypatch):
    """As for JPEG 2000 SVS files, whose colours libvips' TIFF reader gets wrong: the probe
    finds the difference and OpenSlide decodes."""
    link = tmp_path / "case01.svs"
    link.symlink_to(small_slide.path)
    tiffload = pyvips.Image.tiffload
    monkeypatch.setattr(pyvips.Image, "tiffload", lambda *args, **kwargs: tiffload(*args, **kwargs).invert())
    slide = Slide(link)
    assert slide.pixel_reader == "openslide"
    ours = image_to_array(slide.level_image(1).crop(0, 0, 64, 64))
    assert np.array_equal(ours, image_to_array(pyvips.Image.openslideload(str(link), level=1).flatten().crop(0, 0, 64, 64)))

