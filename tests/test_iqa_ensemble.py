"""Ensemble: weights, S on the 0..10 scale, batching, block scores equal to explicitly cropped blocks."""

from __future__ import annotations

import pyiqa
import pytest
import torch
from iqa_fixtures import natural_images, prepared  # noqa: F401  (fixture)

from qtlib.config.types import IQAConfig, Member
from qtlib.iqa import Ensemble, UnknownMetricError, normalize, split_blocks

# BRISQUE in float32 moves by ~0.01 with the batch it is computed in (oneDNN
# reductions); NIQE computes in float64 and is batch-independent.
RAW_ATOL = {"brisque": 0.05, "niqe": 1e-4, "piqe": 1e-3}


def _cfg(*members: tuple[str, float], batch_size: int = 16, blocks: tuple[int, int] = (2, 2)) -> IQAConfig:
    return IQAConfig(ensemble=tuple(Member(m, w) for m, w in members), blocks=blocks, batch_size=batch_size)


@pytest.fixture(scope="module")
def ensemble(prepared) -> Ensemble:  # noqa: F811
    return Ensemble(_cfg(("brisque", 3.0), ("niqe", 1.0)))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    clean = natural_images(4, 200)
    return torch.cat([clean[:2], (clean[2:] + 0.08 * torch.randn_like(clean[2:])).clamp(0, 1)])


def test_smoke_members_and_renormalized_weights(ensemble: Ensemble) -> None:
    assert ensemble.members == ("brisque", "niqe")
    assert ensemble.weights == pytest.approx((0.75, 0.25))


def test_score_cardinality_and_scale(ensemble: Ensemble, images: torch.Tensor) -> None:
    scores = ensemble.score(images)
    assert set(scores.raw) == set(scores.normalized) == {"brisque", "niqe"}
    for m in ensemble.members:
        assert scores.raw[m].shape == scores.normalized[m].shape == (4,)
        assert torch.equal(scores.normalized[m], normalize(m, scores.raw[m]))
    expected = 10 * (0.75 * scores.normalized["brisque"] + 0.25 * scores.normalized["niqe"])
    assert torch.allclose(scores.S, expected)
    assert ((scores.S >= 0) & (scores.S <= 10)).all()
    assert (scores.S[:2].mean() > scores.S[2:].mean()), "clean crops score above their noisy copies"


def test_batch_size_does_not_change_scores(ensemble: Ensemble, images: torch.Tensor) -> None:
    small = Ensemble(_cfg(("brisque", 3.0), ("niqe", 1.0), batch_size=3))
    a, b = ensemble.score(images), small.score(images)
    for m in ensemble.members:
        assert torch.allclose(a.raw[m], b.raw[m], atol=RAW_ATOL[m], rtol=0)


def test_split_blocks_layout() -> None:
    x = torch.arange(2 * 1 * 5 * 7, dtype=torch.float32).view(2, 1, 5, 7)
    blocks = split_blocks(x, (2, 3))
    assert blocks.shape == (12, 1, 2, 2)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                assert torch.equal(blocks[b * 6 + i * 3 + j], x[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2])


def test_block_scores_equal_scores_of_cropped_blocks(ensemble: Ensemble, images: torch.Tensor) -> None:
    # 200 x 199: blocks of 100 x 99 (one column left over), NIQE still sees >= 96 px
    x = images[..., :199]
    blocks = ensemble.score_blocks(x)
    assert blocks.grid == (2, 2) and blocks.S.shape == (4, 2, 2)
    for i in range(2):
        for j in range(2):
            crop = x[..., 100 * i : 100 * (i + 1), 99 * j : 99 * (j + 1)]
            single = ensemble.score(crop)
            for m in ensemble.members:
                assert torch.allclose(blocks.raw[m][:, i, j], single.raw[m], atol=RAW_ATOL[m], rtol=0), (m, i, j)
            assert torch.allclose(blocks.S[:, i, j], single.S, atol=0.01)


