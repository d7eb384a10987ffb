"""Speed-ups of the training step that claim equivalence: the same loss and gradients (to float32 rounding)."""

from __future__ import annotations

import torch

from qtlib.models import build_model
from qtlib.train import StepContext, StudentPasses, train_step
from qtlib.train.step import pass_chunk, resolve_starts
from tests.iqa_fixtures import prepared  # noqa: F401  (fixture)
from tests.test_train_losses import FULL, TINY, _batch, _toy_reward
from qtlib.config.types import Losses


def _step(chunk: int | None) -> tuple[dict[str, float], list[torch.Tensor]]:
    torch.manual_seed(0)
    student = build_model(TINY)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the step leaves the weights, grads stay
    losses = resolve_starts(Losses(), budget=1)
    init = [p.detach().clone() for p in student.reg_parameters(losses.pref.reg_params)]
    ctx = StepContext(StudentPasses(student, chunk=chunk), student, opt, FULL, losses, 7.0, 16, _toy_reward,
                      _toy_reward, None, init, torch.device("cpu"))
    out = train_step(ctx, _batch(), step=10_000)
    return out.terms, [p.grad.clone() for p in student.parameters() if p.grad is not None]


def test_chunked_passes_equal_one_call() -> None:
    whole, g_whole = _step(None)
    for chunk in (1, 2, 3):
        terms, grads = _step(chunk)
        for k, v in whole.items():
            assert v == v and abs(terms[k] - v) <= 1e-5 * max(1.0, abs(v)) or (v != v and terms[k] != terms[k]), k
        assert len(grads) == len(g_whole)
        for a, b in zip(grads, g_whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_pass_chunk_default() -> None:
    assert pass_chunk(4, torch.device("cpu")) == 4
    assert pass_chunk(4, torch.device("cuda")) is None


def test_chunk_exception() -> None:
    import pytest

    with pytest.raises(ValueError, match="chunk"):
        StudentPasses(build_model(TINY), chunk=0)


def _grads(model, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = fn()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_shared_encoder_equals_separate_passes() -> None:
    """forward_rows (encoder once per input) == the stacked separate forwards: values and every gradient.

    In float64, so the comparison is of the arithmetic (measured: 2e-15 of each gradient's largest entry;
    in float32 the summation order alone moves gradients by ~1e-5 of their largest entry).
    """
    from qtlib.config import ModelConfig, NAFNetConfig, UNetConfig

    cfgs = [TINY, ModelConfig(backbone="nafnet", nafnet=NAFNetConfig(width=8, enc_blocks=(1, 1), middle_blocks=1,
                                                                     dec_blocks=(1, 1)), unet=UNetConfig())]
    for cfg in cfgs:
        torch.manual_seed(0)
        model = build_model(cfg).double()
        with torch.no_grad():  # the embedding starts at zero: make it matter
            for p in model.injection_parameters():
                p.normal_(0, 0.5)
        assert model.shares_encoder
        x = torch.rand(3, 3, 24, 24, dtype=torch.float64)
        rows = torch.tensor([0, 1, 2, 0, 2, 0, 1, 2])
        score = torch.tensor([3.0, 7.5, 5.0, 7.0, 7.0, 4.0, 5.0, 6.0], dtype=torch.float64)
        shared, g_shared = _grads(model, lambda: model.forward_rows(x, rows, score))
        separate, g_sep = _grads(model, lambda: model(x[rows], score))
        torch.testing.assert_close(shared, separate, rtol=1e-12, atol=1e-12)
        assert len(g_shared) == len(g_sep)
        for a, b in zip(g_shared, g_sep, strict=True):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_encoder_side_injection_does_not_share() -> None:
    from dataclasses import replace

    cfg = replace(TINY, conditioning=replace(TINY.conditioning, injection=("encoders.1",)))
    model = build_model(cfg)
    assert not model.shares_encoder
    x, rows = torch.rand(2, 3, 16, 16), torch.tensor([0, 1, 1])
    torch.testing.assert_close(model.forward_rows(x, rows, torch.tensor([1.0, 2.0, 7.0])),
                               model(x[rows], torch.tensor([1.0, 2.0, 7.0])))


def test_fast_passes_switch_builds_the_plain_stack() -> None:
    """train.fast_passes: false -> one plain call (no chunks, no shared encoder), the same step to rounding."""
    from qtlib.config import load_config
    from qtlib.train.step import build_passes

    student = build_model(TINY)
    fast, plain = build_passes(student, 4, torch.device("cpu")), build_passes(student, 4, torch.device("cpu"), False)
    assert (fast.chunk, fast.share_encoder) == (4, True)
    assert (plain.chunk, plain.share_encoder) == (None, False)
    assert pass_chunk(4, torch.device("cpu"), fast=False) is None
    assert load_config(overrides={"train": {"fast_passes": False}}).train.fast_passes is False
    x = torch.rand(2, 3, 32, 32)
    rows, score = torch.tensor([0, 1, 0, 1, 1]), torch.tensor([7.0, 7.0, 3.0, 2.0, 5.0])
    (got,) = plain([(x, rows, score)])
    torch.testing.assert_close(got, student(x[rows], score))
    torch.testing.assert_close(fast([(x, rows, score)])[0], got, rtol=1e-4, atol=1e-5)


def test_iqa_fast_paths_switch_reaches_scoring_and_rewards(prepared) -> None:  # noqa: F811
    """iqa.fast_paths: false -> pyiqa's own BRISQUE in the ensemble and in the reward."""
    from dataclasses import replace

    from qtlib.config.types import IQAConfig, Member
    from qtlib.iqa import Ensemble, Reward

    cfg = IQAConfig(ensemble=(Member("brisque", 1.0),))
    for fast, name in ((True, "FastBRISQUE"), (False, "BRISQUE")):
        c = replace(cfg, fast_paths=fast)
        assert type(Reward(c).metrics["brisque"].net).__name__ == name
    assert type(Ensemble(replace(cfg, fast_paths=False)).metrics["brisque"].net).__name__ == "BRISQUE"
