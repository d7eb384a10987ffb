"""The IQA ensemble: raw, normalized and ensemble scores per image and per block.

S = 10 * sum_i w_i * normalize(metric_i, raw_i), with the weights of the config
renormalized to sum 1: the 0..10 condition scale of the paper (section 3).

Block scores cut every image into a ``gh x gw`` grid and score all blocks of
all images together: blocks are stacked into the batch dimension, so a metric
is called once per chunk of ``batch_size * gh * gw`` blocks (the same number of
pixels as ``batch_size`` whole images), never once per block.

Images that cannot be scored (:func:`unscorable`: a non-finite value, or no
variation at all, as a constant label or a flat block) are never passed to a
metric: their scores are NaN, which the ledger records as a non-ok status and
the gate keeps out of the bank. BRISQUE and NIQE fit distributions to local
contrast and pyiqa asserts on an image without any (``Expected image with non
zero variance``); if a metric still asserts on a batch, its images are scored
one by one and the failing ones get NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyiqa
import torch
from torch import Tensor

from qtlib.config.types import IQAConfig
from qtlib.iqa.catalog import MetricInfo, get_info, normalize
from qtlib.iqa.factory import create_metric
from qtlib.util.checks import check_image


@dataclass(frozen=True)
class EnsembleScores:
    """Scores of a batch of images.

    Attributes:
        raw: metric -> raw pyiqa score, shape ``(B,)``.
        normalized: metric -> score in [0, 1], higher = better, shape ``(B,)``.
        S: ensemble score on the 0..10 condition scale, shape ``(B,)``.
    """

    raw: dict[str, Tensor]
    normalized: dict[str, Tensor]
    S: Tensor


@dataclass(frozen=True)
class BlockScores:
    """Scores of every block of a ``gh x gw`` grid; tensors have shape ``(B, gh, gw)``.

    Block ``(i, j)`` of an image of size ``H x W`` is the crop
    ``[i*bh:(i+1)*bh, j*bw:(j+1)*bw]`` with ``bh = H // gh``, ``bw = W // gw``
    (the last ``H % gh`` rows and ``W % gw`` columns belong to no block).
    """

    raw: dict[str, Tensor]
    normalized: dict[str, Tensor]
    S: Tensor
    grid: tuple[int, int]


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise unless ``images`` is a float ``(B, 3, H, W)`` tensor in [0, 1] (:func:`qtlib.util.checks.check_image`).

    Raises:
        TypeError: not a tensor.
        ValueError: wrong shape, non-float dtype, or values outside [0, 1].
    """
    check_image(images, name, channels=3, value_range=(0.0, 1.0))


def split_blocks(images: Tensor, grid: tuple[int, int]) -> Tensor:
    """Cut ``(B, C, H, W)`` into a ``gh x gw`` grid of blocks stacked in the batch dimension.

    Returns:
        ``(B * gh * gw, C, H // gh, W // gw)``, ordered image-major, then block row, then column
        (so ``.view(B, gh, gw)`` of per-block scores puts block ``(i, j)`` at ``[:, i, j]``).
    """
    gh, gw = grid
    b, c, h, w = images.shape
    bh, bw = h // gh, w // gw
    if bh < 1 or bw < 1:
        raise ValueError(f"images: {h}x{w} is too small for a {gh}x{gw} block grid")
    x = images[:, :, : bh * gh, : bw * gw].reshape(b, c, gh, bh, gw, bw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, bh, bw)


def unscorable(images: Tensor) -> Tensor:
    """``(B,)`` bool: True where an image holds a non-finite value or no variation (every pixel equal per channel).

    Shape:
        images: ``(B, C, H, W)``.
    """
    flat = images.flatten(2)
    finite = torch.isfinite(flat).all(dim=2).all(dim=1)
    constant = (flat.amax(dim=2) == flat.amin(dim=2)).all(dim=1)
    return ~finite | constant


def _call_metric(metric: torch.nn.Module, x: Tensor, name: str) -> Tensor:
    """One metric call on a chunk; an assertion inside pyiqa falls back to one image at a time (NaN where it fails)."""
    try:
        return per_image(metric(x), len(x), name)
    except AssertionError:
        out = torch.full((len(x),), float("nan"), device=x.device)
        for i in range(len(x)):
            try:
                out[i] = per_image(metric(x[i : i + 1]), 1, name)[0]
            except AssertionError:
                continue  # pyiqa cannot score this image: its entry stays NaN
        return out


