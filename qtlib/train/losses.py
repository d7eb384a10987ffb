"""The terms of the QualiTeacher objective, eq. (11), as pure functions.

``L = L_rec + L_per + L_pref + L_cropped`` with

* ``L_rec``: L1 between the student's output and the pseudo-label, weighted
  per pixel by the PL's block-score map upsampled to full resolution
  (:func:`block_weight_map`, :func:`weighted_l1`; sec. 3.3);
* ``L_per``: a perceptual distance (:mod:`qtlib.train.perceptual`);
* ``L_pref``, eq. (8): :func:`preference_terms` (L1 and L2) and
  :func:`injection_reg` (L_reg);
* ``L_cropped``, eq. (9): :func:`cropped_consistency` on rewards of
  :func:`crop_batch` crops.

Every per-sample term is averaged over the batch (so data-parallel ranks with
equal batches average to the full-batch loss); L_reg is a parameter norm and
does not depend on the batch. Weights and start steps are applied by the loop,
not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _check_image(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(x.shape)}")


def block_weight_map(blocks_s: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The per-pixel weight map W of sec. 3.3 from block scores, normalized to mean 1 per image.

    Each block's weight is its score divided by the mean block score of the
    same image, so the average weight over the image is 1: the map moves the
    loss between regions of one PL and leaves its total scale alone (the PL's
    overall quality is the job of the score condition, not of the weights).
    A map with a non-finite entry, or whose mean is not positive, becomes
    uniform (all ones).

    Args:
        blocks_s: block scores, (B, gh, gw), on any non-negative scale.
        size: (H, W) of the full image; each block covers an equal share
            (nearest-neighbour upsampling; H, W need not be multiples of gh, gw).

    Returns:
        (B, 1, H, W) float32 weights.
    """
    if blocks_s.ndim != 3:
        raise ValueError(f"blocks_s: expected shape (B, gh, gw), got {tuple(blocks_s.shape)}")
    b = blocks_s.float()
    mean = b.mean(dim=(1, 2), keepdim=True)
    ok = torch.isfinite(b).all(dim=2, keepdim=True).all(dim=1, keepdim=True) & (mean > 0)
    w = torch.where(ok, b / mean.where(ok, torch.ones_like(mean)), torch.ones_like(b))
    return F.interpolate(w[:, None], size=size, mode="nearest")


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``weight * |pred - target|`` over batch, channels and pixels (plain L1 when weight is None).

    Args:
        pred, target: (B, C, H, W).
        weight: (B, 1, H, W) per-pixel weights, broadcast over channels, or None.

    Returns:
        A scalar tensor.
    """
    _check_image(pred, "pred")
    if pred.shape != target.shape:
        raise ValueError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    err = (pred - target).abs()
    if weight is None:
        return err.mean()
    if weight.shape != (pred.shape[0], 1, *pred.shape[2:]):
        raise ValueError(f"weight: expected shape {(pred.shape[0], 1, *pred.shape[2:])}, got {tuple(weight.shape)}")
    return (err * weight.to(err.dtype)).mean()


@dataclass(frozen=True)
class PreferenceTerms:
    """The two preference terms of eq. (8), each a batch mean."""

    first: torch.Tensor
    """L1 = -log sigmoid(beta (R(y_h) - R(y_l) - delta)): the high-score output beats the low-score one."""
    second: torch.Tensor
    """L2 = -log sigmoid(beta (R(y_h) - S_tea(I_low))): it also beats the teacher's poorest PL."""


def preference_terms(
    r_high: torch.Tensor, r_low: torch.Tensor, s_poor: torch.Tensor, beta: float, delta: float
) -> PreferenceTerms:
    """L1 and L2 of eq. (8) from rewards on the 0..10 scale.

    Args:
        r_high: (B,) reward of y_h, the student at the top score.
        r_low: (B,) reward of y_l, the student at a low score.
        s_poor: (B,) reward of each image's reference pseudo-label (its poorest, or its best with
            ``l2_target: best``), scored as y_h is (a constant).
        beta: temperature; delta: margin.

    Returns:
        :class:`PreferenceTerms`.
    """
    for name, t in (("r_high", r_high), ("r_low", r_low), ("s_poor", s_poor)):
        if t.ndim != 1 or t.shape != r_high.shape:
            raise ValueError(f"{name}: expected shape {tuple(r_high.shape)} (one value per sample), got {tuple(t.shape)}")
    first = -F.logsigmoid(beta * (r_high - r_low - delta)).mean()
    second = -F.logsigmoid(beta * (r_high - s_poor.detach().to(r_high.dtype))).mean()
    return PreferenceTerms(first, second)


def injection_reg(params: Sequence[nn.Parameter], init: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_reg of eq. (8): 1/2 sum_n ||W_n - W_n^init||_F^2 over the injection parameters.

    Args:
        params: the score-injection parameters (``model.injection_parameters()``).
        init: their values at the start of the round, same order and shapes.

    Returns:
        A scalar tensor (zero when params equal init, or when there are none).
    """
    if len(params) != len(init):
        raise ValueError(f"init: expected {len(params)} tensors (one per injection parameter), got {len(init)}")
    total = torch.zeros((), device=params[0].device if params else None)
    for i, (p, p0) in enumerate(zip(params, init, strict=True)):
        if p.shape != p0.shape:
            raise ValueError(f"init[{i}]: expected shape {tuple(p.shape)}, got {tuple(p0.shape)}")
        total = total + (p - p0.to(p.device, p.dtype)).pow(2).sum()
    return 0.5 * total


def cropped_consistency(r_crop_of_output: torch.Tensor, r_output_of_crop: torch.Tensor) -> torch.Tensor:
    """Eq. (9): mean |S(crop(f(x))) - S(f(crop(x)))| over the batch.

    Args:
        r_crop_of_output: (B,) reward of the crop of the restored image (S_1).
        r_output_of_crop: (B,) reward of the restored crop (S_2).
    """
    if r_crop_of_output.ndim != 1 or r_crop_of_output.shape != r_output_of_crop.shape:
        raise ValueError(
            f"r_output_of_crop: expected shape {tuple(r_crop_of_output.shape)} (one value per sample), "
            f"got {tuple(r_output_of_crop.shape)}"
        )
    return (r_crop_of_output - r_output_of_crop).abs().mean()


def crop_batch(x: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """Cut a ``size`` x ``size`` window from each image at its own (top, left) offset.

    Args:
        x: (B, C, H, W).
        offsets: (B, 2) integer (top, left), with top + size <= H and left + size <= W.
        size: side of the window.

    Returns:
        (B, C, size, size); differentiable with respect to x.
    """
    _check_image(x, "x")
    if offsets.shape != (x.shape[0], 2):
        raise ValueError(f"offsets: expected shape ({x.shape[0]}, 2), got {tuple(offsets.shape)}")
    h, w = x.shape[-2:]
    off = offsets.tolist()
    if any(t < 0 or t + size > h or left < 0 or left + size > w for t, left in off):
        raise ValueError(f"offsets: a {size} px window does not fit a {h}x{w} image at {off}")
    return torch.stack([x[i, :, t:t + size, left:left + size] for i, (t, left) in enumerate(off)])
