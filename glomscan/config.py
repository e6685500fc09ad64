"""Settings as dataclasses. Every value has a domain meaning and a unit in its name or doc."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field


GPU_PRECISIONS = ("fp16", "fp32")
"""--precision of analyze and build-engine: one engine spec, so an engine built by one is found by the other."""
BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
"""Inference backends ``analyze --backend`` accepts."""
BLEND_WINDOWS = ("cosine", "gaussian")
"""Blending windows for overlapping tiles (see ``merge.blending_window``)."""


@dataclass(frozen=True)
class TissueSettings:
    thumbnail_downsample: float = 16.0
    """Tissue is detected on a thumbnail this many analysis pixels per thumbnail pixel."""
    min_saturation: float = 0.05
    """Otsu's threshold on HSV saturation is clamped to at least this (blank glass stays blank)."""
    max_saturation: float = 0.25
    """... and to at most this (heavily stained slides still keep their pale tissue)."""
    min_tissue_area_um2: float = 20_000.0
    """Tissue fragments smaller than this are dropped (dust, debris)."""


@dataclass(frozen=True)
class AnalysisSettings:
    target_mpp: float | None = None
    """Analysis resolution in micrometres per pixel. None: take the model card's (paper: ~1.0)."""
    downsample: float = 2.0
    """Used only when a slide's mpp is unknown: analysis = level 0 downsampled by this factor."""
    mpp_override: float | None = None
    """Level-0 mpp to use for slides that carry none in their metadata."""
    tile: int = 1024
    """Tile side at analysis resolution, pixels."""
    overlap: int = 256
    """Overlap between neighbouring tiles, pixels (stride = tile - overlap); default
    ``default_overlap(tile)``, which ``analysis_settings_for`` applies to any tile."""
    batch_size: int = 2
    """Tiles per inference call (the CLI's 0 means: the engine's preferred size)."""
    workers: int = 2
    """Reader threads that prefetch tiles while the model runs."""
    merge_workers: int = 0
    """Threads that blend predictions and find and measure glomeruli (results do not depend on
    it). 0: one per CPU this process may use (see ``cpu_share``)."""
    blend: str = "cosine"
    """Blending window for overlapping tiles: cosine (raised cosine) or gaussian (MONAI-like)."""
    foreground_threshold: float = 0.5
    """A pixel belongs to a glomerulus when max(p_normal, p_sclerosed) >= this."""
    min_glomerulus_area_um2: float = 1500.0
    """Connected components smaller than this are dropped (when mpp is unknown, the analysis
    mpp is assumed to be the model's to convert this to pixels)."""
    max_pending_rows: int = 8192
    """Bound on the rows a single unfinished component may hold open while streaming."""
    tissue: TissueSettings = field(default_factory=TissueSettings)
    verify_candidates: bool = True
    """Run the model's candidate verifier (second stage) when it has one; ``--no-verifier``
    turns it off."""
    viewer: bool = True
    """Write the zoomable review page per slide (``viewer.html`` and its Deep Zoom tiles);
    not part of the result, so not in the fingerprint."""

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def validate(self) -> None:
        if self.tile <= 0 or self.overlap < 0 or self.overlap >= self.tile:
            raise ValueError(f"need 0 <= overlap < tile, got tile={self.tile} overlap={self.overlap}")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("batch size and workers must be >= 1")
        if self.merge_workers < 0:
            raise ValueError("merge workers must be >= 0 (0: one per CPU)")
        if self.blend not in BLEND_WINDOWS:
            raise ValueError(f"blend must be one of {BLEND_WINDOWS}, got {self.blend!r}")
        if self.downsample <= 0:
            raise ValueError("downsample must be > 0")

    def fingerprint(self) -> str:
        """Hash of everything that changes the result (not batch size, thread counts or the viewer)."""
        d = asdict(self)
        for k in ("batch_size", "workers", "merge_workers", "viewer"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class SettingError(ValueError):
    """A setting that cannot run; ``setting`` names it (an ``AnalysisSettings`` field), so a
    front end can point at its own option for it."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def default_overlap(tile: int) -> int:
    """A quarter of the tile (stride 768 for 1024 px tiles): at the shipped model's 1 µm/px the
    256 µm overlap holds nearly every glomerulus whole in at least one window. Measured
    (docs/benchmarks.md, "Fewer windows"): the shipped pair gives the same answer as at stride
    512 within the validation's noise, with no added false detection on the real outlined
    tiles, for 0.44 of the windows on a large slide; stride 896 added one."""
    return tile // 4


def analysis_settings_for(card, tile: int | None = None, overlap: int | None = None, **options) -> AnalysisSettings:
    """The one place where the user's options and a model card become analysis settings: the
    tile (default: the card's; a multiple of what the card's encoder needs), the overlap
    (default: :func:`default_overlap`), and every other ``AnalysisSettings`` field as given (the target
    mpp stays None: the card's, resolved per slide by ``slides.analysis_resolution``). ``card``
    is a ``model.ModelCard`` (anything with ``name``, ``tile`` and ``tile_multiple``). Raises
    ValueError for settings that cannot run (``SettingError`` naming the setting where one is at fault)."""
    tile = tile or card.tile
    if tile % card.tile_multiple:
        raise SettingError("tile", f"{tile} px: {card.name}'s encoder needs tiles that are multiples of "
                                   f"{card.tile_multiple} px")
    settings = AnalysisSettings(tile=tile, overlap=default_overlap(tile) if overlap is None else overlap, **options)
    settings.validate()
    return settings


def cpu_share() -> int:
    """CPUs this process may use: its CPU affinity, or OMP_NUM_THREADS when that is set and
    smaller (the share of the cores ``--cluster local`` gives each worker process)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cpus, int(threads)) if threads.isdigit() and int(threads) > 0 else cpus)