def test_block_scores_use_one_call_per_metric(ensemble: Ensemble, images: torch.Tensor,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    for name, metric in ensemble.metrics.items():
        forward = metric.forward

        def counted(x, *a, _name=name, _forward=forward, **k):
            calls.append((_name, x.shape[0]))
            return _forward(x, *a, **k)

        monkeypatch.setattr(metric, "forward", counted)
    ensemble.score_blocks(images)  # 4 images x 4 blocks, batch_size 16 -> one call of 16 blocks
    assert sorted(calls) == [("brisque", 16), ("niqe", 16)]
    calls.clear()
    Ensemble.score_blocks(ensemble, torch.cat([images] * 5), grid=(2, 2))  # 80 blocks: 64 + 16
    assert sorted(calls) == [("brisque", 16), ("brisque", 64), ("niqe", 16), ("niqe", 64)]


def test_block_grid_other_than_default(ensemble: Ensemble) -> None:
    x = natural_images(2, 192)
    blocks = ensemble.score_blocks(x, grid=(1, 2))
    assert blocks.S.shape == (2, 1, 2) and blocks.raw["niqe"].shape == (2, 1, 2)


def test_versions(ensemble: Ensemble) -> None:
    v = ensemble.versions()
    assert v["pyiqa"] == pyiqa.__version__
    assert v["brisque"].startswith(f"pyiqa-{pyiqa.__version__}/brisque/BRISQUE/brisque_svm_weights.pth@sha256:")
    assert "niqe_modelparameters.mat@sha256:" in v["niqe"]


def test_exception_bad_inputs(ensemble: Ensemble) -> None:
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, H, W\)"):
        ensemble.score(torch.rand(3, 128, 128))
    with pytest.raises(ValueError, match=r"images: values must be in \[0, 1\]"):
        ensemble.score(torch.rand(1, 3, 128, 128) * 2)
    with pytest.raises(ValueError, match="images: expected a floating point"):
        ensemble.score(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="niqe's minimum side 96"):
        ensemble.score_blocks(torch.rand(1, 3, 128, 128))


def test_exception_bad_members(prepared) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="listed twice"):
        Ensemble(_cfg(("brisque", 1.0), ("brisque", 1.0)))
    with pytest.raises(ValueError, match="needs a reference"):
        Ensemble(_cfg(("psnr", 1.0)))
    with pytest.raises(ValueError, match="sum to > 0"):
        Ensemble(_cfg(("brisque", 0.0)))
    with pytest.raises(UnknownMetricError, match="unknown metric 'musiq-koniq'"):
        Ensemble(_cfg(("musiq-koniq", 1.0)))


def test_constant_and_nonfinite_images_score_nan_never_assert(ensemble: Ensemble, images: torch.Tensor) -> None:
    """pyiqa asserts on a batch of constant images (BRISQUE/NIQE fit local contrast): they get NaN instead."""
    from qtlib.iqa.ensemble import unscorable

    flat = torch.full((2, 3, 200, 200), 0.4)
    flat[1, 1] = 0.7  # constant per channel, still no variation
    assert unscorable(flat).tolist() == [True, True] and not unscorable(images).any()
    alone = ensemble.score(flat)  # the whole batch constant: pyiqa's assertion case
    assert all(torch.isnan(v).all() for v in alone.raw.values()) and torch.isnan(alone.S).all()
    mixed = torch.cat([images[:1], flat[:1]])
    scores = ensemble.score(mixed)
    assert torch.isfinite(scores.S[0]) and torch.isnan(scores.S[1])
    assert torch.allclose(scores.S[0], ensemble.score(images[:1]).S[0])
    half = images[:1].clone()
    half[..., :100, :100] = 0.0  # one constant block of a 2x2 grid
    blocks = ensemble.score_blocks(half, (2, 2))
    assert torch.isnan(blocks.S[0, 0, 0]) and torch.isfinite(blocks.S[0, 1:]).all()
