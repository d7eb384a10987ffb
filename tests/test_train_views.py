"""The strong view of the student's input (train.strong_view): what it changes, and what it never touches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtlib.config import load_config
from qtlib.config.types import StrongView
from qtlib.train.views import apply_view, draw_view


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g)


def test_draws_are_seeded_in_range_and_recorded() -> None:
    cfg = StrongView(enabled=True, p=0.5)
    a = draw_view(cfg, 200, np.random.default_rng(1))
    b = draw_view(cfg, 200, np.random.default_rng(1))
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("blur_sigma", "noise_std", "jpeg_quality"))
    for values, (lo, hi) in ((a.blur_sigma, cfg.blur_sigma), (a.noise_std, cfg.noise_std),
                             (a.jpeg_quality, cfg.jpeg_quality)):
        on = values > 0
        assert 0.3 < on.mean() < 0.7  # each op with probability p
        assert (values[on] >= lo).all() and (values[on] <= hi).all()
    off = draw_view(StrongView(p=0.0), 10, np.random.default_rng(1))
    assert not (off.blur_sigma.any() or off.noise_std.any() or off.jpeg_quality.any())


def test_view_changes_the_masked_inputs_only_and_not_the_tensor_given() -> None:
    x = _images()
    keep = x.clone()
    draw = draw_view(StrongView(enabled=True, p=1.0), 4, np.random.default_rng(0))
    mask = torch.tensor([True, False, True, False])
    y = apply_view(x, draw, mask)
    assert torch.equal(x, keep)  # a new tensor: the batch's target, read separately, is never touched
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])  # input samples: unchanged
    for i in (0, 2):
        assert (y[i] - x[i]).abs().mean() > 0.01  # blurred, noisy, JPEG
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(apply_view(x, draw, mask), y)  # deterministic from the draw
    assert torch.equal(apply_view(x, draw_view(StrongView(p=0.0), 4, np.random.default_rng(0))), x)
    with pytest.raises(ValueError, match="expected"):
        apply_view(x[:2], draw)


def test_view_keeps_colours() -> None:
    """No photometric jitter: the per-channel means stay (blur and zero-mean noise keep them; JPEG nearly)."""
    x = _images(8, 64)
    y = apply_view(x, draw_view(StrongView(enabled=True, p=1.0), 8, np.random.default_rng(2)))
    assert (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().max() < 0.02


def test_config_keys_and_the_sup_control() -> None:
    cfg = load_config(overrides={"train": {"strong_view": {"enabled": True, "p": 0.3},
                                           "losses": {"sup": {"strong_view": True}}}})
    assert cfg.train.strong_view.enabled and cfg.train.strong_view.p == 0.3
    assert cfg.train.losses.sup.strong_view
    assert load_config(None).train.strong_view.enabled is False  # off unless asked for
