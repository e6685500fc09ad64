"""One slide, end to end: slide -> tissue -> tiles -> engine -> blending -> instances -> files."""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .config import AnalysisSettings, cpu_share
from .engines.base import Engine, EngineChoice
from .merge import BlendingCanvas, Merger
from .model import LoadedModel
from .postprocess import InstanceStream, glomerulus_class
from .atomic import atomic_write_text
from .interrupts import raise_if_interrupted
from .progress import Progress
from .qupath import write_geojson
from .report import (
    REJECTED_FILE,
    StreamedLabelFile,
    glomeruli_geojson,
    glomeruli_table,
    wilson_interval,
    write_glomeruli_csv,
    write_mask_tiff,
    write_overview,
)
from .imaging import image_to_array
from .slides import Slide, SlideError, analysis_resolution
from .tiling import Tile, TileGrid, TileSource

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE_PX = 64
"""Images whose longer side is shorter than this at the analysis resolution (64 µm at 1 µm/px)
cannot hold a glomerulus and are refused with that reason."""
OUTPUT_FILES = ("mask.tif", "glomeruli.csv", "glomeruli.geojson", "overview.png", "report.json")
OVERVIEW_MAX_SIDE = 2048


RESULT_FIELDS = ("n_glomeruli", "n_normal", "n_sclerosed", "percent_global_glomerulosclerosis", "ci95_low",
                 "ci95_high", "dropped_small_components", "n_candidates", "n_rejected", "inference_s")


@dataclass
class SlideReport:
    """Everything report.json and the summary row say about one slide."""

    slide: str
    path: str
    status: str = "failed"
    reason: str = ""
    n_glomeruli: int | None = None
    n_normal: int | None = None
    n_sclerosed: int | None = None
    percent_global_glomerulosclerosis: float | None = None
    ci95_low: float | None = None
    ci95_high: float | None = None
    tissue_area_mm2: float | None = None
    tissue_area_px: int | None = None
    """Level-0 pixels."""
    mpp: float | None = None
    mpp_source: str = "unknown"
    analysis_mpp: float | None = None
    analysis_downsample: float | None = None
    pyramid_level: int | None = None
    pixel_reader: str | None = None
    """What decoded the pixels (Slide.pixel_reader): openslide, tiff, dicom or flat."""
    n_levels: int | None = None
    """Pyramid levels in the file."""
    width: int | None = None
    height: int | None = None
    tiles_total: int | None = None
    tiles_tissue: int | None = None
    dropped_small_components: int | None = None
    n_candidates: int | None = None
    """Glomerulus candidates of the segmentation model (accepted + rejected)."""
    n_rejected: int | None = None
    """Candidates the verifier judged not glomeruli (None: it did not run)."""
    backend: str = ""
    backend_reason: str = ""
    model_id: str = ""
    model_sha256: str = ""
    model_intended_use: str = ""
    model_licence: str = ""
    verifier_id: str = ""
    """The candidate verifier (second stage); empty when it did not run."""
    verifier_sha256: str = ""
    verifier_licence: str = ""
    runtime_s: float | None = None
    inference_s: float | None = None
    gpu_memory_peak_mib: float | None = None
    """GPU memory the engine of the process that analysed the slide had allocated at most by the
    slide's end (torch on CUDA; None elsewhere): what bounds several slide workers on one GPU."""
    fingerprint: dict = field(default_factory=dict)
    glomscan_version: str = __version__

    def to_json(self) -> str:
        return _json_dumps(asdict(self))

    def mark_failed(self, reason: str, runtime_s: float | None) -> None:
        """Failed: keep what was learnt about the slide (size, mpp and its source, levels,
        tissue, tiles), drop results that were not completed."""
        self.status, self.reason = "failed", reason
        self.runtime_s = None if runtime_s is None else round(runtime_s, 3)
        for name in RESULT_FIELDS:
            setattr(self, name, None)


def _json_dumps(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=float)


def sclerosis_summary(n_normal: int, n_sclerosed: int) -> tuple[float | None, float | None, float | None]:
    """Percent global glomerulosclerosis and its 95 % Wilson interval, in percent."""
    n = n_normal + n_sclerosed
    if n == 0:
        return None, None, None
    lo, hi = wilson_interval(n_sclerosed, n)
    return round(100.0 * n_sclerosed / n, 2), round(100.0 * lo, 2), round(100.0 * hi, 2)


