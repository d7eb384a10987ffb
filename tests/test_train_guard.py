"""Non-finite steps: skipped (weights and optimizer state untouched), logged, and a run stops past the limit."""

from __future__ import annotations

import logging

import pytest
import torch

from qtlib.config import ModelConfig, UNetConfig
from qtlib.config.loader import config_from_dict
from qtlib.models import build_model
from qtlib.train.guard import NonFiniteGuard, NonFiniteLossError, step_if_finite


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(unet=UNetConfig(width=4, depth=2)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _loss(model: torch.nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model(x, torch.tensor([7.0, 7.0])).mean() * scale


def test_finite_loss_steps() -> None:
    model, opt = _model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model).backward()
    assert step_if_finite(opt, _loss(model).detach())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("fault", ["nan_loss", "inf_loss", "nan_grad"])
def test_nonfinite_step_is_skipped_untouched(fault: str) -> None:
    model, opt = _model_and_opt()
    _loss(model).backward()
    step_if_finite(opt, torch.tensor(1.0))  # one real step, so AdamW has state to protect
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    opt.zero_grad()
    scale = {"nan_loss": float("nan"), "inf_loss": float("inf"), "nan_grad": 1.0}[fault]
    loss = _loss(model, scale)
    loss.backward()
    if fault == "nan_grad":
        next(iter(model.parameters())).grad.view(-1)[0] = float("nan")
    assert not step_if_finite(opt, loss.detach())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()["state"]
    assert all(torch.equal(state[k][n], after[k][n]) for k in state for n in state[k])
    assert all(p.grad is None for p in model.parameters())


def test_guard_logs_and_stops_past_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard(limit=2, where="train round 3")
    with caplog.at_level(logging.WARNING, logger="qtlib.train.guard"):
        guard.record(True, 0, 1.0)
        guard.record(False, 1, float("nan"))
        guard.record(False, 2, float("inf"))
    assert guard.skipped == 2 and len(caplog.records) == 2
    assert "train round 3: step 1: non-finite loss or gradient (loss nan): optimizer step skipped (1 of at most 2)" \
        in caplog.text
    with pytest.raises(NonFiniteLossError, match=r"train round 3: stopped at step 5: 3 steps had a non-finite loss "
                                                 r"or gradient \(last loss nan\), more than "
                                                 r"train.max_nonfinite_steps = 2"):
        guard.record(False, 5, float("nan"))


def test_config_key() -> None:
    assert config_from_dict({}).train.max_nonfinite_steps == 10
    assert config_from_dict({"train": {"max_nonfinite_steps": 0}}).train.max_nonfinite_steps == 0
    with pytest.raises(Exception, match="max_nonfinite_steps"):
        config_from_dict({"train": {"max_nonfinite_steps": -1}})


def test_pretrain_step_skips_a_nan_target() -> None:
    from qtlib.train.pretrain import pretrain_step, trainable

    model, _ = _model_and_opt()
    net = trainable(model)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.rand(2, 3, 32, 32)
    y = x.clone()
    y[0, 0, 0, 0] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    terms = pretrain_step(net, opt, x, y, None, 0.0)
    assert terms["stepped"] is False and terms["loss"] != terms["loss"]  # NaN
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert pretrain_step(net, opt, x, x, None, 0.0)["stepped"] is True
    assert NonFiniteGuard(0, "pretrain").key == "pretrain.max_nonfinite_steps"
