"""The inpainting networks of the method (issue #5, step 2): an AOT-GAN-style generator with a
SAGAN self-attention block and encoder->decoder skips, and the patch discriminator used twice
(global on the image, local on the glomerulus with the background filled white).

Plain modules, no I/O. Images are in [-1, 1] (white is +1); masks are {0, 1} with 1 = the
glomerulus to regenerate.
"""

from __future__ import annotations

import torch
from torch import nn

from .settings import GENERATOR_UPSAMPLING

AOT_RATES = (1, 2, 4, 8)


def generator_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """X_input = concat(X_ori * (1 - X_mask), X_mask): (N, 3, H, W) in [-1, 1] and (N, 1, H, W)
    {0, 1} -> (N, 4, H, W). The hole is 0, i.e. mid-grey in [-1, 1] space."""
    return torch.cat([image * (1 - mask), mask], dim=1)


def local_view(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R = X * mask + (1 - mask): the glomerulus on a white background. White is +1 in the
    [-1, 1] space used throughout (and also in [0, 1]), so the formula holds literally."""
    return image * mask + (1 - mask)


def gate_normalisation(x: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """AOT-GAN's per-channel normalisation of the gate pre-activation over the spatial dims
    (``my_layer_norm`` in the AOT-GAN code): 5 * (2 * (x - mean) / (std + eps) - 1), std with
    Bessel's correction; computed in fp32 (also under AMP)."""
    x = x.float()
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True) + eps
    return 5 * (2 * (x - mean) / std - 1)


