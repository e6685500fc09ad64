"""Losses of the inpainting model (method.md, "Inpainting augmentation" step 5; eq. 3-12 of the
paper).

With X_ori the real crop, X_rec the generator output, M the mask and R = X * M + (1 - M) (the
glomerulus on white, :func:`local_view`), all in [-1, 1]:

- least-squares GAN, for D_g (global, on X) and D_l (local, on R):
  discriminator  L_D = E[(1 - D(X_ori))^2] + E[D(X_rec)^2]   (method.md's L_adv_g / L_adv_l)
  generator      L_adv = E[(1 - D(X_rec))^2]                 (the generator's side of that game;
                 this is the adversarial term in L_total)
- L1_g = mean |X_ori - X_rec|, L1_l = mean |R_ori - R_rec|
- L_per = mean over VGG19 layers relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 of the mean L1
  between the activations of X_rec and X_ori
- L_sty = mean over the same layers of the mean L1 between Gram matrices
  (G = F F^T / (C H W), F the C x HW activations)
- L_total = 0.02 (L_adv_g + L_adv_l) + 1 L1_g + lambda_1l L1_l + 0.1 L_per + 150 L_sty.

Not in the paper, off by default (weight 0): L_ssim = 1 - the mean SSIM inside the mask
(:func:`masked_ssim`, the definition ``evaluate inpaint`` scores with), added as
``lambda_ssim L_ssim``. It rewards fills whose local structure follows the original's and
penalises texture that does not (see docs/augmentation.md).

VGG19 inputs are mapped from [-1, 1] to [0, 1] and normalised with the ImageNet mean/std.
VGG19 weights only come from a local file; without them the perceptual and style terms are
disabled (reported as NaN and in :attr:`GeneratorLoss.vgg_status`), never faked.

The feature network is a choice (issue #15): the paper's ImageNet VGG19 (:func:`load_vgg19_features`,
from a local file), or the encoder of a glomscan segmentation model trained on PAS kidney tissue
(:func:`load_segmentation_features`: its five downsampling stages, at 1/2 ... 1/32 of the input,
stand in for relu1_1 ... relu5_1; inputs normalised with the model card's mean/std). The loss
formulas are the same for both; what the features respond to is not (see docs/augmentation.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import IMAGENET_MEAN, IMAGENET_STD
from .inpaint_models import local_view

log = logging.getLogger(__name__)

VGG_LAYERS = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29}
"""Indices of the ReLUs in ``torchvision.models.vgg19().features``."""


@dataclass(frozen=True)
class InpaintLossWeights:
    adversarial: float = 0.02
    """On L_adv_g + L_adv_l."""
    l1_global: float = 1.0
    l1_local: float = 1.0
    """lambda_1l: not given in the paper."""
    perceptual: float = 0.1
    style: float = 150.0
    ssim: float = 0.0
    """lambda_ssim on 1 - SSIM inside the mask; 0 (the paper) leaves the term out."""


def lsgan_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """E[(1 - D(real))^2] + E[D(fake)^2]."""
    return ((1 - real_scores.float()) ** 2).mean() + (fake_scores.float() ** 2).mean()


def lsgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """E[(1 - D(fake))^2]."""
    return ((1 - fake_scores.float()) ** 2).mean()


def masked_ssim(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM inside ``mask`` between (N, C, H, W) images ``x`` and ``y`` (differentiable):
    ``skimage.metrics.structural_similarity``'s map (``window`` x ``window`` uniform window,
    sample covariances, K1 = 0.01, K2 = 0.03, valid region only, i.e. (window - 1) / 2 px cut
    from each border) averaged over the mask's pixels and the channels. Images in [-1, 1] are
    mapped to [0, 1] (data range 1) first: SSIM's luminance term is not shift-invariant, and
    this is the scale of the uint8 images the evaluation scores. Computed in fp32."""
    with torch.autocast(x.device.type, enabled=False):
        x, y, m = (x.float() + 1) / 2, (y.float() + 1) / 2, mask.float()
        pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731
        n = window * window
        cov_norm = n / (n - 1)
        ux, uy = pool(x), pool(y)
        vx = cov_norm * (pool(x * x) - ux * ux)
        vy = cov_norm * (pool(y * y) - uy * uy)
        vxy = cov_norm * (pool(x * y) - ux * uy)
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        r = (window - 1) // 2
        inner = m[:, :, r:m.shape[2] - r, r:m.shape[3] - r]
        weight = inner.expand_as(s)
        return (s * weight).sum() / weight.sum().clamp_min(1.0)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, C) = F F^T / (C H W)."""
    n, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):  # fp16 would overflow the HW-long sums
        f = features.float().reshape(n, c, h * w)
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


class VGGFeatures(nn.Module):
    """Frozen VGG19 activations at :data:`VGG_LAYERS` of images in [-1, 1].

    ``features`` is a ``torchvision.models.vgg19().features`` module (or any Sequential with
    the same layout), already holding its weights; it is cut after relu5_1."""

    def __init__(self, features: nn.Sequential, layers: dict[str, int] = VGG_LAYERS):
        super().__init__()
        last = max(layers.values())
        self.features = nn.Sequential(*list(features.children())[:last + 1]).eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.layers = dict(layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> "VGGFeatures":
        super().train(mode)
        self.features.eval()  # a fixed feature extractor
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x.float() + 1) / 2 - self.mean) / self.std
        wanted = set(self.layers.values())
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out.append(x)
        return out


def load_vgg19_features(path: Path) -> VGGFeatures:
    """VGG19 features from a local state dict: torchvision's ``vgg19`` layout (``features.0.weight``
    ...; classifier keys are ignored) or only the features part (with or without the
    ``features.`` prefix). Raises ValueError when the file does not fit."""
    from torchvision.models.vgg import cfgs, make_layers

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read VGG19 weights ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    features = make_layers(cfgs["E"])  # = torchvision vgg19().features, without the 500 MB classifier
    try:
        features.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not torchvision VGG19 weights ({str(exc).splitlines()[0]})") from exc
    return VGGFeatures(features)


class SegmentationEncoderFeatures(nn.Module):
    """Frozen activations of a segmentation encoder (smp: ``encoder(x)`` returns the input and
    one feature map per stage) at stages 1..depth, for images in [-1, 1]; normalised with
    ``mean``/``std`` on [0, 1] like the segmentation model's input."""

    def __init__(self, encoder: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD, description: str = "segmentation encoder"):
        super().__init__()
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.description = description
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> "SegmentationEncoderFeatures":
        super().train(mode)
        self.encoder.eval()  # fixed BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x.float() + 1) / 2 - self.mean) / self.std
        return list(self.encoder(x))[1:]


