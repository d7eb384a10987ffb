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


def test_ema_half_life_is_a_share_of_the_round() -> None:
    """train.ema_half_life: after share x steps updates the initial weights keep half their weight."""
    from qtlib.train.schedule import ema_decay

    assert ema_decay(0.998, 0.0, 100) == 0.998  # 0: train.ema_decay as given
    for steps, share in ((100, 0.25), (216, 0.5), (10_000, 0.1)):
        d = ema_decay(0.998, share, steps)
        assert d ** (share * steps) == pytest.approx(0.5, rel=1e-9)
    # a real EMA after that many updates toward a constant student: half of the way
    from qtlib.models.ema import EMA

    teacher, student = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(teacher.weight)
    ema = EMA(teacher, ema_decay(0.998, 0.25, 80))
    torch.nn.init.ones_(student.weight)
    for _ in range(20):
        ema.update(student)
    assert ema.module.weight.item() == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="half-life"):
        ema_decay(0.998, 0.25, 0)
