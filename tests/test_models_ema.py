"""EMA teacher: eq. (10) from the first update, buffers copied, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtlib.config import ConditioningConfig, ModelConfig, UNetConfig
from qtlib.models import EMA, build_model


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(unet=UNetConfig(width=4, depth=1), conditioning=ConditioningConfig(hidden=8)))


def nudge(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_update_is_eq10_from_the_first_step() -> None:
    student = tiny_model()
    ema = EMA(student, decay=0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    nudge(student, 1)
    ema.update(student)
    for t, t0, s in zip(ema.module.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, atol=1e-6, rtol=1e-6)
    assert ema.num_updates == 1


def test_teacher_is_independent_and_frozen() -> None:
    student = tiny_model()
    ema = EMA(student, decay=0.998)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in student.parameters())
    x = torch.rand(1, 3, 8, 8)
    ref = ema.module(x, 3.0)
    nudge(student, 2)
    assert torch.equal(ema.module(x, 3.0), ref)  # no update, no change
    assert not torch.equal(student(x, 3.0), ref)


@pytest.mark.parametrize(("decay", "follows"), [(0.0, True), (1.0, False)])
def test_decay_limits(decay: float, follows: bool) -> None:
    student = tiny_model()
    ema = EMA(student, decay=decay)
    nudge(student, 3)
    ema.update(student)
    same = all(torch.equal(t, s) for t, s in zip(ema.module.parameters(), student.parameters(), strict=True))
    assert same is follows


def test_buffers_are_copied_not_averaged() -> None:
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(student, decay=0.5)
    student.train()
    student(torch.rand(4, 3, 8, 8) * 5)  # moves the running stats
    ema.update(student)
    bn_t, bn_s = ema.module[1], student[1]
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)
    assert torch.equal(bn_t.running_var, bn_s.running_var)
    assert int(bn_t.num_batches_tracked) == int(bn_s.num_batches_tracked) == 1


def test_state_dict_round_trip() -> None:
    student = tiny_model()
    ema = EMA(student, decay=0.99)
    for seed in range(3):
        nudge(student, seed)
        ema.update(student)
    state = ema.state_dict()
    other = EMA(tiny_model(), decay=0.99)
    other.load_state_dict(state)
    assert other.num_updates == 3
    for a, b in zip(ema.module.state_dict().values(), other.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_exception_bad_decay_and_model() -> None:
    with pytest.raises(ValueError, match=r"decay: expected a value in \[0, 1\]"):
        EMA(nn.Linear(2, 2), decay=1.5)
    ema = EMA(nn.Linear(2, 2), decay=0.5)
    with pytest.raises(ValueError, match="model: expected 2 parameter tensors"):
        ema.update(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
