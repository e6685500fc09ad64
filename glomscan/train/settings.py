"""The settings of training data and training: preparing a set (``prepare``), the segmentation
U-Net (``train segment``) and the candidate verifier (``train verifier``), in one light module
(no torch, no image libraries) so the command line takes its defaults from them. The
augmentation's settings (``augment ...``, ``train inpaint | masks``) are in
:mod:`glomscan.augment.settings`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TissueSettings
from ..labels import BACKGROUND, LABEL_OF_CLASS, NORMAL, QUPATH_CLASS_NAMES, SCLEROSED, UNKNOWN_CLASS

DEFAULT_CLASS_MAP = {
    **{name.lower(): LABEL_OF_CLASS[cls] for cls, name in QUPATH_CLASS_NAMES.items()},
    "normal": NORMAL, "normal glomerulus": NORMAL, "glomerulus": NORMAL, "non-sclerotic": NORMAL,
    "sclerosed": SCLEROSED, "sclerosed glomerulus": SCLEROSED, "sclerotic": SCLEROSED,
    "globally sclerosed": SCLEROSED, "global sclerosis": SCLEROSED, "sclerotic glomerulus": SCLEROSED,
    "glomerulus (class unknown)": UNKNOWN_CLASS, "glomerulus, class unknown": UNKNOWN_CLASS,
    "glomerulus unknown": UNKNOWN_CLASS, "unknown": UNKNOWN_CLASS,
    "not glomerulus": BACKGROUND, "not a glomerulus": BACKGROUND, "false detection": BACKGROUND,
}
"""QuPath classification name (case-insensitive) -> label (3: glomerulus of unknown class,
which supervises only glomerulus-vs-background; 0: background, e.g. the false detections of a
file corrected in the review page; note that plain "glomerulus" means normal)."""


@dataclass(frozen=True)
class SegmentSettings:
    epochs: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 1e-5
    crop: int | None = None
    """Random crop side for training (None: whole patches, as the paper). Validation always
    uses whole patches."""
    encoder: str = "efficientnet-b3"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    encoder_weights: str | None = None
    """Local file with encoder weights (state dict); nothing is downloaded."""
    analysis_mpp: float = 1.0
    seed: int = 0
    workers: int = 0
    max_steps_per_epoch: int | None = None
    bn_recalibration_steps: int = 20
    """Before each validation, re-estimate BatchNorm statistics exactly over this many training
    batches (smp's EfficientNet uses momentum 0.01, so short runs otherwise validate with stale
    running statistics). 0 disables."""
    name: str = "glomscan-unet"
    trained_on: str = ""
    tile: int | None = None
    """Analysis tile the model card records (None: the patch size of the set)."""
    precision: str = "auto"
    """auto, bf16, fp16 (CUDA) or fp32; auto: fp16 on CUDA, bf16 on CPUs with bf16 instructions."""
    device: str | None = None
    """cuda, cuda:1 or cpu (None: cuda if available)."""
    stain_jitter: float = 0.0
    """Whole-patch stain augmentation (optical density gain 1 +- this per channel)."""
    jpeg_min_quality: int | None = None
    """JPEG augmentation: half the training patches are JPEG-compressed with chroma subsampling
    (4:2:0, as in most scanners' files) at a quality uniform in [this, 95]. None: off."""
    init: str | None = None
    """glomscan checkpoint whose weights start the training (fine-tuning); None: random init."""
    scale_jitter: float = 0.0
    """Scale augmentation (with ``data_on_device``): each batch magnified by a factor drawn
    log-uniformly from [1 / (1 + this), 1 + this]. 0: off."""
    data_on_device: bool = False
    """Hold the training patches on the training device and cut and augment each batch there
    (stain jitter by optical-density gain, shift and saturation; JPEG through torchvision's
    codec) instead of in loader processes: what keeps a GPU busy. Patches of one size only."""
    intended_use: str = ""
    licence: str = ""


@dataclass(frozen=True)
class CompositeSettings:
    diameter_range_um: tuple[float, float] = (100.0, 250.0)
    """Equivalent diameters of pasted glomeruli are uniform in this range (µm)."""
    edge_sigma_px: float = 1.5
    """Softness of the cut along the outline (Gaussian sigma, analysis pixels)."""
    stain_match: float = 0.8
    """0: keep the crop's colours; 1: match the background tissue's mean optical density."""
    stain_jitter: float = 0.08
    """Per-channel multiplicative jitter of optical density (uniform +-)."""
    min_tissue_fraction: float = 0.9
    """Share of the outline that must lie on tissue."""
    clearance_px: int = 8
    """Minimum gap between a pasted outline and any labelled glomerulus."""
    attempts: int = 40
    """Random positions tried per glomerulus before giving up on a background."""


@dataclass
class PrepareSettings:
    target_mpp: float = 1.0
    downsample: float = 2.0
    """Used for slides without mpp."""
    tile: int = 1024
    stride: int = 512
    validation_fraction: float = 0.2
    seed: int = 0
    class_map: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CLASS_MAP))
    tissue: TissueSettings = field(default_factory=TissueSettings)
    tiles_mpp: float = 0.5
    """µm/px of a tile set's images (AIDPATH tiles: 20x, about 0.5)."""
    composite_uses: int = 3
    """Each training glomerulus crop is pasted this many times (other size, place, stain)."""
    sclerosed_oversampling: int = 2
    """Training crops of sclerosed glomeruli (the minority, about 1 in 5) are pasted this many
    times more often."""
    glomeruli_per_composite: tuple[int, int] = (2, 4)
    """Glomeruli pasted into one tile (inclusive range)."""
    composite: CompositeSettings = field(default_factory=CompositeSettings)


@dataclass(frozen=True)
class VerifierSettings:
    """``train verifier``: the candidate verifier's samples (``train/fit/verifier.py``) and training."""

    epochs: int = 16
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    input_px: int = 128
    """Side of the crop the network sees."""
    context_px: int = 160
    """Side of each sample's stored context (the widest framing plus room for the shift)."""
    margin_range: tuple[float, float] = (0.05, 0.30)
    """Training framings: the box plus this fraction of its longer side on every side."""
    shift_fraction: float = 0.08
    """Training framings are shifted by up to this fraction of the view's half side."""
    stain_jitter: float = 0.2
    jpeg_fraction: float = 0.5
    """Share of samples cut from a JPEG (quality 60-95, 4:2:0) copy of their patch."""
    mining_threshold: float = 0.15
    """Hard negatives: segmentation components of max class probability >= this matching no
    outline (0: mine nothing)."""
    min_area_px: float = 1500.0
    """Smallest mined component (analysis pixels; analyze's 1500 µm² at 1 µm/px)."""
    mined_jitter: int = 6
    """Boxes sampled around each mined negative."""
    hard_negative_weight: float = 2.0
    hard_negatives: bool = True
    """Train on the mined negatives (False: leave them out, for measuring what they bring)."""
    composites_mined_per_tile: int = 10
    """Composites per background tile the model is run on for mining (besides the tiles)."""
    random_negatives_per_patch: int = 2
    random_negatives_per_tile: int = 12
    random_box_sides_px: tuple[float, float] = (90.0, 260.0)
    seed: int = 0
    precision: str = "auto"
    device: str | None = None
