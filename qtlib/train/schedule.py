"""Learning-rate schedules of the training stages (``pretrain.lr_schedule``, ``train.lr_schedule``).

The learning rate of step ``t`` of ``total`` is a pure function of ``(t, total)``, set on the
optimizer before the step, so a run resumed from a step checkpoint continues on the same
schedule without any scheduler state to save (torch's ``LRScheduler`` objects are
stateful: their position would have to be checkpointed and restored beside the optimizer).

- ``constant``: ``lr`` at every step (the earlier behaviour);
- ``cosine``: ``lr * (1 + cos(pi * t / total)) / 2``, the closed form of torch's
  ``CosineAnnealingLR`` with ``eta_min = 0`` and ``T_max = total``: the weights a stage
  ends on are those of a low learning rate, not a snapshot of a noisy high-rate walk.
  In the rounds, ``total`` is one round's steps (the schedule restarts every round).
"""

from __future__ import annotations

import math

import torch

from qtlib.config.types import LRSchedule


def scheduled_lr(base: float, step: int, total: int, kind: LRSchedule) -> float:
    """The learning rate of step ``step`` (0-based) of ``total`` under schedule ``kind``."""
    if total < 1 or not 0 <= step < total:
        raise ValueError(f"lr schedule: step {step} is not within a stage of {total} steps")
    if kind == "constant":
        return base
    if kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total))
    raise ValueError(f"lr schedule: unknown kind {kind!r} (constant or cosine)")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in opt.param_groups:
        group["lr"] = lr


def ema_decay(decay: float, half_life: float, steps: int) -> float:
    """The EMA teacher's decay per step (``train.ema_decay``, ``train.ema_half_life``).

    With ``half_life`` a share h of a round's ``steps`` (0 < h <= 1), the decay is
    ``0.5 ** (1 / (h * steps))``: after h x steps updates the teacher's initial weights keep half
    their weight, whatever the budget. ``half_life`` 0 = ``decay`` as given.
    """
    if half_life <= 0:
        return decay
    if steps < 1:
        raise ValueError(f"ema half-life: a round of {steps} steps has no half-life")
    return 0.5 ** (1.0 / (half_life * steps))