def load_segmentation_features(path: Path) -> SegmentationEncoderFeatures:
    """The encoder of a glomscan segmentation model file (ONNX model file or checkpoint, as
    ``glomscan.model.load_model`` reads it) as a frozen feature network."""
    from ..model import load_model

    path = Path(path)
    try:
        model = load_model(path)
        module = model.torch_module()
    except Exception as exc:
        raise ValueError(f"{path}: not a glomscan segmentation model ({exc})") from exc
    encoder = getattr(module, "encoder", None)
    if encoder is None:
        raise ValueError(f"{path}: the network has no encoder")
    card = model.card
    return SegmentationEncoderFeatures(encoder.float(), card.mean, card.std,
                                       f"{card.encoder} encoder of {card.name} ({path.name})")


def feature_status(features: nn.Module | None) -> str:
    """What the perceptual and style terms use (the CSV's ``vgg`` column)."""
    if features is None:
        return VGG_DISABLED
    if isinstance(features, SegmentationEncoderFeatures):
        return f"enabled: {features.description}"
    return "enabled"


VGG_DISABLED = ("disabled: no feature network given (--vgg-weights or --feature-model); perceptual and style "
                "losses are off")


class GeneratorLoss(nn.Module):
    """The generator's total loss; ``forward`` returns every term (tensors) and ``total``.
    ``vgg=None`` disables the perceptual and style terms (they come back as NaN and are not in
    the total)."""

    def __init__(self, weights: InpaintLossWeights = InpaintLossWeights(), vgg: VGGFeatures | None = None):
        super().__init__()
        self.weights, self.vgg = weights, vgg
        if vgg is None:
            log.warning("!!! VGG19 perceptual/style losses %s !!!", VGG_DISABLED)

    @property
    def vgg_status(self) -> str:
        return feature_status(self.vgg)

    def perceptual_and_style(self, rec: torch.Tensor, ori: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_rec, f_ori = self.vgg(rec), self.vgg(ori)
        per = torch.stack([F.l1_loss(a.float(), b.float()) for a, b in zip(f_rec, f_ori)]).mean()
        sty = torch.stack([F.l1_loss(gram_matrix(a), gram_matrix(b)) for a, b in zip(f_rec, f_ori)]).mean()
        return per, sty

    def forward(self, rec: torch.Tensor, ori: torch.Tensor, mask: torch.Tensor,
                global_fake_scores: torch.Tensor, local_fake_scores: torch.Tensor) -> dict[str, torch.Tensor]:
        w = self.weights
        rec, ori = rec.float(), ori.float()
        terms = {"adv_global": lsgan_generator_loss(global_fake_scores),
                 "adv_local": lsgan_generator_loss(local_fake_scores),
                 "l1_global": F.l1_loss(rec, ori),
                 "l1_local": F.l1_loss(local_view(rec, mask), local_view(ori, mask))}
        total = (w.adversarial * (terms["adv_global"] + terms["adv_local"]) + w.l1_global * terms["l1_global"]
                 + w.l1_local * terms["l1_local"])
        if self.vgg is not None:
            terms["perceptual"], terms["style"] = self.perceptual_and_style(rec, ori)
            total = total + w.perceptual * terms["perceptual"] + w.style * terms["style"]
        else:
            nan = torch.tensor(float("nan"), device=rec.device)
            terms["perceptual"], terms["style"] = nan, nan
        with torch.set_grad_enabled(bool(w.ssim) and torch.is_grad_enabled()):  # only logged at weight 0
            terms["ssim"] = 1 - masked_ssim(rec, ori, mask)
        if w.ssim:
            total = total + w.ssim * terms["ssim"]
        terms["total"] = total
        return terms
