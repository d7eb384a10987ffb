"""The one interface of every built model: ``model(x, score=None)``.

Backbones and their score-conditioned wrapper share it, so stages never ask
which kind of model they hold: an unconditioned model accepts the score and
ignores it, a conditioned one reads it (None = its top score). What differs is
stated as attributes, not discovered with ``isinstance``.
"""

from __future__ import annotations

import torch
from torch import nn

Score = torch.Tensor | float | int | None


class Restorer(nn.Module):
    """Base class of the backbones and of :class:`~qtlib.models.ScoreConditioned`.

    Attributes:
        conditioned: the output depends on the score.
        top_score: the merged top condition level (None when unconditioned).
    """

    conditioned: bool = False
    top_score: float | None = None

    def forward(self, x: torch.Tensor, score: Score = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def injection_parameters(self) -> list[nn.Parameter]:
        """The score-injection weights (L_reg of eq. 8); none for an unconditioned model."""
        return []

    def unconditioned(self) -> nn.Module:
        """The bare backbone: what supervised pretraining updates (the injection starts at zero)."""
        return self
