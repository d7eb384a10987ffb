"""Training state and resume, shared by pretraining and the round loop.

A training stage writes a step checkpoint (``<final>.partial``, see
:func:`qtlib.layout.step_checkpoint`) every ``checkpoint_every`` steps and its
final checkpoint at the end. Both carry a :class:`TrainState`: the typed
progress of the stage (step, global step, loss log, the fingerprint of its
inputs and config, and what it ran with). :func:`find_resume` decides whether
a step checkpoint may be resumed: only when its fingerprint, which hashes the
config slices and input files the stage reads, is the current one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qtlib.config.types import ModelConfig
from qtlib.layout import step_checkpoint
from qtlib.models import EMA, Checkpoint, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint

_log = logging.getLogger(__name__)

Stage = Literal["pretrain", "round"]
Resume = bool | Path
"""True = the stage's own step checkpoint when it matches; False = start afresh; a path = that file."""


@dataclass
class TrainState:
    """The progress of a training stage, saved in its step and final checkpoints.

    Attributes:
        stage: ``pretrain`` or ``round``.
        fingerprint: :func:`fingerprint` of the stage's config slices and inputs.
        step: steps done in this stage (= the sampler position).
        global_step: steps over all rounds (start steps of loss terms count in it).
        log: one dict per step (the rows of the stage's loss log).
        determinism: the determinism switch's recorded state.
        perceptual: the resolved perceptual loss.
        switches: the resolved method switches (rounds only).
        n_samples, world, global_batch: the round's sample count, DDP world size and global batch.
        final_loss: the last step's loss (pretraining's final checkpoint).
        budget: the run's steps (rounds x round 0's steps), which a loss term's ``start`` below 1 is a
            share of; set by round 0 and carried by every round's student, so that with epochs (bank sizes,
            hence round lengths, differ) a term that has started never stops again.
    """

    stage: Stage
    fingerprint: str
    step: int = 0
    global_step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    determinism: dict[str, bool] = field(default_factory=dict)
    perceptual: str = "none"
    switches: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 0
    world: int = 1
    global_batch: int = 0
    final_loss: float | None = None
    budget: int = 0

    def to_extra(self, with_log: bool = True) -> dict[str, Any]:
        """The state as a checkpoint's ``extra`` mapping (the log only in step checkpoints)."""
        out = asdict(self)
        if not with_log:
            out.pop("log")
        return out

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> TrainState:
        """Read a state back from a checkpoint's ``extra`` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        if "stage" not in extra or "fingerprint" not in extra:
            raise ValueError("checkpoint holds no training state (no 'stage' / 'fingerprint')")
        return cls(**{k: v for k, v in extra.items() if k in names})


def fingerprint(payload: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of ``payload`` as canonical JSON (config slices, input hashes...)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_resume(final: Path, resume: Resume, stage: Stage, fp: str) -> Checkpoint | None:
    """The step checkpoint to resume from, or None to start afresh.

    Args:
        final: the stage's final checkpoint; its step checkpoint is ``<final>.partial``.
        resume: True = that step checkpoint if it exists and matches (a stale one is ignored, with a
            warning); False = never; a path = exactly that file, which must match.
        stage: the stage that resumes.
        fp: the current fingerprint.

    Raises:
        FileNotFoundError: an explicit ``resume`` path that does not exist.
        ValueError: an explicit ``resume`` path written for other inputs or another config.
    """
    if resume is False:
        return None
    path = step_checkpoint(final) if resume is True else Path(resume)
    if not path.is_file():
        if resume is not True:
            raise FileNotFoundError(f"resume: {path}: no step checkpoint there")
        return None
    ckpt = load_checkpoint(path, kinds=("train-state",))
    if ckpt.extra.get("stage") == stage and ckpt.extra.get("fingerprint") == fp:
        return ckpt
    if resume is not True:
        raise ValueError(f"resume: {path} was written for other inputs or another config")
    _log.warning("%s: inputs or config changed since this step checkpoint; starting afresh", path)
    return None


def resume_into(ckpt: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                restore_rng: bool = True) -> TrainState:
    """Load a step checkpoint's model, optimizer, EMA and RNG states in place; return its state."""
    model.load_state_dict(ckpt.model_state)
    opt.load_state_dict(interned(ckpt.optimizer_state))
    if ema is not None:
        ema.load_state_dict(interned(ckpt.ema_state))
    if ckpt.rng and restore_rng:
        restore_rng_state(ckpt.rng)
    state = TrainState.from_extra(ckpt.extra)
    state.step = ckpt.step
    return state


def interned(obj: Any) -> Any:
    """A copy of a loaded state with every string interned (containers rebuilt, tensors shared).

    Pickle writes an object seen before as a back-reference, by identity. A fresh
    optimizer's keys (``'step'``, ``'exp_avg'``...) are the interned literals of
    torch's code, the same objects as the checkpoint's own ``'step'`` field; keys
    read back from a step checkpoint are new strings. Without interning, a resumed
    run saves the same values in different bytes, and every hash of the file (the
    next round's fingerprint, the ledger's ``teacher_hash``) differs.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {interned(k): interned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(interned(v) for v in obj)
    return obj


def save_step(final: Path, mc: ModelConfig, model: nn.Module, opt: torch.optim.Optimizer, state: TrainState,
              round_: int, ema: EMA | None = None) -> Path:
    """Write the step checkpoint of ``final`` (model, optimizer, EMA, RNG states, the state with its log)."""
    return save_checkpoint(step_checkpoint(final), Checkpoint(
        "train-state", mc, model.state_dict(), ema.state_dict() if ema is not None else None, opt.state_dict(),
        step=state.step, round=round_, rng=capture_rng_state(), extra=state.to_extra(),
    ))
