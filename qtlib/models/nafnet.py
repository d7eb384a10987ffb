"""NAFNet (Chen, Chu, Zhang, Sun: "Simple Baselines for Image Restoration", ECCV 2022).

Written from the paper. The baseline block is simplified until it has no
nonlinear activation function: LayerNorm -> 1x1 conv (expand 2x) -> 3x3
depthwise conv -> SimpleGate (split channels in two halves, multiply) ->
simplified channel attention (global average pool, 1x1 conv, multiply) -> 1x1
conv, added to the input with a learned per-channel scale; then a feed-forward
part LayerNorm -> 1x1 conv (expand 2x) -> SimpleGate -> 1x1 conv with its own
scale. The scales start at zero, so every block starts as the identity. The
network is a U-shaped encoder/decoder: 2x2 stride-2 convolutions down (channels
doubled), 1x1 conv + pixel shuffle up (channels halved), skips added, a global
residual. NAFNet-width32 is ``width=32, enc_blocks=(1, 1, 1, 28),
middle_blocks=1, dec_blocks=(1, 1, 1, 1)``.
"""

from __future__ import annotations

import torch
from torch import nn

from qtlib.config.types import NAFNetConfig
from qtlib.models.restorer import Encoded, Restorer, Score
from qtlib.models.padding import check_image_batch, crop_to, pad_to_multiple


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a (B, C, H, W) map, per pixel, with affine weights."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class SimpleGate(nn.Module):
    """Split the channels into two halves and multiply them (the paper's replacement for GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """The nonlinear-activation-free block; ``channels`` in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c2 = 2 * channels
        self.norm1 = LayerNorm2d(channels)
        self.expand = nn.Conv2d(channels, c2, 1)
        self.depthwise = nn.Conv2d(c2, c2, 3, padding=1, groups=c2)
        self.gate = SimpleGate()
        # Simplified channel attention: a channel-wise scale from the global mean, no activation.
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1))
        self.project = nn.Conv2d(channels, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.ffn_expand = nn.Conv2d(channels, c2, 1)
        self.ffn_project = nn.Conv2d(channels, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.depthwise(self.expand(self.norm1(x))))
        y = self.project(y * self.sca(y))
        x = x + y * self.beta
        y = self.ffn_project(self.gate(self.ffn_expand(self.norm2(x))))
        return x + y * self.gamma


def _stage(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(NAFBlock(channels) for _ in range(blocks)))


class NAFNet(Restorer):
    """NAFNet encoder/decoder.

    Injection points: ``bottleneck`` (the middle blocks, ``width * 2**len(enc_blocks)``
    channels), ``encoders.{i}`` and ``decoders.{i}``; :attr:`injection_channels`
    maps each name to its channel count.

    Args:
        cfg: the frozen :class:`~qtlib.config.types.NAFNetConfig`.

    Shape:
        - Input: (B, in_channels, H, W), any H and W (padded internally to a
          multiple of ``2**len(enc_blocks)``, reflect, and cropped back).
        - Output: (B, out_channels, H, W).
    """

    def __init__(self, cfg: NAFNetConfig) -> None:
        super().__init__()
        if len(cfg.enc_blocks) != len(cfg.dec_blocks):
            raise ValueError(
                f"cfg: enc_blocks and dec_blocks need the same number of stages, "
                f"got {len(cfg.enc_blocks)} and {len(cfg.dec_blocks)}"
            )
        if cfg.width < 1:
            raise ValueError(f"cfg: width must be >= 1, got {cfg.width}")
        self.cfg = cfg
        n = len(cfg.enc_blocks)
        chans = [cfg.width * 2**i for i in range(n + 1)]
        self.intro = nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1)
        self.encoders = nn.ModuleList(_stage(chans[i], b) for i, b in enumerate(cfg.enc_blocks))
        self.downs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 2, stride=2) for i in range(n))
        self.bottleneck = _stage(chans[-1], cfg.middle_blocks)
        levels = list(reversed(range(n)))  # decoders[0] is the deepest level
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i + 1], 2 * chans[i + 1], 1, bias=False), nn.PixelShuffle(2))
            for i in levels
        )
        self.decoders = nn.ModuleList(_stage(chans[i], b) for i, b in zip(levels, cfg.dec_blocks, strict=True))
        self.ending = nn.Conv2d(cfg.width, cfg.out_channels, 3, padding=1)
        self.residual = cfg.in_channels == cfg.out_channels
        self.size_multiple = 2**n
        self.injection_channels: dict[str, int] = {"bottleneck": chans[-1]}
        self.injection_channels.update({f"encoders.{i}": chans[i] for i in range(n)})
        self.injection_channels.update({f"decoders.{j}": chans[i] for j, i in enumerate(levels)})

    def forward(self, x: torch.Tensor, score: Score = None) -> torch.Tensor:
        """Restore ``x``; ``score`` is accepted and ignored (an unconditioned model, see :class:`Restorer`)."""
        return self.decode(self.encode(x))

    def encode(self, x: torch.Tensor) -> Encoded:
        """Padding, intro, encoders and middle blocks (the part before any decoder-side injection)."""
        check_image_batch(x, self.cfg.in_channels)
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x, self.size_multiple)
        feat = self.intro(inp)
        skips = []
        for enc, down in zip(self.encoders, self.downs, strict=True):
            feat = enc(feat)
            skips.append(feat)
            feat = down(feat)
        return Encoded(inp, tuple(skips), self.bottleneck(feat), (h, w))

    def decode(self, e: Encoded) -> torch.Tensor:
        """Decoders, ending convolution, residual and crop, from :meth:`encode`'s output."""
        feat = e.feat
        for up, dec, skip in zip(self.ups, self.decoders, reversed(e.skips), strict=True):
            feat = dec(up(feat) + skip)
        out = self.ending(feat)
        if self.residual:
            out = out + e.inp
        return crop_to(out, *e.size)