def is_small_image(width: int, height: int, tile: int) -> bool:
    """Images no larger than 2 x 2 tiles at analysis resolution (ROIs, single-glomerulus crops)
    are analysed whole, whatever the tissue detector says: it is tuned for slides with glass
    around the tissue, while an exported ROI is often all tissue."""
    return width <= 2 * tile and height <= 2 * tile


def blank_image_reason(slide: Slide, downsample: float) -> str:
    """Why a small image cannot hold tissue (one flat colour), or '' when it may."""
    thumb, _ = slide.image_at(max(downsample, max(slide.levels[0].width, slide.levels[0].height) / 512))
    pixels = image_to_array(thumb).astype(np.float32)
    if pixels.std(axis=(0, 1)).max() < 2.0:
        return "image is blank (a single flat colour): no tissue to analyse"
    return ""


def predict_tiles(source: TileSource, engine: Engine, batch_size: int,
                  on_batch: Callable[[list[Tile], np.ndarray], None], progress: Progress | None = None) -> float:
    """Stream the source's tiles through ``engine`` in order: the source reads upcoming tiles
    while the engine runs, and one merge thread hands finished predictions to ``on_batch`` (a
    batch at a time, in order) while the engine runs the next batch. Returns seconds spent
    inside ``engine.predict``."""
    inference_s = 0.0
    merges: deque = deque()
    merger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-merge")  # one thread: order kept
    batches = source.batches(batch_size)
    try:
        for tiles, pixels in batches:
            raise_if_interrupted()
            t0 = time.perf_counter()
            probabilities = engine.predict(pixels)
            inference_s += time.perf_counter() - t0
            merges.append(merger.submit(on_batch, tiles, probabilities))
            while len(merges) > 2:  # bound the predictions waiting to be merged
                merges.popleft().result()
            if progress is not None:
                progress.update(len(tiles))
        while merges:
            merges.popleft().result()
    finally:
        batches.close()  # stops the readers, also on an interrupt or an engine failure
        merger.shutdown(wait=True, cancel_futures=True)
    return inference_s


class SlideMerge:
    """Blending (``BlendingCanvas``) and glomerulus finding (``InstanceStream``) of one slide,
    fed predictions a batch at a time in tile order.

    With one worker both run on the calling thread, one after the other. With more, a pool of
    that many threads does their array work (blending split by cell column, labelling by band
    piece, measuring by component), and the bands the canvas finishes are labelled on a thread
    of their own, overlapping the blending of the next batch; at most ``MAX_QUEUED`` batches of
    bands wait there (memory stays bounded). Results do not depend on the number of workers."""

    MAX_QUEUED = 2

    def __init__(self, grid: TileGrid, class_names: tuple[str, ...], settings: AnalysisSettings,
                 min_area_px: float, row_sink, workers: int, merger: Merger | None = None):
        """``merger``: another ``merge.Merger`` than the CPU blending canvas."""
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="merge-worker") if workers > 1 else None
        self.labeller = ThreadPoolExecutor(1, thread_name_prefix="band-label") if workers > 1 else None
        self.canvas = merger if merger is not None else BlendingCanvas(
            grid, len(class_names), settings.foreground_threshold, settings.blend, pool=self.pool, workers=workers)
        self.stream = InstanceStream(grid.width, class_names, min_area_px=min_area_px, row_sink=row_sink,
                                     max_pending_rows=settings.max_pending_rows, pool=self.pool, workers=workers)
        self._queued: deque = deque()

    def add(self, tiles: list[Tile], probabilities: np.ndarray) -> None:
        self._label(self.canvas.add_batch(tiles, probabilities))

    def finish(self):
        """Blend the last rows, label everything and return the glomeruli."""
        self._label(self.canvas.finish())
        while self._queued:
            self._queued.popleft().result()
        return self.stream.finish()

    def close(self) -> None:
        for executor in (self.labeller, self.pool):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

    def _label(self, bands: list) -> None:
        if not bands:
            return
        if self.labeller is None:
            self._push(bands)
            return
        self._queued.append(self.labeller.submit(self._push, bands))
        while len(self._queued) > self.MAX_QUEUED:
            self._queued.popleft().result()

    def _push(self, bands: list) -> None:
        for band in bands:
            self.stream.push(band)


def verify_candidates(candidates: list, image, verifier, labels_file: StreamedLabelFile) -> tuple[list, list]:
    """The verifier's decision on every candidate (``verify.verify_glomeruli``), with the label
    mask repainted where it changed a class or rejected a candidate."""
    from .verify import verify_glomeruli

    accepted, rejected = verify_glomeruli(candidates, image, verifier)
    for g in accepted + rejected:
        painted = glomerulus_class(g.mean_probabilities) + 1  # what the stream painted
        wanted = 0 if g.rejected else g.label
        if wanted != painted:
            labels_file.relabel(g.bbox, g.contour, wanted)
    return accepted, rejected


