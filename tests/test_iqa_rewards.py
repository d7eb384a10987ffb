"""Reward: the differentiable ensemble (offline members BRISQUE + NIQE here; the paper's in test_iqa_paper)."""

from __future__ import annotations

import logging

import pytest
import torch
from iqa_fixtures import natural_images, prepared  # noqa: F401  (fixture)
from torch import nn

from qtlib.config.types import IQAConfig, Member
from qtlib.iqa import Ensemble, NoDifferentiableMemberError, Reward, rewards


def _cfg(*members: tuple[str, float]) -> IQAConfig:
    return IQAConfig(ensemble=tuple(Member(m, w) for m, w in members))


@pytest.fixture(scope="module")
def offline(prepared) -> IQAConfig:  # noqa: F811
    return _cfg(("brisque", 0.5), ("niqe", 0.5))


@pytest.fixture(scope="module")
def noisy() -> torch.Tensor:
    torch.manual_seed(0)
    x = natural_images(2, 192, offset=3)
    return (x + 0.06 * torch.randn_like(x)).clamp(0.02, 0.98)


def test_reward_matches_ensemble(offline: IQAConfig, noisy: torch.Tensor) -> None:
    reward, ensemble = Reward(offline), Ensemble(offline)
    assert reward.members == ensemble.members and reward.weights == pytest.approx(ensemble.weights)
    r = reward(noisy)
    assert r.shape == (2,) and r.requires_grad is False  # input does not require grad, metrics frozen
    # same 0..10 scale; NIQE's as_loss path rounds differentiably, BRISQUE is float32: a small tolerance
    assert torch.allclose(r, ensemble.score(noisy).S, atol=0.05)


def test_gradient_step_raises_ensemble_score(offline: IQAConfig, noisy: torch.Tensor) -> None:
    reward, ensemble = Reward(offline), Ensemble(offline)
    x = noisy.clone().requires_grad_(True)
    reward(x).sum().backward()
    grad = x.grad
    assert grad is not None and grad.abs().sum() > 0
    assert (grad != 0).float().mean() > 0.5, "BRISQUE's gradient reaches every pixel"
    # one normalized-gradient ascent step per image
    step = 0.01 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * grad[0].numel() ** 0.5
    before, after = ensemble.score(noisy).S, ensemble.score((noisy + step).clamp(0, 1)).S
    assert (after > before).all(), (before, after)


def test_metrics_frozen_and_stay_in_eval_mode(offline: IQAConfig) -> None:
    reward = Reward(offline)
    parent = nn.ModuleDict({"student": nn.Sequential(nn.Conv2d(3, 3, 3), nn.Dropout()), "reward": reward})
    parent.train()
    assert parent["student"][1].training and reward.training
    assert not any(m.training for m in reward.metrics.modules())
    assert all(not p.requires_grad for p in reward.parameters())
    parent.eval()
    parent.train(True)
    assert not any(m.training for m in reward.metrics.modules())


def test_non_differentiable_members_excluded_and_logged_once(prepared, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rewards, "_logged_exclusions", set())
    cfg = _cfg(("brisque", 0.25), ("piqe", 0.75))
    with caplog.at_level(logging.WARNING, logger="qtlib.iqa.rewards"):
        first = Reward(cfg)
        Reward(cfg)
    assert first.members == ("brisque",) and first.weights == (1.0,) and first.excluded == ("piqe",)
    messages = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(messages) == 1
    assert "piqe" in messages[0] and "brisque" in messages[0]


def test_exception_no_differentiable_member() -> None:
    with pytest.raises(NoDifferentiableMemberError, match="no member is differentiable.*brisque"):
        Reward(_cfg(("piqe", 0.5), ("entropy", 0.5)))


def test_exception_bad_shape(offline: IQAConfig) -> None:
    with pytest.raises(ValueError, match="images: expected shape"):
        Reward(offline)(torch.rand(3, 64, 64))


def test_member_without_gradient_is_scored_as_a_constant(prepared, noisy: torch.Tensor) -> None:  # noqa: F811
    """iqa.ensemble[].grad: false keeps the member in the reward's value but passes no gradient through it."""
    both = Reward(_cfg(("brisque", 0.5), ("niqe", 0.5)))
    const = Reward(IQAConfig(ensemble=(Member("brisque", 0.5, grad=False), Member("niqe", 0.5))))
    assert const.constant == frozenset({"brisque"}) and const.members == both.members
    x1, x2 = noisy.clone().requires_grad_(True), noisy.clone().requires_grad_(True)
    r1, r2 = both(x1), const(x2)
    assert torch.allclose(r1, r2, atol=1e-5)  # the same value
    r1.sum().backward()
    r2.sum().backward()
    niqe_only = Reward(_cfg(("niqe", 1.0)))
    x3 = noisy.clone().requires_grad_(True)
    (0.5 * niqe_only(x3)).sum().backward()
    assert not torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(x2.grad, x3.grad, atol=1e-6)  # only NIQE's half of the gradient remains
    # PIQE has no gradient, but as a constant member it is admitted
    assert "piqe" in Reward(IQAConfig(ensemble=(Member("piqe", 0.5, grad=False), Member("brisque", 0.5)))).members
    with pytest.raises(NoDifferentiableMemberError):
        Reward(IQAConfig(ensemble=(Member("brisque", 1.0, grad=False),)))


def test_flat_crop_gets_a_detached_mean_and_no_traceback(offline: IQAConfig, noisy: torch.Tensor) -> None:
    """A flat image (pyiqa asserts on zero variance) among others: finite rewards, gradient only to the others."""
    reward = Reward(offline)
    x = torch.cat([noisy, torch.full_like(noisy[:1], 0.5)]).requires_grad_(True)
    r = reward(x)
    assert torch.isfinite(r).all()
    assert torch.allclose(r[:2], reward(noisy), atol=1e-4)
    assert r[2].item() == pytest.approx(r[:2].mean().item(), abs=1e-4)
    r.sum().backward()
    assert x.grad[:2].abs().sum() > 0 and x.grad[2].abs().sum() == 0
    flat = reward(torch.full_like(noisy, 0.25))  # every row flat: zeros, no call into pyiqa
    assert torch.isfinite(flat).all()
