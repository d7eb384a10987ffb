"""Build a model from its config: the one place where backbone names map to classes.

:data:`BACKBONES` is an explicit table (no registry filled by imports, no name
lookups). A new backbone needs its class, a config section for it, and one row
here; score conditioning then works on it unchanged once its injection modules
are named in ``model.conditioning.injection``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qtlib.config.types import ModelConfig
from qtlib.models.conditioning import HasSizeMultiple, ScoreConditioned
from qtlib.models.nafnet import NAFNet
from qtlib.models.restorer import Restorer
from qtlib.models.unet import UNet

#: backbone name -> function building the bare backbone from the model config.
BACKBONES: dict[str, Callable[[ModelConfig], Restorer]] = {
    "unet": lambda cfg: UNet(cfg.unet),
    "nafnet": lambda cfg: NAFNet(cfg.nafnet),
}


def build_backbone(cfg: ModelConfig) -> Restorer:
    """The bare backbone named by ``cfg.backbone``."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model.backbone: got {cfg.backbone!r}, expected one of {', '.join(BACKBONES)}")
    return BACKBONES[cfg.backbone](cfg)


def build_model(cfg: ModelConfig) -> Restorer:
    """The backbone, wrapped in :class:`ScoreConditioned` when ``cfg.conditioning.enabled``.

    Either way the result is called ``model(x, score=None)`` (:class:`Restorer`).
    """
    backbone = build_backbone(cfg)
    if cfg.conditioning.enabled:
        return ScoreConditioned(backbone, cfg.conditioning)
    return backbone


def size_multiple(model: nn.Module) -> int:
    """The side multiple the model pads to internally; shifts by it leave outputs unchanged (tiling)."""
    return int(model.size_multiple) if isinstance(model, HasSizeMultiple) else 1
