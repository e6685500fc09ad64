"""The settings of the paper's inpainting augmentation: glomerulus crops (``augment crops``),
the inpainting GAN (``train inpaint``), the mask DCGAN (``train masks``, ``augment masks``) and
synthesis (``augment synthesize``), in one light module (no torch, no image libraries) so the
command line takes its defaults from them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TissueSettings
from ..train.settings import CompositeSettings, PrepareSettings


GENERATOR_UPSAMPLING = ("resize", "transposed")
"""How the inpainting generator's decoder doubles the resolution: "resize" (bilinear x2, then a
3 x 3 convolution, as AOT-GAN's own decoder) or "transposed" (4 x 4 stride-2 transposed
convolution, the generators trained before; prone to checkerboard patterns)."""


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
