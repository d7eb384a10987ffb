"""The paper's ensemble (0.4 MUSIQ-KonIQ + 0.4 BRISQUE + 0.2 CLIP-IQA) end to end, with random-weight files.

MUSIQ-KonIQ and CLIP RN50 files with random weights are placed in a temporary
pyiqa/torch cache (see ``iqa_fixtures.random_weight_cache``) and loaded by the
same code path as the real ones: config/paper.yaml -> Ensemble / Reward ->
create_metric -> pyiqa's loaders reading the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from iqa_fixtures import natural_images, prepared, random_weight_cache  # noqa: F401  (fixtures)
from torch import nn

from qtlib.config import load_config
from qtlib.iqa import CATALOG, Ensemble, Reward, pyiqa_cache_dir

PAPER = Path(__file__).resolve().parents[1] / "config" / "paper.yaml"


@pytest.fixture(scope="module")
def paper_cfg(random_weight_cache):  # noqa: F811
    return load_config(PAPER).iqa


def test_paper_config_is_the_paper_ensemble(paper_cfg) -> None:
    assert [(m.metric, m.weight) for m in paper_cfg.ensemble] == [("musiq", 0.4), ("brisque", 0.4), ("clipiqa", 0.2)]


def test_paper_ensemble_loads_from_the_cache(paper_cfg, random_weight_cache: Path) -> None:  # noqa: F811
    assert pyiqa_cache_dir() == random_weight_cache / "hub" / "pyiqa"
    assert all(w.present() for m in ("musiq", "clipiqa", "brisque") for w in CATALOG[m].weights)
    ensemble = Ensemble(paper_cfg)
    assert ensemble.members == ("musiq", "brisque", "clipiqa")
    assert ensemble.weights == pytest.approx((0.4, 0.4, 0.2))
    versions = ensemble.versions()
    assert "musiq_koniq_ckpt-e95806b9.pth@sha256:" in versions["musiq"]
    assert "RN50.pt@sha256:" in versions["clipiqa"]

    # MUSIQ rescales every input to 224 and 384 px and CLIP-IQA encodes its prompts
    # on every call: one 128 px image keeps this test short on a CPU
    x = natural_images(1, 128)
    scores = ensemble.score(x)
    assert all(v.shape == (1,) for v in scores.raw.values())
    expected = 10 * sum(w * scores.normalized[m] for m, w in zip(ensemble.members, ensemble.weights))
    assert torch.allclose(scores.S, expected)
    blocks = ensemble.score_blocks(x)
    assert blocks.S.shape == (1, 2, 2)
    crop = ensemble.score(x[..., 64:, :64])  # block (1, 0)
    for m, atol in (("musiq", 1e-3), ("clipiqa", 1e-4), ("brisque", 0.05)):
        assert torch.allclose(blocks.raw[m][:, 1, 0], crop.raw[m], atol=atol), m


def test_paper_reward_gradients_and_eval_mode(paper_cfg) -> None:
    reward = Reward(paper_cfg)
    assert reward.members == ("musiq", "brisque", "clipiqa") and reward.excluded == ()
    assert reward.weights == pytest.approx((0.4, 0.4, 0.2))
    parent = nn.ModuleDict({"student": nn.Conv2d(3, 3, 1), "reward": reward})
    parent.train()
    assert not any(m.training for m in reward.metrics.modules())
    assert all(not p.requires_grad for p in reward.parameters())
    x = natural_images(1, 96).requires_grad_(True)
    terms = reward.scores(x)
    assert terms.S.requires_grad and terms.S.shape == (1,)
    for m in ("musiq", "clipiqa"):  # the learned members pass gradients (random weights)
        (g,) = torch.autograd.grad(terms.raw[m].sum(), x, retain_graph=True)
        assert g.abs().sum() > 0, m
