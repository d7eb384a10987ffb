"""The learned member liteiqa (qtlib.iqa.learned): its backbone, its file, its defenses, its place in the ensemble."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from qtlib.config.types import IQAConfig, LearnedConfig, Member
from qtlib.iqa import Ensemble, Reward, create_metric, get_info
from qtlib.iqa.learned import (
    BACKBONE_SHA256,
    Defenses,
    HeadConfig,
    LearnedFile,
    LearnedFileError,
    LearnedIQA,
    LiteFeatures,
    QualityHead,
    backbone_file,
    load_backbone,
    normalize_input,
    read_learned,
    save_learned,
)
from qtlib.runtime import file_hash


@pytest.fixture(scope="module")
def features() -> LiteFeatures:
    return LiteFeatures()


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photo, shorter side resized to 256 (bicubic) and center-cropped to ``size``, in [0, 1]."""
    from skimage import data

    x = torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1).float().div(255)[None]
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bicubic", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


def test_backbone_classifies_coffee_as_espresso() -> None:
    """A broken load (a key mapped wrong, the wrong timm variant, the wrong normalization) cannot pass."""
    assert file_hash(backbone_file()) == BACKBONE_SHA256[:16]
    net = load_backbone()
    with torch.no_grad():
        probs = net(normalize_input(torch.cat([_photo("coffee"), _photo("chelsea")]))).softmax(-1)
    assert int(probs[0].argmax()) == 967 and probs[0, 967] > 0.9  # espresso
    assert int(probs[1].argmax()) in (281, 282, 285) and probs[1, 281:286].sum() > 0.8  # a cat (285: Egyptian)


def test_features_shape_frozen_and_differentiable_to_the_input(features: LiteFeatures) -> None:
    x = torch.rand(2, 3, 96, 80, requires_grad=True)
    f = features(x)
    assert f.shape == (2, features.dim) and features.dim == 2 * (24 + 40 + 112 + 320)
    f.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in features.parameters())
    torch.nn.Sequential(features).train()
    assert not features.training  # batch norm stays in eval mode inside a training parent


def _fitted(dim: int, cap: float = 6.0) -> LearnedFile:
    torch.manual_seed(0)
    head = QualityHead(HeadConfig(dim))
    with torch.no_grad():  # scores inside the 0..10 scale (outside it the ensemble's clamp stops gradients)
        head.mlp[2].weight.mul_(0.1)
        head.mlp[2].bias.fill_(5.0)
    return LearnedFile(head.state_dict(), head.cfg, cap, {"note": "test"})