def _describe_models(report: SlideReport, model: LoadedModel, choice: EngineChoice, fingerprint: dict,
                     verifier) -> None:
    report.backend, report.backend_reason, report.fingerprint = choice.backend, choice.reason, fingerprint
    report.model_id, report.model_sha256 = model.model_id, model.sha256
    report.model_intended_use, report.model_licence = model.card.intended_use, model.card.licence
    if verifier is not None:
        report.verifier_id, report.verifier_sha256 = verifier.model_id, verifier.sha256
        report.verifier_licence = verifier.card.licence


def _open_slide(path: Path, name: str, model: LoadedModel, settings: AnalysisSettings, report: SlideReport):
    """The slide, its image at the analysis resolution (the one resolution rule), that level
    and the resolution; the report learns the slide's size, levels, mpp and reader. SlideError
    for slides that cannot be analysed (colours, too small)."""
    slide = Slide(path, mpp_override=settings.mpp_override)
    level0 = slide.levels[0]
    report.width, report.height, report.n_levels = level0.width, level0.height, len(slide.levels)
    report.pixel_reader = slide.pixel_reader
    report.mpp = slide.mpp
    report.mpp_source = ("metadata" if slide.mpp_from_metadata is not None
                         else "override" if slide.mpp is not None else "unknown")
    if slide.colour_problem:
        raise SlideError(slide.colour_problem)
    resolution = analysis_resolution(slide, settings.target_mpp or model.card.analysis_mpp, settings.downsample)
    if resolution.analysis_mpp is None:
        log.warning("%s: no mpp in metadata and no --mpp given; analysing at level-0 / %.3g, "
                    "areas in pixels only", name, resolution.downsample)
    image, level = slide.image_at(resolution.downsample)
    report.analysis_mpp, report.analysis_downsample = resolution.analysis_mpp, resolution.downsample
    report.pyramid_level = level.index
    if max(image.width, image.height) < MIN_IMAGE_SIDE_PX:
        raise SlideError(f"image too small to hold a glomerulus: {image.width} x {image.height} px at the analysis "
                         f"resolution ({level0.width} x {level0.height} px as stored; a glomerulus is about "
                         "100-250 µm across)")
    return slide, image, level, resolution


def _tiles_to_infer(slide: Slide, image, resolution, settings: AnalysisSettings, report: SlideReport
                    ) -> tuple[TileGrid, list[Tile]]:
    """The tile grid and the tiles to infer: those on tissue, or every tile of a small image (an
    ROI or crop a pathologist exported is tissue or nearly); the report learns the tissue area.
    SlideError for a slide without tissue or a blank image."""
    downsample, analysis_mpp = resolution.downsample, resolution.analysis_mpp
    small = is_small_image(image.width, image.height, settings.tile)
    tissue_settings = settings.tissue
    if small:  # a thumbnail 16x coarser than a crop would be a few pixels: detect finer
        tissue_settings = replace(tissue_settings, thumbnail_downsample=max(
            1.0, min(tissue_settings.thumbnail_downsample, max(image.width, image.height) / 256)))
    tissue = slide.tissue(downsample, resolution.assumed_mpp, tissue_settings)
    report.tissue_area_px = int(round(tissue.area_px() * downsample**2))
    if analysis_mpp is not None:
        report.tissue_area_mm2 = round(tissue.area_px() * analysis_mpp**2 / 1e6, 4)
    grid = TileGrid(image.width, image.height, settings.tile, settings.stride)
    if small:
        reason = blank_image_reason(slide, downsample)
        if reason:
            raise SlideError(reason)
        tiles = grid.tiles()
    else:
        if not tissue.mask.any():
            raise SlideError("no tissue detected")
        tiles = grid.tissue_tiles(tissue)
    report.tiles_total, report.tiles_tissue = grid.n_rows * grid.n_cols, len(tiles)
    return grid, tiles


def _count(report: SlideReport, instances: list, rejected: list, verified: bool, dropped_small: int) -> None:
    """Counts, %GS and its interval: accepted glomeruli only (rejected candidates count nowhere)."""
    report.n_normal = sum(g.class_name == "normal" for g in instances)
    report.n_sclerosed = sum(g.class_name == "sclerosed" for g in instances)
    report.n_glomeruli = len(instances)
    report.dropped_small_components = dropped_small
    report.n_candidates = len(instances) + len(rejected)
    report.n_rejected = len(rejected) if verified else None
    (report.percent_global_glomerulosclerosis, report.ci95_low,
     report.ci95_high) = sclerosis_summary(report.n_normal, report.n_sclerosed)


