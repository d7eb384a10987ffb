"""The differentiable ensemble score used by the training losses.

Same scale and normalization as :class:`qtlib.iqa.Ensemble` (0..10), built from
the members whose gradients flow (``CATALOG[m].differentiable``), with their
weights renormalized. pyiqa's ``as_loss=True`` returns the raw score, so the
direction of lower-better metrics is flipped here by :func:`normalize`.

The metrics are fixed functions: parameters frozen, always in eval mode (a
parent's ``.train()`` does not reach them), and gradients flow only to the input.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from qtlib.config.types import IQAConfig
from qtlib.iqa.catalog import CATALOG, get_info, normalize
from qtlib.iqa.ensemble import (
    EnsembleScores,
    combine,
    ensemble_members,
    per_image,
    renormalized,
    unscorable,
)
from qtlib.iqa.factory import create_metric
from qtlib.util.checks import check_shape

_log = logging.getLogger(__name__)
_logged_exclusions: set[tuple[str, ...]] = set()


class NoDifferentiableMemberError(ValueError):
    """No member of the ensemble passes gradients, so there is no reward to train with."""


def member_grads(cfg: IQAConfig) -> dict[str, bool]:
    """Whether each member passes gradients: its ``grad``, or when None (auto) false for a hand-crafted member
    of an ensemble that holds a learned one (catalog source ``qtlib``), true otherwise."""
    learned = any(get_info(m.metric).source == "qtlib" for m in cfg.ensemble)
    return {m.metric: m.grad if m.grad is not None else not (learned and get_info(m.metric).source != "qtlib")
            for m in cfg.ensemble}


class Reward(nn.Module):
    """Differentiable ensemble score ``S(images)`` on the 0..10 scale.

    Args:
        cfg: ``iqa`` section of the config; non-differentiable members are dropped
            (logged once per process and member set).
        device: where the metrics run.

    Shape:
        - Input: ``(B, 3, H, W)``, nominally in [0, 1] (not clamped: values a
          little outside still get gradients where the metric defines them).
        - Output: ``(B,)``.

    Raises:
        NoDifferentiableMemberError: no member is differentiable.
        MissingWeightsError: a member's weights are not in pyiqa's cache.
    """

    def __init__(self, cfg: IQAConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        weights = ensemble_members(cfg)
        grad = member_grads(cfg)
        # A member with grad: false is scored as a constant, so it needs no gradient of its own.
        kept = {m: w for m, w in weights.items() if get_info(m).differentiable or not grad[m]}
        excluded = tuple(m for m in weights if m not in kept)
        if not any(grad[m] for m in kept):
            usable = ", ".join(n for n, i in CATALOG.items() if i.differentiable and not i.needs_reference)
            raise NoDifferentiableMemberError(
                f"iqa.ensemble: no member is differentiable ({', '.join(weights)}); a reward needs one of: {usable}"
            )
        if excluded and excluded not in _logged_exclusions:
            _logged_exclusions.add(excluded)
            _log.warning(
                "reward: leaving out non-differentiable %s (%s); weights renormalized over %s",
                ", ".join(excluded), "; ".join(get_info(m).gradient_note for m in excluded), ", ".join(kept),
            )
        kept = renormalized(kept)
        self.members: tuple[str, ...] = tuple(kept)
        self.weights: tuple[float, ...] = tuple(kept.values())
        self.excluded: tuple[str, ...] = excluded
        self.constant: frozenset[str] = frozenset(m for m in self.members if not grad[m])
        self.metrics = nn.ModuleDict(
            {m: create_metric(m, device, as_loss=True, allow_download=cfg.allow_download, fast=cfg.fast_paths,
                              learned=cfg.learned) for m in self.members}
        )
        for p in self.metrics.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Reward:
        """Set this module's flag; the metrics stay in eval mode (dropout/BN of a judge must not change)."""
        super().train(mode)
        self.metrics.eval()
        return self

    def scores(self, images: Tensor) -> EnsembleScores:
        """Raw, normalized and ensemble scores, all differentiable w.r.t. ``images``."""
        # Shape only: restorations being trained may overshoot [0, 1] and must still get a gradient.
        check_shape(images, ["B", 3, "H", "W"], "images")
        n = images.shape[0]
        raw = {m: self._raw(m, metric, images, n) for m, metric in self.metrics.items()}
        normalized = {m: normalize(m, v) for m, v in raw.items()}
        return EnsembleScores(raw, normalized, combine(normalized, dict(zip(self.members, self.weights))))

    def _raw(self, name: str, metric: nn.Module, images: Tensor, n: int) -> Tensor:
        # A flat (or non-finite) crop, e.g. a blown-out sky, has no score: pyiqa asserts on it.
        # Those rows get the batch's mean score, detached, so they add no gradient and no traceback.
        ok = torch.nonzero(~unscorable(images.detach())).flatten()
        if len(ok) == n:
            return self._call(name, metric, images, n)
        if len(ok) == 0:
            return images.new_zeros(n)
        scored = self._call(name, metric, images[ok], len(ok))
        return scored.detach().mean().expand(n).index_copy(0, ok, scored)

    def _call(self, name: str, metric: nn.Module, images: Tensor, n: int) -> Tensor:
        if name in self.constant:
            with torch.no_grad():
                return per_image(metric(images.detach()), n, name)
        return per_image(metric(images), n, name)

    def forward(self, images: Tensor) -> Tensor:
        """``S(images)``, shape ``(B,)``, on the 0..10 scale."""
        return self.scores(images).S
