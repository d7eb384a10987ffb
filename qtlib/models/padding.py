"""Pad an image batch to a multiple of a size and crop it back.

Backbones that downsample ``k`` times need sides divisible by ``2**k``. They
pad internally with :func:`pad_to_multiple` and crop with :func:`crop_to`, so
they accept any input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtlib.util.checks import check_image


def check_image_batch(x: torch.Tensor, channels: int, name: str = "x") -> None:
    """Raise unless ``x`` is a float ``(B, channels, H, W)`` tensor (:func:`qtlib.util.checks.check_image`).

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: wrong shape or a non-float dtype.
    """
    check_image(x, name, channels=channels)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``x`` (B, C, H, W) at the bottom and right so H and W are multiples of ``multiple``.

    Reflect padding keeps image statistics at the border; it needs the pad to be
    smaller than the side, so tiny inputs (side <= pad) fall back to replicate.

    Args:
        x: batch of shape (B, C, H, W).
        multiple: the required divisor of both sides (>= 1).

    Returns:
        The padded batch, shape (B, C, H', W') with H' = ceil(H / multiple) * multiple.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left ``height x width`` window of ``x`` (B, C, H, W); undoes :func:`pad_to_multiple`."""
    return x[..., :height, :width]