def combine(normalized: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``10 * sum_m weights[m] * normalized[m]`` (weights assumed to sum to 1)."""
    total = sum(weights[m] * normalized[m] for m in weights)
    return 10.0 * total  # type: ignore[operator]


def renormalized(members: Mapping[str, float]) -> dict[str, float]:
    """Weights divided by their sum; raises ``ValueError`` on a non-positive sum or negative weight."""
    if any(w < 0 for w in members.values()):
        raise ValueError(f"iqa.ensemble: weights must be >= 0, got {dict(members)}")
    total = float(sum(members.values()))
    if total <= 0:
        raise ValueError(f"iqa.ensemble: weights must sum to > 0, got {dict(members)}")
    return {m: float(w) / total for m, w in members.items()}


def ensemble_members(cfg: IQAConfig) -> dict[str, float]:
    """The config's members as ``metric -> weight`` (renormalized), checked against the catalog."""
    names = [m.metric for m in cfg.ensemble]
    if not names:
        raise ValueError("iqa.ensemble: needs at least one member")
    if len(set(names)) != len(names):
        raise ValueError(f"iqa.ensemble: a metric is listed twice: {names}")
    for name in names:
        if get_info(name).needs_reference:
            raise ValueError(f"iqa.ensemble: {name!r} needs a reference image; the ensemble is no-reference")
    return renormalized({m.metric: m.weight for m in cfg.ensemble})


def per_image(out: Tensor, n: int, name: str) -> Tensor:
    """A metric's output as one float per image, ``(n,)`` (pyiqa returns ``(n,)``, ``(n, 1)`` or a scalar for n=1)."""
    out = out.reshape(-1).float()
    if out.numel() != n:
        raise RuntimeError(f"{name}: expected {n} scores, got shape {tuple(out.shape)}")
    return out


class Ensemble:
    """The weighted, normalized no-reference ensemble of ``cfg`` (no gradients).

    Args:
        cfg: ``iqa`` section of the config (members, weights, block grid, batch size,
            whether downloads are allowed).
        device: where the metrics run. Scores are returned on the device of the input.
        fast: the catalog's fast paths (False: pyiqa's own code only, for baselines; None: ``cfg.fast_paths``).

    Raises:
        MissingWeightsError: a member's weights are not in pyiqa's cache.
        UnknownMetricError / ValueError: a bad member list.
    """

    def __init__(self, cfg: IQAConfig, device: str | torch.device = "cpu", *, fast: bool | None = None) -> None:
        weights = ensemble_members(cfg)
        self.cfg = cfg
        self.device = torch.device(device)
        self.members: tuple[str, ...] = tuple(weights)
        self.weights: tuple[float, ...] = tuple(weights.values())
        self.infos: dict[str, MetricInfo] = {m: get_info(m) for m in self.members}
        # fast=False: pyiqa's own code paths only (the catalog's fast paths off), e.g. for a baseline
        self.metrics = {m: create_metric(m, self.device, allow_download=cfg.allow_download,
                                         fast=cfg.fast_paths if fast is None else fast, learned=cfg.learned)
                        for m in self.members}

    def score(self, images: Tensor) -> EnsembleScores:
        """Score whole images.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].

        Returns:
            :class:`EnsembleScores` with ``(B,)`` tensors.
        """
        check_images(images)
        self._check_size(images.shape[-2:], "images")
        raw = self._raw(images, self.cfg.batch_size)
        return self._finish(raw, images.device)

    def score_blocks(self, images: Tensor, grid: tuple[int, int] | None = None) -> BlockScores:
        """Score every block of a ``grid`` (default ``cfg.blocks``) of every image, batched.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            grid: ``(gh, gw)`` block rows and columns.

        Returns:
            :class:`BlockScores` with ``(B, gh, gw)`` tensors.
        """
        check_images(images)
        gh, gw = grid if grid is not None else tuple(self.cfg.blocks)
        if gh < 1 or gw < 1:
            raise ValueError(f"grid: expected two positive ints, got {(gh, gw)}")
        blocks = split_blocks(images, (gh, gw))
        self._check_size(blocks.shape[-2:], f"blocks of a {gh}x{gw} grid")
        raw = self._raw(blocks, self.cfg.batch_size * gh * gw)
        flat = self._finish(raw, images.device)
        b = images.shape[0]

        def shape(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {m: v.view(b, gh, gw) for m, v in d.items()}

        return BlockScores(shape(flat.raw), shape(flat.normalized), flat.S.view(b, gh, gw), (gh, gw))

    def versions(self) -> dict[str, str]:
        """Provenance: pyiqa's version and, per member, the metric and the SHA-256 of its weight files."""
        out = {"pyiqa": pyiqa.__version__}
        for m, info in self.infos.items():
            if info.source == "qtlib":  # a fitted file of its own: named with its hash
                out[m] = self.metrics[m].provenance()
                continue
            files = ",".join(f"{w.name}@sha256:{w.sha256()[:16]}" for w in info.weights if w.present())
            arch = type(self.metrics[m].net).__name__
            out[m] = f"pyiqa-{pyiqa.__version__}/{info.pyiqa_name}/{arch}" + (f"/{files}" if files else "")
        return out

    def _check_size(self, hw: torch.Size, what: str) -> None:
        for m, info in self.infos.items():
            if min(hw) < info.min_size:
                raise ValueError(
                    f"{what}: {hw[0]}x{hw[1]} is smaller than {m}'s minimum side {info.min_size}"
                )

    @torch.no_grad()
    def _raw(self, images: Tensor, chunk: int) -> dict[str, Tensor]:
        """Raw scores per metric, ``(B,)`` on the metric device; NaN for :func:`unscorable` images."""
        keep = (~unscorable(images)).nonzero().squeeze(1)
        scorable = images[keep.to(images.device)] if len(keep) < len(images) else images
        raw: dict[str, Tensor] = {}
        for m, metric in self.metrics.items():
            out = torch.full((len(images),), float("nan"), device=self.device)
            if len(scorable):
                parts = [_call_metric(metric, x.to(self.device), m) for x in scorable.split(chunk)]
                out[keep.to(self.device)] = torch.cat(parts).to(out.device)
            raw[m] = out
        return raw

    def _finish(self, raw: dict[str, Tensor], device: torch.device) -> EnsembleScores:
        raw = {m: v.to(device) for m, v in raw.items()}
        normalized = {m: normalize(m, v) for m, v in raw.items()}
        S = combine(normalized, dict(zip(self.members, self.weights)))
        return EnsembleScores(raw, normalized, S)
