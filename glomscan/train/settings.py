"""The settings of training data and training: preparing a set (``prepare``), augmenting it
(``augment crops | masks | synthesize``) and the three trainers (``train segment | inpaint |
masks``), in one light module (no torch, no image libraries) so the command line takes its
defaults from them."""

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


GENERATOR_UPSAMPLING = ("resize", "transposed")
"""How the inpainting generator's decoder doubles the resolution: "resize" (bilinear x2, then a
3 x 3 convolution, as AOT-GAN's own decoder) or "transposed" (4 x 4 stride-2 transposed
convolution, the generators trained before; prone to checkerboard patterns)."""


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
class InpaintSettings:
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lr_decay_after_epoch: int | None = None
    """None: the learning rate stays ``lr`` (the paper). N: after epoch N, the learning rate of
    the generator and both discriminators falls step by step along a half cosine from ``lr`` to
    0 at the end of the last epoch (not in the paper; lets the late epochs refine instead of
    drift). A function of the epoch and step alone, so a resumed run follows the same schedule."""
    size: int | None = None
    """Train at this crop side (crops are resized; None: the crops' own size, 256 in the paper).
    Multiple of 4, at least 64 (the AOT blocks' dilation-8 reflection padding needs H/4 > 8)."""
    base_channels: int = 64
    """Generator c (c, 2c, 4c) and discriminator c (c, 2c, 4c, 8c, 1); 64 as the paper."""
    n_aot_blocks: int = 8
    upsampling: str = "resize"
    """The decoder's x2 upsampling, one of :data:`GENERATOR_UPSAMPLING`."""
    lambda_local_l1: float = 1.0
    perceptual_weight: float = 0.1
    style_weight: float = 150.0
    """The paper's weights (method.md), set for VGG19's activations; the scale of the Gram
    matrices depends on the feature network, so another network may need another weight."""
    ssim_weight: float = 0.0
    """Weight of 1 - SSIM inside the mask (not in the paper; 0 leaves it out)."""
    ema_decay: float = 0.0
    """0: the generator is saved and evaluated as trained. In (0, 1): an exponential moving
    average of its weights and BatchNorm statistics, updated after every step with this decay,
    is saved and evaluated instead (not in the paper; steadies a GAN's epoch-to-epoch swings).
    A run resumed with it from a state without an average starts the average there."""
    vgg_weights: str | None = None
    """Local torchvision VGG19 state dict (the paper's feature network)."""
    feature_model: str | None = None
    """Or: a glomscan segmentation model file whose encoder (trained on PAS kidney tissue) is
    the feature network. Neither: the perceptual and style losses are off."""
    precision: str = "fp32"
    """On the CPU: fp32, or bf16 (autocast, CPUs with bf16 instructions; "auto" picks it when
    present). CUDA always uses fp16 AMP."""
    augment: bool = True
    """Random flips and 90° rotations of the training crops (not in the paper)."""
    max_steps_per_epoch: int | None = None
    device: str | None = None
    """None: cuda if available, else cpu."""
    seed: int = 0
    samples: int = 4
    """Held-out crops shown in each epoch's sample grid."""


@dataclass(frozen=True)
class MaskGanSettings:
    epochs: int = 200
    batch_size: int = 64
    image_size: int = 64
    latent: int = 100
    base_channels: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    steps_per_epoch: int | None = None
    """Default: one pass over the real masks (at least one step)."""
    real_label: float = 0.9
    """One-sided label smoothing: the discriminator's target for real masks."""
    instance_noise: float = 0.2
    """Gaussian noise (std, in [-1, 1] units) added to every discriminator input, decaying
    linearly to 0 over the training. With a few dozen real masks the plain DCGAN recipe let the
    discriminator win within 50 steps and the generator never left noise (tried on 12 masks);
    with these two it drew glomerulus shapes after 300 steps."""
    device: str | None = None
    """cuda, cuda:1 or cpu (None: cuda if available); the DCGAN trains in fp32."""
    seed: int = 0


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
class CropSettings:
    size: int = 256
    test_fraction: float = 0.2
    seed: int = 0
    split: str = "train"
    """Which dataset split the glomeruli come from ("train", "val" or "all")."""


@dataclass(frozen=True)
class OutlineCropSettings:
    size: int = 256
    classes: str = "sclerosed"
    """"sclerosed", "normal" or "all"."""
    margin_px: int = 16
    """Gap kept between the outline's enclosing circle and the canvas border."""
    validation_fraction: float = PrepareSettings.validation_fraction
    seed: int = 0
    """Split seed (``prepare``'s) and the seed of the context windows."""
    tiles_mpp: float = PrepareSettings.tiles_mpp
    target_mpp: float = PrepareSettings.target_mpp
    """The tile set is read at this resolution (``prepare``'s analysis resolution)."""
    keep_px: int = 3
    """The crop is pasted along its outline dilated by this many pixels."""
    edge_sigma_px: float = CompositeSettings.edge_sigma_px
    clearance_px: int = CompositeSettings.clearance_px
    """Pasting as ``prepare``'s composites do: feathered edge, gap to the tile's glomeruli."""
    attempts: int = 200


@dataclass(frozen=True)
class MaskGenerationSettings:
    size: int = 256
    threshold: float = 0.5
    min_island_px: int = 64
    diameter_range: tuple[float, float] | None = None
    """Equivalent diameters (px) the masks are spread over; None: the real masks' range."""
    seed: int = 0
    max_tries_per_mask: int = 20


@dataclass(frozen=True)
class SynthesisSettings:
    amount: float = 1.0
    """Synthetic glomeruli per real sclerosed glomerulus of the training split (paper: 0.3, 0.6, 1.0)."""
    feather_px: float = 0.0
    """Blend width inside the mask's border (0: hard paste). Never outside the mask."""
    min_distance_px: int = 16
    """Gap kept to every labelled glomerulus (real or synthetic)."""
    seed: int = 0
    min_saturation: float = TissueSettings.min_saturation
    examples: int = 8
    """Placements shown in examples.png."""


@dataclass(frozen=True)
class VerifierSettings:
    """``train verifier``: the candidate verifier's samples (``train/verifier.py``) and training."""

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
