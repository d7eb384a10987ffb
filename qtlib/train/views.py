"""The strong view of the student's input (``train.strong_view``): blur, noise and JPEG.

The teacher labels the plain image; the student is trained on a harder view of it
against the same target (the noisy-student recipe; the authors' code gives the
student a RandAugment view). Only ops for which the target stays the right answer
are used: a blurrier, noisier or JPEG-compressed input still has the clean image as
its restoration. Colour, brightness or contrast jitter would not (the target keeps
its colours, and on the proxy such a view taught colour errors), and geometric ops
would have to move the target too; neither is offered.

As everywhere in training, the random parameters are drawn once from a seeded
generator (:func:`draw_view`), recorded in a :class:`ViewDraw`, and applied
deterministically (:func:`apply_view`), so a resumed or data-parallel run sees the
same views. The ops are :mod:`qtlib.data.degradations`' (kornia's Gaussian blur and
noise with explicit parameters; JPEG through Pillow, milliseconds where kornia's
differentiable ``RandomJPEG`` takes ~0.4 s per image on a CPU and no gradient is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qtlib.config.types import StrongView
from qtlib.data.degradations import add_noise, blur, jpeg


@dataclass(frozen=True)
class ViewDraw:
    """The drawn parameters of one batch's views, one entry per sample (0 = that op off).

    Attributes:
        blur_sigma: Gaussian blur sigma in px; noise_std: noise std on [0, 1] images;
        jpeg_quality: JPEG quality (int); noise_seed: the seed of each sample's noise.
    """

    blur_sigma: np.ndarray
    noise_std: np.ndarray
    jpeg_quality: np.ndarray
    noise_seed: np.ndarray

    def __len__(self) -> int:
        return len(self.blur_sigma)


def draw_view(cfg: StrongView, n: int, rng: np.random.Generator) -> ViewDraw:
    """Draw ``n`` samples' views: each op on with probability ``cfg.p``, its strength uniform in its range."""
    def strength(lo_hi: tuple[float, float]) -> np.ndarray:
        on = rng.random(n) < cfg.p
        return np.where(on, rng.uniform(lo_hi[0], lo_hi[1], n), 0.0)

    sigma, std = strength(cfg.blur_sigma), strength(cfg.noise_std)
    quality = np.rint(strength(cfg.jpeg_quality)).astype(np.int64)
    return ViewDraw(sigma, std, quality, rng.integers(0, 2**31 - 1, n))


def apply_view(x: torch.Tensor, draw: ViewDraw, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with each sample's view applied: blur, then noise, then JPEG, then clamped to [0, 1].

    Args:
        x: ``(B, 3, H, W)`` in [0, 1] (on the CPU: the loop applies views before moving the batch).
        draw: ``B`` samples' parameters.
        mask: ``(B,)`` bool, the samples to change (None = all); the others are returned as they were.

    Returns:
        A new tensor; ``x`` is not modified.
    """
    if x.ndim != 4 or x.shape[0] != len(draw):
        raise ValueError(f"x: expected ({len(draw)}, C, H, W), got {tuple(x.shape)}")
    out = []
    for i, img in enumerate(x):
        if mask is not None and not bool(mask[i]):
            out.append(img)
            continue
        v = blur(img[None], float(draw.blur_sigma[i]))
        v = add_noise(v, float(draw.noise_std[i]), torch.Generator().manual_seed(int(draw.noise_seed[i])))
        q = int(draw.jpeg_quality[i])
        out.append(jpeg(v.clamp(0, 1), q if q > 0 else None).clamp(0, 1)[0])
    return torch.stack(out)
