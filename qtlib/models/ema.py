"""The EMA teacher (paper eq. 10): theta_T <- alpha theta_T + (1 - alpha) theta_S.

Built on ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``
(one fused ``_foreach_lerp_`` per device and dtype). Two deliberate choices:

- Every update is eq. (10). ``AveragedModel`` copies the model outright on its
  first update (``n_averaged == 0``); here the teacher already starts as a copy
  of the student (teacher_0 = student_0 = the pretrained model), so the counter
  starts at 1 and the first update is already an average.
- Buffers are copied from the student at every update, not averaged
  (``use_buffers=False``): buffers hold statistics the student's forward
  computes (e.g. BatchNorm running stats, integer counters), not weights the
  optimizer learns, and an average of integer counters is meaningless. The
  bundled backbones have no buffers; this matters for custom ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA:
    """An exponential moving average of a model's parameters.

    Args:
        model: the student; the teacher starts as a deep copy of it.
        decay: alpha in [0, 1] (paper 0.998); 1 freezes the teacher, 0 copies the student.

    Example:
        >>> ema = EMA(student, decay=0.998)
        >>> loss.backward(); opt.step(); ema.update(student)
        >>> teacher = ema.module
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
        self.decay = float(decay)
        model = _unwrap(model)
        self._averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False)
        self._averaged.n_averaged.fill_(1)
        self._averaged.module.requires_grad_(False)
        self._n_params = _count(model)

    @property
    def module(self) -> nn.Module:
        """The teacher model (same class as the student)."""
        return self._averaged.module

    @property
    def num_updates(self) -> int:
        """Updates applied since the teacher was copied from the student."""
        return int(self._averaged.n_averaged) - 1

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the teacher's parameters towards ``model``'s (eq. 10) and copy its buffers."""
        model = _unwrap(model)
        if _count(model) != self._n_params:
            raise ValueError(f"model: expected {self._n_params} parameter tensors (the student), got {_count(model)}")
        self._averaged.update_parameters(model)

    def to(self, device: torch.device | str) -> EMA:
        """Move the teacher to ``device``; returns self."""
        self._averaged.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"decay": float, "num_updates": int, "module": teacher state_dict}`` (safe for ``weights_only``)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the teacher's weights and update count; the decay stays the constructor's (the config's)."""
        self.module.load_state_dict(state["module"])
        self._averaged.n_averaged.fill_(int(state["num_updates"]) + 1)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _count(model: nn.Module) -> int:
    return sum(1 for _ in model.parameters())
