"""Score conditioning as a wrapper around any backbone (paper, sec. 3.3, eqs. 5-7).

The quality score S of a pseudo-label (0..10 scale) is embedded into one
vector per injection point and added, broadcast over space, to the output of
the named backbone modules: ``F' = F + e_S``. The backbone is not modified:
:class:`ScoreConditioned` registers forward hooks on those modules for the
duration of its own ``forward`` only, so ``wrapper.backbone(x)`` is always the
bare, unconditioned network, and deep copies (the EMA teacher) carry no hooks
that point back at the student.

Two embeddings, chosen by ``ConditioningConfig.embedding``:

- ``sinusoidal`` (the paper): ``e_S = MLP(gamma(s))`` with
  ``gamma(s) = [sin(2^0 pi s), cos(2^0 pi s), ..., sin(2^(L-1) pi s), cos(2^(L-1) pi s)]``
  and ``s = S / 10``. The score is fed on the unit scale on purpose: with the
  raw 0..10 score every integer S has ``sin(2^k pi S) = 0`` and
  ``cos(2^k pi S) = 1`` for k >= 1, so integer levels would be indistinguishable
  except by the sign of ``cos(pi S)``. On the unit scale the lowest band
  ``sin(pi s)`` is monotonic over the used range [0, top/10] and the highest band
  of L=6 has a period of 0.625 score units.
- ``discrete`` (the authors' released code): a learned table of ``levels``
  vectors per injection point, ``level = floor(S)`` clamped to
  ``0..levels-1`` (with ``top_score`` 7 and 8 levels, everything at or above 7
  shares level 7).

In both, the last layer (the MLP's output layer, or the table) starts at zero,
so a freshly wrapped backbone returns exactly its unconditioned output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from qtlib.config.types import ConditioningConfig
from qtlib.models.restorer import Encoded, Restorer, Score
from qtlib.util.checks import check_shape


@runtime_checkable
class HasInjectionChannels(Protocol):
    """A backbone that states the channel count of each of its injection points."""

    injection_channels: Mapping[str, int]


@runtime_checkable
class HasSizeMultiple(Protocol):
    """A backbone that is translation-equivariant only for shifts by multiples of ``size_multiple``."""

    size_multiple: int


def injection_channels(backbone: nn.Module, name: str) -> int:
    """The channel count of the output of ``backbone``'s submodule ``name``.

    Taken from the backbone's ``injection_channels`` mapping when it has one,
    else from the module's ``out_channels`` (convolutions).

    Raises:
        ValueError: no such submodule, or its channel count cannot be inferred.
    """
    try:
        module = backbone.get_submodule(name)
    except AttributeError:
        known = sorted(backbone.injection_channels) if isinstance(backbone, HasInjectionChannels) else []
        hint = f"; known injection points: {', '.join(known)}" if known else ""
        raise ValueError(f"injection: {type(backbone).__name__} has no submodule '{name}'{hint}") from None
    if isinstance(backbone, HasInjectionChannels) and name in backbone.injection_channels:
        return int(backbone.injection_channels[name])
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.out_channels
    raise ValueError(
        f"injection: cannot infer the channels of '{name}' ({type(module).__name__}) in "
        f"{type(backbone).__name__}; give the backbone an `injection_channels` dict {{name: channels}}"
    )


def prepare_scores(score: Score, batch: int, top_score: float, device: torch.device) -> torch.Tensor:
    """Scores as a float32 tensor of shape (batch,), clamped to [0, top_score]; None means top_score."""
    if score is None:
        score = top_score
    if isinstance(score, (int, float)):
        if not math.isfinite(score):
            raise ValueError(f"score: expected a finite number, got {score}")
        return torch.full((batch,), min(max(float(score), 0.0), top_score), device=device)
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"score: expected a tensor, a number or None, got {type(score).__name__}")
    s = score.detach().to(device=device, dtype=torch.float32)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"score: expected shape ({batch},) or a scalar, got {tuple(score.shape)}")
    return s.clamp(0.0, top_score)


def sinusoidal_encoding(s: torch.Tensor, bands: int) -> torch.Tensor:
    """Eq. (6): (B,) values -> (B, 2 * bands) ``[sin(2^k pi s), cos(2^k pi s)]`` for k < bands."""
    freqs = math.pi * 2.0 ** torch.arange(bands, device=s.device, dtype=s.dtype)
    angles = s[:, None] * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


class SinusoidalEmbedding(nn.Module):
    """Eq. (5): a shared MLP trunk on gamma(S/10) and one zero-initialized output layer per injection point.

    gamma is computed as ``sin(S * f + phase)`` with precomputed ``f = 2^k pi / 10`` and
    ``phase`` 0 (sin) or pi/2 (cos): two kernels instead of eight, which matters on a
    GPU where a small model's forward is bound by kernel launches.
    """

    def __init__(self, bands: int, hidden: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.bands = bands
        freqs = (math.pi / 10.0) * 2.0 ** torch.arange(bands, dtype=torch.float32).repeat_interleave(2)
        phase = torch.tensor([0.0, math.pi / 2]).repeat(bands)
        # Constants, not state: non-persistent, so checkpoints hold only learned weights.
        self.register_buffer("freqs", freqs, persistent=False)
        self.register_buffer("phase", phase, persistent=False)
        self.trunk = nn.Sequential(nn.Linear(2 * bands, hidden), nn.SiLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in channels)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, score: torch.Tensor) -> list[torch.Tensor]:
        """(B,) scores on the 0..10 scale -> one (B, C_i) embedding per injection point."""
        h = self.trunk(torch.sin(torch.addcmul(self.phase, score[:, None], self.freqs)))
        return [head(h) for head in self.heads]


class DiscreteEmbedding(nn.Module):
    """A zero-initialized table of ``levels`` vectors per injection point; level = floor(S)."""

    def __init__(self, levels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.levels = levels
        self.tables = nn.ModuleList(nn.Embedding(levels, c) for c in channels)
        for table in self.tables:
            nn.init.zeros_(table.weight)

    def forward(self, score: torch.Tensor) -> list[torch.Tensor]:
        """(B,) scores on the 0..10 scale -> one (B, C_i) embedding per injection point."""
        # Scores arrive clamped to >= 0 (prepare_scores), where truncation is floor.
        level = score.long().clamp_(max=self.levels - 1)
        return [table(level) for table in self.tables]


def _add_embedding(
    module: nn.Module, args: tuple, output: torch.Tensor, *, name: str, emb: torch.Tensor, fired: list[str]
) -> torch.Tensor:
    """Forward hook: ``output + emb`` broadcast over space (eq. 7); records that it ran in ``fired``."""
    fired.append(name)
    check_shape(output, [*emb.shape, "H", "W"], f"injection '{name}' output")
    return output + emb.to(output.dtype)[:, :, None, None]


class ScoreConditioned(Restorer):
    """Any backbone, conditioned on a quality score at named injection points.

    Args:
        backbone: an ``nn.Module`` mapping (B, C, H, W) -> (B, C', H, W).
        cfg: the :class:`~qtlib.config.types.ConditioningConfig` (embedding kind,
            bands, hidden width, levels, top score, injection module names).

    Shape:
        - x: (B, C, H, W); score: (B,), a scalar tensor, a number, or None (= top_score).
        - Output: the backbone's output shape.
    """

    def __init__(self, backbone: nn.Module, cfg: ConditioningConfig) -> None:
        super().__init__()
        if not cfg.injection:
            raise ValueError("cfg.injection: name at least one injection module")
        self.backbone = backbone
        self.cfg = cfg
        channels = [injection_channels(backbone, name) for name in cfg.injection]
        self.channels = dict(zip(cfg.injection, channels, strict=True))
        if cfg.embedding == "sinusoidal":
            self.embedding: nn.Module = SinusoidalEmbedding(cfg.bands, cfg.hidden, channels)
        elif cfg.embedding == "discrete":
            self.embedding = DiscreteEmbedding(cfg.levels, channels)
        else:
            raise ValueError(f"cfg.embedding: expected 'sinusoidal' or 'discrete', got {cfg.embedding!r}")
        self.size_multiple = backbone.size_multiple if isinstance(backbone, HasSizeMultiple) else 1

    conditioned = True

    @property
    def top_score(self) -> float:  # type: ignore[override]
        return float(self.cfg.top_score)

    def unconditioned(self) -> nn.Module:
        return self.backbone

    def embed(self, score: Score, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The (B, C_i) embedding for each injection point name."""
        s = prepare_scores(score, batch, self.cfg.top_score, device)
        return dict(zip(self.cfg.injection, self.embedding(s), strict=True))

    def forward(self, x: torch.Tensor, score: Score = None) -> torch.Tensor:
        """Run the backbone with the score embedding added at each injection point.

        A module called twice in one forward (weight sharing) receives the embedding each time.

        Raises:
            RuntimeError: an injection module never ran (it is not on the backbone's forward path).
        """
        embeddings = self.embed(score, x.shape[0], x.device)
        return self._with_hooks(embeddings, [], lambda: self.backbone(x))

    def _with_hooks(self, embeddings: dict[str, torch.Tensor], fired: list[str], run) -> torch.Tensor:
        """``run()`` with each embedding added at its injection module; raise if one never ran."""
        handles = [
            self.backbone.get_submodule(name).register_forward_hook(
                functools.partial(_add_embedding, name=name, emb=emb, fired=fired)
            )
            for name, emb in embeddings.items()
        ]
        try:
            out = run()
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(set(embeddings) - set(fired))
        if missing:
            raise RuntimeError(f"injection: {', '.join(missing)} never ran in {type(self.backbone).__name__}.forward")
        return out

    @property
    def shares_encoder(self) -> bool:
        """The backbone splits into encode/decode and every injection point is on the decoder side.

        Then the encoder (and the bottleneck, whose output receives the embedding)
        does not depend on the score, and :meth:`forward_rows` runs it once per input.
        """
        split = callable(getattr(self.backbone, "encode", None)) and callable(getattr(self.backbone, "decode", None))
        return split and all(n == "bottleneck" or n.startswith("decoders.") for n in self.cfg.injection)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, score: Score = None,
                     chunk: int | None = None) -> torch.Tensor:
        """``self(x[rows], score)`` with the score-independent encoder run once per row of ``x``.

        Equal to the separate forwards up to float rounding (the same arithmetic per
        sample; the encoder's gradient is the sum over the rows that reuse it).

        Args:
            x: (B, C, H, W) distinct inputs; rows: (N,) int64 indices into them (repeats allowed).
            score: (N,), a scalar or None (= top score).
            chunk: decode at most this many rows per call (on a CPU, smaller calls are faster).
        """
        if not self.shares_encoder:
            return super().forward_rows(x, rows, score, chunk)
        s = prepare_scores(score, rows.shape[0], self.cfg.top_score, x.device)
        full = self.backbone.encode(x)
        step = chunk or rows.shape[0]
        return torch.cat([self._decode_rows(full, rows[i:i + step], s[i:i + step])
                          for i in range(0, rows.shape[0], step)])

    def _decode_rows(self, full: Encoded, rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        embeddings = self.embed(s, rows.shape[0], s.device)
        enc = full.rows(rows)
        fired: list[str] = []
        if "bottleneck" in embeddings:  # the bottleneck ran inside encode: add its embedding here
            emb = embeddings.pop("bottleneck")
            enc = replace(enc, feat=_add_embedding(self.backbone.bottleneck, (), enc.feat, name="bottleneck",
                                                   emb=emb, fired=fired))
        return self._with_hooks(embeddings, fired, lambda: self.backbone.decode(enc))

    def injection_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the score embedding (what ``train.losses.pref.params: injection`` updates)."""
        return list(self.embedding.parameters())

    def reg_parameters(self, groups: Sequence[str]) -> list[nn.Parameter]:
        """The weights of L_reg = 1/2 sum ||W - W_init||^2 (eq. 8), by group, each parameter once, in a fixed order.

        Args:
            groups: any of ``embedding`` (the score embedding), ``injected`` (the backbone modules at
                the injection points, whose outputs receive the embedding: the paper's "score injection
                layers") and ``upsampling`` (the backbone's upsampling convolutions, ``ups``: what the
                authors' code anchors).

        Raises:
            ValueError: an unknown group, or ``upsampling`` on a backbone without ``ups``.
        """
        found: dict[int, nn.Parameter] = {}
        for group in groups:
            if group == "embedding":
                params = list(self.embedding.parameters())
            elif group == "injected":
                params = [p for name in self.cfg.injection for p in self.backbone.get_submodule(name).parameters()]
            elif group == "upsampling":
                ups = getattr(self.backbone, "ups", None)
                if not isinstance(ups, nn.Module):
                    raise ValueError(f"reg_params: {type(self.backbone).__name__} has no upsampling layers (ups)")
                params = list(ups.parameters())
            else:
                raise ValueError(f"reg_params: unknown group {group!r}; expected embedding, injected or upsampling")
            for p in params:
                found.setdefault(id(p), p)
        return list(found.values())
