"""Fitting the learned member (qtlib.reward_fit) on real paired stores, a real backbone and real labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qtlib.config import ModelConfig, UNetConfig
from qtlib.config.types import RewardConfig
from qtlib.data.store import StoreWriter, commit_path
from qtlib.iqa.learned import HeadConfig, LiteFeatures, QualityHead, read_learned
from qtlib.models import Checkpoint, build_model, save_checkpoint
from qtlib.reward_fit import (
    FAMILIES,
    STUDENT,
    build_ladders,
    fit_reward,
    ladder,
    quality_label,
    ranking_loss,
    ranking_pairs,
    within_image_spearman,
)

SIZE = 96


def _photos(n: int) -> np.ndarray:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    out = []
    for k in range(n):
        p = photos[k % len(photos)]
        y, x = (41 * k) % (p.shape[0] - SIZE), (67 * k) % (p.shape[1] - SIZE)
        out.append(np.ascontiguousarray(p[y:y + SIZE, x:x + SIZE]))
    return np.stack(out)


def _write(path: Path, images: np.ndarray) -> None:
    writer = StoreWriter(path, len(images), SIZE)
    for i, img in enumerate(images):
        writer.append(f"p{i}", img)
    writer.close({})
    commit_path(writer.tmp, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward")
    clean = _photos(8)
    rng = np.random.default_rng(0)
    streaks = (rng.random(clean.shape[:3]) < 0.03)[..., None] * 110
    degraded = np.clip(clean.astype(np.float32) + streaks + rng.normal(0, 8, clean.shape), 0, 255).astype(np.uint8)
    _write(root / "paired" / "clean.zarr", clean)
    _write(root / "paired" / "degraded.zarr", degraded)
    torch.manual_seed(0)
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    model = save_checkpoint(root / "pretrained.pt", Checkpoint("pretrain", cfg, build_model(cfg).state_dict()))
    return {"root": root, "paired": root / "paired", "pretrained": model}


CFG = RewardConfig(crop=96, holdout=0.25, steps=150, hidden=32)


def test_ladder_families_and_labels() -> None:
    g = torch.Generator().manual_seed(0)
    c = torch.rand(3, 64, 64, generator=g)
    d = (c + 0.3 * torch.rand(3, 64, 64, generator=g)).clamp(0, 1)
    cands, names = ladder(d, c, (c + d) / 2, seed=0)
    assert len(names) == sum(len(v) for v in FAMILIES.values()) == len(cands)
    assert [f for f, _ in names][:2] == ["input", "clean"] and torch.equal(cands[1], c)
    with_students = ladder(d, c, (c + d) / 2, 0, students=[(0.0, d), (7.0, c)])[1]
    assert with_students[-2:] == [(STUDENT, 0.0), (STUDENT, 7.0)]
    q = quality_label(torch.tensor([float("inf"), 30.0, 14.0]), torch.tensor([1.0, 0.8, 0.2]))
    assert q[0] == 10.0 and q[0] > q[1] > q[2] and q[2] == pytest.approx(1.0)  # PSNR below 15 counts 0


def test_ranking_loss_hand_values() -> None:
    s = torch.tensor([2.0, 1.0, 0.0, 5.0])
    q = torch.tensor([3.0, 2.0, 1.0, 0.0])
    ladder_id = torch.tensor([0, 0, 0, 1])  # image 1 has one candidate: no pair
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = np.mean([np.log1p(np.exp(-(float(s[i]) - float(s[j])))) for i, j in pairs])
    got = ranking_pairs(q, ladder_id)
    assert sorted(zip(got[0].tolist(), got[1].tolist(), strict=True)) == pairs
    assert float(ranking_loss(s, got)) == pytest.approx(want, rel=1e-6)
    ties = ranking_pairs(torch.tensor([1.0, 1.02, 1.0, 1.0]), ladder_id)
    assert len(ties[0]) == 0 and float(ranking_loss(s, ties)) == 0.0  # ties: no pair


def test_fit_improves_held_out_ranking_and_writes_a_complete_file(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "reward" / "model.pt"
    result = fit_reward(world["paired"], world["pretrained"], out, CFG, seed=0, report=tmp_path / "report.md",
                        table=tmp_path / "report.parquet", device="cpu")
    assert result.n_held == 2 and result.n_fit == 6
    fitted = read_learned(out)
    assert fitted.meta["n_held_images"] == 2 and fitted.meta["pretrained"] and fitted.meta["config"]["steps"] == 150
    held = pd.read_parquet(tmp_path / "report.parquet")
    assert set(held["ladder"].unique()) and len(held) == 2 * sum(len(v) for v in FAMILIES.values())
    fitted_rho = within_image_spearman(held, "liteiqa", "q")
    # the same features through an unfitted head (the fit's standardization, random weights): no ranking
    features = LiteFeatures()
    ladders = build_ladders(world["paired"], world["pretrained"], CFG, 0, features, torch.device("cpu"))
    torch.manual_seed(1)
    raw = QualityHead(HeadConfig(features.dim, CFG.hidden))
    raw.set_standardization(ladders.features)
    with torch.no_grad():
        frame = ladders.frame.assign(raw=raw(ladders.features).numpy())
    unfitted_rho = within_image_spearman(frame[frame["ladder"].isin(held["ladder"].unique())], "raw", "q")
    assert fitted_rho > 0.5 and fitted_rho > unfitted_rho + 0.3
    text = (tmp_path / "report.md").read_text()
    assert "liteiqa vs q" in text and "brisque vs q" in text and "| all |" in text
    clean = held.loc[held["family"] == "clean", "liteiqa"]
    assert fitted.cap >= clean.min() - 1e-6  # the cap sits at the clean images' level


def test_refresh_adds_the_students_restorations(world: dict[str, Path], tmp_path: Path) -> None:
    features = LiteFeatures()
    ladders = build_ladders(world["paired"], world["pretrained"], CFG, 0, features, torch.device("cpu"),
                            students=[(world["pretrained"], (0.0, 7.0))])
    student = ladders.frame[ladders.frame["family"] == STUDENT]
    assert len(student) == 2 * 8 and sorted(student["param"].unique()) == [0.0, 7.0]
    assert np.isfinite(student["q"]).all() and len(ladders.features) == len(ladders.frame)
    out = fit_reward(world["paired"], world["pretrained"], tmp_path / "r1.pt", replace(CFG, steps=20), seed=0,
                     students=[(world["pretrained"], (7.0,))], device="cpu")
    assert out.report is None and read_learned(out.model).meta["students"]
