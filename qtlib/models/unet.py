"""U-Net (Ronneberger et al., MICCAI 2015) for image-to-image restoration.

Written from the paper: per level two 3x3 convolutions with ReLU, 2x2 max
pooling down, 2x2 transposed convolution up, skip connections by channel
concatenation, a 1x1 output convolution, channels doubling per level.
Differences, all usual for restoration: "same" padding instead of valid
convolutions (so the output has the input's size), and a global residual
(the network predicts ``output - input``) when input and output channels agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtlib.config.types import UNetConfig
from qtlib.models.restorer import Encoded, Restorer, Score
from qtlib.models.padding import check_image_batch, crop_to, pad_to_multiple


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.out_channels = out_channels


class UNet(Restorer):
    """U-Net with ``depth`` poolings and ``width`` channels at full resolution.

    Injection points (module names, for score conditioning): ``bottleneck``
    (``width * 2**depth`` channels), ``encoders.{i}`` and ``decoders.{i}``;
    :attr:`injection_channels` maps each name to its channel count.

    Args:
        cfg: the frozen :class:`~qtlib.config.types.UNetConfig`.

    Shape:
        - Input: (B, in_channels, H, W), any H and W (padded internally to a
          multiple of ``2**depth``, reflect, and cropped back).
        - Output: (B, out_channels, H, W).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.width < 1 or cfg.depth < 1:
            raise ValueError(f"cfg: width and depth must be >= 1, got width={cfg.width} depth={cfg.depth}")
        self.cfg = cfg
        chans = [cfg.width * 2**i for i in range(cfg.depth + 1)]
        self.encoders = nn.ModuleList(
            ConvBlock(cfg.in_channels if i == 0 else chans[i - 1], chans[i]) for i in range(cfg.depth)
        )
        self.bottleneck = ConvBlock(chans[-2], chans[-1])
        levels = list(reversed(range(cfg.depth)))  # decoders[0] is the deepest level
        self.ups = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in levels)
        self.decoders = nn.ModuleList(ConvBlock(2 * chans[i], chans[i]) for i in levels)
        self.head = nn.Conv2d(chans[0], cfg.out_channels, 1)
        self.residual = cfg.in_channels == cfg.out_channels
        self.size_multiple = 2**cfg.depth
        self.injection_channels: dict[str, int] = {"bottleneck": chans[-1]}
        self.injection_channels.update({f"encoders.{i}": chans[i] for i in range(cfg.depth)})
        self.injection_channels.update({f"decoders.{j}": chans[i] for j, i in enumerate(levels)})

    def forward(self, x: torch.Tensor, score: Score = None) -> torch.Tensor:
        """Restore ``x``; ``score`` is accepted and ignored (an unconditioned model, see :class:`Restorer`)."""
        return self.decode(self.encode(x))

    def encode(self, x: torch.Tensor) -> Encoded:
        """Padding, encoders and bottleneck (the part before any decoder-side injection)."""
        check_image_batch(x, self.cfg.in_channels)
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x, self.size_multiple)
        feat = inp
        skips = []
        for enc in self.encoders:
            feat = enc(feat)
            skips.append(feat)
            feat = F.max_pool2d(feat, 2)
        return Encoded(inp, tuple(skips), self.bottleneck(feat), (h, w))

    def decode(self, e: Encoded) -> torch.Tensor:
        """Decoders, head, residual and crop, from :meth:`encode`'s output."""
        feat = e.feat
        for up, dec, skip in zip(self.ups, self.decoders, reversed(e.skips), strict=True):
            feat = dec(torch.cat([up(feat), skip], dim=1))
        out = self.head(feat)
        if self.residual:
            out = out + e.inp
        return crop_to(out, *e.size)