def test_file_round_trip_weights_only_and_errors(tmp_path: Path, features: LiteFeatures) -> None:
    path = save_learned(tmp_path / "m.pt", _fitted(features.dim))
    raw = torch.load(path, weights_only=True)  # tensors and plain values only
    assert raw["kind"] == "qtlib-learned-iqa" and raw["backbone"]["sha256"] == BACKBONE_SHA256
    back = read_learned(path)
    assert back.cap == 6.0 and back.meta == {"note": "test"} and back.head_config.features == features.dim
    with pytest.raises(LearnedFileError, match="no such file"):
        read_learned(tmp_path / "missing.pt")
    torch.save({"kind": "other"}, tmp_path / "other.pt")
    with pytest.raises(LearnedFileError, match="not a fitted liteiqa file"):
        read_learned(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(LearnedFileError, match="not a readable model file"):
        read_learned(tmp_path / "junk.pt")


def test_cap_and_transforms(tmp_path: Path, features: LiteFeatures) -> None:
    path = save_learned(tmp_path / "m.pt", _fitted(features.dim))
    x = torch.rand(3, 3, 64, 64)
    plain = LearnedIQA.load(path, Defenses(cap=False), features=features)
    raw = plain(x)
    cap = float(raw.min()) - 1e-3  # a cap below every score: they all sit at it
    capped = LearnedIQA(read_learned(path), Defenses(cap=True), features)
    capped.cap = cap
    assert torch.allclose(capped(x), torch.minimum(raw, torch.tensor(cap)))
    y = x.clone().requires_grad_(True)
    capped(y).sum().backward()
    assert y.grad.abs().sum() == 0  # above the cap no gradient can raise the score further
    tta = LearnedIQA.load(path, Defenses(cap=False, transforms=4, seed=1), features=features)
    again = LearnedIQA.load(path, Defenses(cap=False, transforms=4, seed=1), features=features)
    assert torch.equal(tta(x), again(x)) and not torch.allclose(tta(x), raw)  # reproducible, and not the plain score
    with pytest.raises(ValueError, match="at least 32 px"):
        plain(torch.rand(1, 3, 16, 64))
    assert plain.provenance().endswith(file_hash(path))


def test_catalog_factory_ensemble_and_reward(tmp_path: Path, features: LiteFeatures) -> None:
    info = get_info("liteiqa")
    assert info.source == "qtlib" and not info.lower_better and info.differentiable and info.weights[0].present()
    with pytest.raises(ValueError, match="no fitted model file"):
        create_metric("liteiqa")
    path = save_learned(tmp_path / "m.pt", _fitted(features.dim))
    learned = LearnedConfig(path=str(path), cap=False)
    x = torch.rand(2, 3, 64, 64)
    metric = create_metric("liteiqa", learned=learned)
    ens = Ensemble(IQAConfig(ensemble=(Member("liteiqa", 1.0),), learned=learned))
    scores = ens.score(x)
    assert torch.allclose(scores.raw["liteiqa"], metric(x)) and torch.allclose(scores.S, metric(x).clamp(0, 10))
    assert ens.versions()["liteiqa"].endswith(file_hash(path))  # the ledger's record of which file scored
    # with a learned member, BRISQUE passes no gradient by default (auto), as in the authors' code
    both = IQAConfig(ensemble=(Member("liteiqa", 0.5), Member("brisque", 0.5)), learned=learned)
    reward = Reward(both)
    assert reward.constant == frozenset({"brisque"})
    forced = IQAConfig(ensemble=(Member("liteiqa", 0.5), Member("brisque", 0.5, grad=True)), learned=learned)
    assert Reward(forced).constant == frozenset()
    assert Reward(IQAConfig(ensemble=(Member("brisque", 1.0),))).constant == frozenset()  # alone: it is the reward
    y = x.clone().requires_grad_(True)
    reward(y).sum().backward()
    assert y.grad.abs().sum() > 0 and math.isfinite(float(y.grad.abs().sum()))


def test_qt_score_with_the_learned_member(tmp_path: Path, features: LiteFeatures,
                                          capsys: pytest.CaptureFixture) -> None:
    """``qt score --metrics liteiqa --reward PATH`` and ``qt score --config C --reward PATH`` (the config's
    ensemble with the learned member in it)."""
    import yaml
    from PIL import Image
    from skimage import data

    from qtlib.cli import main as qt

    path = save_learned(tmp_path / "m.pt", _fitted(features.dim))
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()[:128, :128]).save(folder / f"{name}.png")
    alone = tmp_path / "alone.parquet"
    assert qt(["score", "--metrics", "liteiqa", "--reward", str(path), str(folder), "--out", str(alone)]) == 0
    frame = pd.read_parquet(alone)
    assert list(frame.columns) == ["path", "liteiqa", "liteiqa_norm", "S"] and frame["liteiqa"].notna().all()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"iqa": {"ensemble": [{"metric": "liteiqa", "weight": 0.5},
                                                           {"metric": "brisque", "weight": 0.5}]}}))
    both = tmp_path / "both.parquet"
    assert qt(["score", "--config", str(config), "--reward", str(path), str(folder), "--out", str(both)]) == 0
    frame2 = pd.read_parquet(both)
    assert {"liteiqa", "brisque", "S"} <= set(frame2.columns)
    assert frame2["liteiqa"].tolist() == pytest.approx(frame["liteiqa"].tolist(), abs=1e-5)
    capsys.readouterr()
    assert qt(["score", "--metrics", "liteiqa", "--reward", str(tmp_path / "nope.pt"), str(folder)]) != 0
    assert "nope.pt: no such file" in capsys.readouterr().err
    assert qt(["score", "--metrics", "brisque", "--reward", str(path), str(folder)]) != 0  # nothing would use it
    assert "--reward: no metric of brisque uses a fitted file" in capsys.readouterr().err
