"""The one interface of every built model: ``model(x, score=None)``.

Backbones and their score-conditioned wrapper share it, so stages never ask
which kind of model they hold: an unconditioned model accepts the score and
ignores it, a conditioned one reads it (None = its top score). What differs is
stated as attributes, not discovered with ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

Score = torch.Tensor | float | int | None


@dataclass(frozen=True)
class Encoded:
    """A backbone's score-independent part of a forward: everything up to and including the bottleneck.

    Shape: every tensor has the batch first; ``size`` is the input's (H, W) before padding.
    """

    inp: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    feat: torch.Tensor
    size: tuple[int, int]

    def rows(self, index: torch.Tensor) -> Encoded:
        """The same features for the batch rows ``index`` (repeats allowed; gradients add up)."""
        return replace(self, inp=self.inp.index_select(0, index),
                       skips=tuple(t.index_select(0, index) for t in self.skips),
                       feat=self.feat.index_select(0, index))


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

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, score: Score = None,
                     chunk: int | None = None) -> torch.Tensor:
        """``self(x[rows], score)``; a model whose encoder ignores the score runs it once per row of x.

        Args:
            x: (B, C, H, W) distinct inputs; rows: (N,) int64 indices into them (repeats allowed).
            score: (N,) or a scalar or None, as for ``forward``.
            chunk: at most this many rows per call (None: one call).
        """
        step = chunk or rows.shape[0]
        parts = []
        for i in range(0, rows.shape[0], step):
            sc = score[i:i + step] if isinstance(score, torch.Tensor) and score.ndim == 1 else score
            parts.append(self(x.index_select(0, rows[i:i + step]), sc))
        return torch.cat(parts)

    def injection_parameters(self) -> list[nn.Parameter]:
        """The score-injection weights (L_reg of eq. 8); none for an unconditioned model."""
        return []

    def reg_parameters(self, groups: Sequence[str]) -> list[nn.Parameter]:
        """The weights L_reg anchors (``train.losses.pref.reg_params``); none for an unconditioned model."""
        return []

    def unconditioned(self) -> nn.Module:
        """The bare backbone: what supervised pretraining updates (the injection starts at zero)."""
        return self