class AOTBlock(nn.Module):
    """Aggregated contextual transformation: the input goes through ``len(rates)`` branches (a
    3x3 conv with dilation r, reflection padded, ReLU, ``channels / len(rates)`` outputs each),
    concatenated and fused by a 3x3 conv; a gate g = sigmoid(norm(conv3x3(x))) mixes
    out = x * (1 - g) + fused * g."""

    def __init__(self, channels: int, rates: tuple[int, ...] = AOT_RATES):
        super().__init__()
        if channels % len(rates):
            raise ValueError(f"AOT block channels ({channels}) must divide into {len(rates)} branches")
        branch = channels // len(rates)
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.ReflectionPad2d(r), nn.Conv2d(channels, branch, 3, dilation=r), nn.ReLU(inplace=True))
            for r in rates)
        self.fuse = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(branch * len(rates), channels, 3))
        self.gate = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(gate_normalisation(self.gate(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([b(x) for b in self.branches], dim=1))
        g = self.gate_values(x)
        return x * (1 - g) + fused * g


class SelfAttention(nn.Module):
    """SAGAN self-attention: query/key 1x1 convs to C/8 channels, value 1x1 conv to C,
    softmax over positions, out = gamma * attention + x with gamma a learned scalar
    initialised to 0 (the block starts as the identity)."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # N, HW, C'
        k = self.key(x).flatten(2)  # N, C', HW
        attention = torch.softmax(torch.bmm(q, k), dim=-1)  # N, HW(query), HW(key)
        v = self.value(x).flatten(2)  # N, C, HW
        out = torch.bmm(v, attention.transpose(1, 2)).view(n, c, h, w)
        return self.gamma * out + x


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True))


def _upsample_bn(cin: int, cout: int, upsampling: str) -> nn.Sequential:
    if upsampling == "transposed":
        up = [nn.ConvTranspose2d(cin, cout, 4, 2, 1)]
    elif upsampling == "resize":
        up = [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cout, 3, 1, 1)]
    else:
        raise ValueError(f"upsampling must be one of {GENERATOR_UPSAMPLING}, got {upsampling!r}")
    return nn.Sequential(*up, nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class InpaintGenerator(nn.Module):
    """(N, 4, H, W) [X_gap in [-1, 1] ++ mask] -> (N, 3, H, W) in [-1, 1]; H, W multiples of 4,
    at least 4 * (max rate + 1) = 36 (reflection padding); 256 in the paper.

    c = base_channels:
      enc1  7x7 conv 4 -> c, BN, LeakyReLU(0.2)                    H
      enc2  4x4 stride-2 conv c -> 2c, BN, LeakyReLU               H/2
      enc3  4x4 stride-2 conv 2c -> 4c, BN, LeakyReLU              H/4
      n_aot_blocks AOT blocks on 4c (rates 1, 2, 4, 8)
      SAGAN self-attention on 4c (64 x 64 at H = 256)
      dec3  x2 upsampling [4c ++ enc3] -> 2c, BN, LeakyReLU                     H/2
      dec2  x2 upsampling [2c ++ enc2] -> c, BN, LeakyReLU                      H
      out   7x7 conv [c ++ enc1] -> 3, tanh
    Skips are channel concatenations of the encoder features of the same resolution. The x2
    upsampling is ``upsampling`` (:data:`~glomscan.augment.settings.GENERATOR_UPSAMPLING`): bilinear + 3x3 conv, or a 4x4 stride-2
    transposed conv.
    """

    def __init__(self, base_channels: int = 64, n_aot_blocks: int = 8, rates: tuple[int, ...] = AOT_RATES,
                 upsampling: str = "resize"):
        super().__init__()
        c = base_channels
        self.base_channels, self.n_aot_blocks, self.upsampling = base_channels, n_aot_blocks, upsampling
        self.max_rate = max(rates)
        self.enc1 = _conv_bn(4, c, 7, 1, 3)
        self.enc2 = _conv_bn(c, 2 * c, 4, 2, 1)
        self.enc3 = _conv_bn(2 * c, 4 * c, 4, 2, 1)
        self.middle = nn.Sequential(*[AOTBlock(4 * c, rates) for _ in range(n_aot_blocks)])
        self.attention = SelfAttention(4 * c)
        self.dec3 = _upsample_bn(8 * c, 2 * c, upsampling)
        self.dec2 = _upsample_bn(4 * c, c, upsampling)
        self.out = nn.Conv2d(2 * c, 3, 7, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 4 or x.shape[2] % 4 or x.shape[3] % 4 or min(x.shape[2:]) // 4 <= self.max_rate:
            raise ValueError(f"generator input must be (N, 4, H, W) with H, W multiples of 4 and H/4, W/4 > "
                             f"{self.max_rate}, got {tuple(x.shape)}")
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        m = self.attention(self.middle(e3))
        d3 = self.dec3(torch.cat([m, e3], dim=1))
        d2 = self.dec2(torch.cat([d3, e2], dim=1))
        return torch.tanh(self.out(torch.cat([d2, e1], dim=1)))


class PatchDiscriminator(nn.Module):
    """(N, 3, H, W) in [-1, 1] -> (N, 1, H/32, W/32) real/fake scores (no sigmoid: LSGAN).

    Five 4x4 stride-2 convs, channels c, 2c, 4c, 8c, 1 (c = 64: 64-128-256-512-1), each but
    the last followed by LeakyReLU(0.2); BatchNorm after the 2nd-4th (not after the first, as in
    DCGAN/pix2pix: normalising the raw-image layer hurts GAN training). 256 -> 8 x 8 patches.
    """

    def __init__(self, base_channels: int = 64):
        super().__init__()
        c = base_channels
        self.layers = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            _conv_bn(c, 2 * c, 4, 2, 1),
            _conv_bn(2 * c, 4 * c, 4, 2, 1),
            _conv_bn(4 * c, 8 * c, 4, 2, 1),
            nn.Conv2d(8 * c, 1, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] < 32 or x.shape[3] < 32:
            raise ValueError(f"discriminator input must be at least 32 x 32, got {tuple(x.shape)}")
        return self.layers(x)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["AOTBlock", "InpaintGenerator", "PatchDiscriminator", "SelfAttention", "count_parameters",
           "gate_normalisation", "generator_input", "local_view"]
