"""The learning-rate schedules (qtlib.train.schedule) against torch's own CosineAnnealingLR."""

from __future__ import annotations

import pytest
import torch

from qtlib.train.schedule import scheduled_lr, set_lr


def test_constant_is_the_base_rate() -> None:
    assert [scheduled_lr(2e-4, t, 5, "constant") for t in range(5)] == [2e-4] * 5


@pytest.mark.parametrize("total", [1, 7, 100])
def test_cosine_is_torchs_cosine_annealing(total: int) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [scheduled_lr(1e-3, t, total, "cosine") for t in range(total)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert ours[0] == 1e-3 and all(a >= b for a, b in zip(ours, ours[1:], strict=False))


def test_out_of_range_steps_and_unknown_kinds_raise() -> None:
    with pytest.raises(ValueError, match="step 5 is not within a stage of 5 steps"):
        scheduled_lr(1e-3, 5, 5, "cosine")
    with pytest.raises(ValueError, match="unknown kind 'step'"):
        scheduled_lr(1e-3, 0, 5, "step")  # type: ignore[arg-type]


def test_set_lr_sets_every_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 5.0}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