def analyze_slide(path: Path, name: str, out_dir: Path, model: LoadedModel, engine: Engine,
                  choice: EngineChoice, settings: AnalysisSettings, fingerprint: dict,
                  quiet: bool = False, report: SlideReport | None = None) -> SlideReport:
    """Analyse one slide, writing every output file into ``out_dir`` (report.json last).
    Raises SlideError (or pyvips/OS errors) on failure; the caller records them. ``report``,
    when given, is filled in as the slide is learnt about, so a caller still holds what was
    known when a failure came."""
    started = time.perf_counter()
    report = report or SlideReport(slide=name, path=str(path))
    verifier = model.verifier if settings.verify_candidates else None
    _describe_models(report, model, choice, fingerprint, verifier)
    slide, image, level, resolution = _open_slide(path, name, model, settings, report)
    downsample, analysis_mpp, assumed_mpp = resolution.downsample, resolution.analysis_mpp, resolution.assumed_mpp
    grid, tiles = _tiles_to_infer(slide, image, resolution, settings, report)
    level0 = slide.levels[0]
    log.info("%s: %dx%d level 0, level %d, analysis %dx%d px at %s µm/px, %d of %d tiles on tissue",
             name, level0.width, level0.height, level.index, image.width, image.height,
             f"{analysis_mpp:.3g}" if analysis_mpp else "unknown", len(tiles), report.tiles_total)

    labels_file = StreamedLabelFile(out_dir / ".mask.pgm", image.width, image.height)
    merge = SlideMerge(grid, model.card.classes, settings, settings.min_glomerulus_area_um2 / assumed_mpp**2,
                       labels_file.write_rows, settings.merge_workers or cpu_share())
    source = TileSource(image, tiles, settings.tile, readers=settings.workers)
    overview_ds = max(1.0, max(image.width, image.height) / OVERVIEW_MAX_SIDE)
    # the slide's last outputs are made side by side: libvips encodes the mask, the review
    # page's tile pyramid (it needs no result) and reads the overview's pixels (GIL released)
    # while the last rows are labelled and the tables and the overview are made
    writer = ThreadPoolExecutor(3, thread_name_prefix="slide-writer")
    viewer_tiles = None
    try:
        with Progress(len(tiles), f"{name} tiles", quiet=quiet) as progress:
            report.inference_s = round(predict_tiles(source, engine, settings.batch_size, merge.add, progress), 3)
        report.gpu_memory_peak_mib = engine.gpu_memory_peak_mib
        viewer_started = time.perf_counter()
        if settings.viewer:
            from .viewer import write_viewer_tiles

            viewer_tiles = writer.submit(write_viewer_tiles, out_dir, image)
        overview_pixels = writer.submit(lambda: image_to_array(slide.image_at(downsample * overview_ds)[0]))
        instances = merge.finish()
        rejected: list = []
        if verifier is not None:
            instances, rejected = verify_candidates(instances, image, verifier, labels_file)
        mask_written = writer.submit(write_mask_tiff, labels_file.image(), out_dir / "mask.tif", analysis_mpp)
        table = glomeruli_table(instances, downsample, analysis_mpp)
        write_glomeruli_csv(table, out_dir / "glomeruli.csv")
        write_geojson(glomeruli_geojson(instances, table, downsample), out_dir / "glomeruli.geojson")
        if verifier is not None:
            write_geojson(glomeruli_geojson(rejected, glomeruli_table(rejected, downsample, analysis_mpp), downsample),
                          out_dir / REJECTED_FILE)
        write_overview(overview_pixels.result(), overview_ds, instances, out_dir / "overview.png")
        mask_written.result()
        if viewer_tiles is not None:
            viewer_tiles.exception()  # wait; its failure is the viewer's, not the slide's
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        merge.close()
        labels_file.close()
    labels_file.path.unlink()

    _count(report, instances, rejected, verifier is not None, merge.stream.dropped_small)
    report.status, report.reason = "ok", ""
    if viewer_tiles is not None:
        from .viewer import finish_viewer

        finish_viewer(out_dir, report, image.width, image.height, viewer_started, viewer_tiles.exception())
    report.runtime_s = round(time.perf_counter() - started, 3)
    atomic_write_text(out_dir / "report.json", report.to_json())
    return report
