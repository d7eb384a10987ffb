"""Restoration backbones, score conditioning, the EMA teacher and checkpoints.

``build_model(cfg.model)`` gives the configured backbone (U-Net or NAFNet),
wrapped in :class:`ScoreConditioned` when conditioning is enabled;
:class:`EMA` is the teacher; :func:`save_checkpoint` / :func:`load_model`
write and read complete checkpoints that rebuild their own model.
"""

from qtlib.models.build import BACKBONES, build_backbone, build_model, size_multiple
from qtlib.models.checkpoint import (
    CHECKPOINT_KINDS,
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from qtlib.models.conditioning import (
    DiscreteEmbedding,
    ScoreConditioned,
    SinusoidalEmbedding,
    sinusoidal_encoding,
)
from qtlib.models.ema import EMA
from qtlib.models.restorer import Restorer, Score
from qtlib.models.nafnet import NAFNet
from qtlib.models.unet import UNet

__all__ = [
    "BACKBONES", "CHECKPOINT_KINDS", "EMA", "Checkpoint", "CheckpointError", "DiscreteEmbedding", "NAFNet",
    "Restorer", "Score", "ScoreConditioned", "SinusoidalEmbedding", "UNet", "build_backbone", "build_model", "capture_rng_state",
    "load_checkpoint", "load_model", "restore_rng_state", "save_checkpoint", "sinusoidal_encoding", "size_multiple",
]
