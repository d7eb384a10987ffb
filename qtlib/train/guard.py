"""Non-finite steps: skip the optimizer step, log it, stop the run after ``max_nonfinite`` of them.

A NaN/inf loss or gradient would write NaN into every weight and, through the
EMA, into the teacher of the next round. :func:`step_if_finite` steps only when
the loss and every gradient are finite. Under DDP the gradients are averaged
across ranks before this check, so a NaN on one rank is seen by all and every
rank skips the same step. :class:`NonFiniteGuard` counts the skipped steps of
a run and raises :class:`NonFiniteLossError` when there are more than allowed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

_log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps with a non-finite loss or gradient; the message says how many, where, and what to change."""


def step_if_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
    """``optimizer.step()`` when ``loss`` and every gradient are finite; returns whether it stepped.

    Call after ``loss.backward()``. A skipped step leaves the weights and the optimizer state untouched.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    finite = torch.isfinite(loss.detach()).all()
    if grads:
        finite = finite & torch.stack([g.isfinite().all() for g in grads]).all()
    if not bool(finite):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises once there are more than ``limit`` (``train.max_nonfinite_steps``).

    Attributes:
        limit: skipped steps tolerated in one run (0 = stop at the first).
        where: names the run in messages, e.g. ``"train round 1"``.
        skipped: steps skipped so far (counted from the start of this process, not across a resume).
    """

    limit: int
    where: str
    skipped: int = 0

    @property
    def key(self) -> str:
        """The config key of the limit."""
        return "pretrain.max_nonfinite_steps" if self.where == "pretrain" else "train.max_nonfinite_steps"

    def record(self, stepped: bool, step: int, loss: float) -> None:
        """Note one step's outcome; log a skipped one; raise past the limit."""
        if stepped:
            return
        self.skipped += 1
        _log.warning("%s: step %d: non-finite loss or gradient (loss %s): optimizer step skipped (%d of at most %d)",
                     self.where, step, loss, self.skipped, self.limit)
        if self.skipped > self.limit:
            raise NonFiniteLossError(
                f"{self.where}: stopped at step {step}: {self.skipped} steps had a non-finite loss or gradient "
                f"(last loss {loss}), more than {self.key} = {self.limit}; no outputs were written "
                "for this run. Lower the learning rate, check the inputs and labels, or turn bf16 off"
            )
