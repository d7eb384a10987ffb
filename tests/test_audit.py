"""qtlib.audit and qt audit on a real two-round results folder (prepare -> label -> gate, twice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from qtlib import audit
from qtlib.augment import get_augmentations, restore_augmented
from qtlib.cli import main
from qtlib.config import GateConfig, IQAConfig, LabelConfig, ModelConfig, UNetConfig
from qtlib.config.types import DataConfig, Member
from qtlib.data import ImageStore, prepare_images
from qtlib.gate import run_gate
from qtlib.label import label_shard
from qtlib.layout import Layout
from qtlib.models import Checkpoint, build_model, load_model, save_checkpoint
from qtlib.runtime import file_hash

IQA = IQAConfig(ensemble=(Member("brisque", 1.0),), blocks=(2, 2), batch_size=8)
AUGS = ["hflip", "vflip", "rot90"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A results folder with rounds 0 and 1 labeled (2 shards) and gated; the same teacher labels both."""
    root = tmp_path_factory.mktemp("audit")
    layout = Layout(root / "results")
    rng = np.random.default_rng(0)
    from skimage import data

    photo = data.astronaut()
    for i in range(3):
        crop = photo[40 * i:40 * i + 80, 30 * i:30 * i + 96]
        noisy = np.clip(crop + rng.normal(0, 8, crop.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"img_{i}.png")
    prepare_images(root, layout.prepared("unlabeled"), DataConfig(size=64, min_size=16, geometry="square"))
    torch.manual_seed(0)
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    model = build_model(cfg)
    with torch.no_grad():  # position-dependent, so the augmentations give different labels
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    layout.pretrained.parent.mkdir(parents=True)
    save_checkpoint(layout.pretrained, Checkpoint("pretrain", cfg, model.state_dict()))
    for r in range(2):
        for k in range(2):
            label_shard(layout.pretrained, layout.unlabeled_images, k, 2, layout.label_store(r, k),
                        layout.ledger(r, k), r, IQA, LabelConfig(batch_size=2), device="cpu", progress=False)
        run_gate([layout.ledger(r, k) for k in range(2)], layout.bank(r - 1) if r else None,
                 GateConfig(quantile=0.95), 3, layout.gate(r), layout.bank(r))
    return layout


def _ids(layout: Layout) -> pd.DataFrame:
    return pd.read_parquet(layout.manifest("unlabeled")).set_index("path")


def test_smoke_trace_has_every_label_of_every_round(run: Layout) -> None:
    image_id = _ids(run).loc["img_1.png", "id"]
    trail = audit.trace(run.root, image_id)
    assert trail[["round", "augmentation"]].values.tolist() == [[r, a] for r in (0, 1) for a in AUGS]
    assert (trail["image_id"] == image_id).all()
    assert set(trail["teacher_hash"]) == {file_hash(run.pretrained)}
    gate = pd.concat([pd.read_parquet(run.gate(r)) for r in (0, 1)]).set_index(["image_id", "round"])
    for row in trail.itertuples():
        assert row.gate_decision == gate.loc[(image_id, row.round), "decision"]
        assert row.gate_tau1 == gate.loc[(image_id, row.round), "tau1"]
        assert row.label_store == f"round_{row.round}/labels/shard_{row.shard}.zarr"


def test_bank_entries_match_the_banks(run: Layout) -> None:
    for path, image_id in _ids(run)["id"].items():
        trail = audit.trace(run.root, path)  # by manifest path
        banked = {(q, int(row.round), row.augmentation) for row in trail.itertuples() for q in row.banked_in}
        expected = set()
        for q in (0, 1):
            bank = pd.read_parquet(run.bank(q))
            bank = bank[bank["image_id"] == image_id]
            expected |= {(q, int(r), str(a)) for r, a in zip(bank["round"], bank["augmentation"], strict=True)}
        assert banked == expected
        assert all(len(b) == len(k) for b, k in zip(trail["banked_in"], trail["bank_rank"], strict=True))


def test_pseudo_label_is_the_teachers_label_of_that_image(run: Layout) -> None:
    manifest = _ids(run)
    images = ImageStore(run.unlabeled_images)
    model = load_model(run.pretrained)
    augs = get_augmentations(AUGS)
    for path in ("img_0.png", "img_2.png"):
        image_id = manifest.loc[path, "id"]
        x = images.read_tensor([images.index_of(image_id)])
        with torch.no_grad():
            expected = restore_augmented(lambda t: model(t, 7.0), x, augs).clamp(0, 1).mul(255).round()
        for k, name in enumerate(AUGS):
            label = audit.pseudo_label(run.root, 1, image_id, name)
            assert label.shape == (64, 64, 3) and label.dtype == np.uint8
            assert np.array_equal(label, expected[0, k].byte().numpy().transpose(1, 2, 0))
            assert np.array_equal(label, audit.pseudo_label(run.root, 1, image_id, k))


def test_exception_unknown_image_round_or_augmentation(run: Layout) -> None:
    with pytest.raises(KeyError, match="neither an image id nor a path"):
        audit.trace(run.root, "no_such.png")
    image_id = _ids(run).loc["img_0.png", "id"]
    with pytest.raises(KeyError, match=r"no label in round 5 .*has: none"):
        audit.pseudo_label(run.root, 5, image_id, "hflip")
    with pytest.raises(KeyError, match=r"has: hflip, vflip, rot90"):
        audit.pseudo_label(run.root, 0, image_id, "transpose")


def test_cli_audit_prints_the_trail_and_writes_pngs(run: Layout, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    image_id = _ids(run).loc["img_2.png", "id"]
    assert main(["audit", "img_2.png", "--results-dir", str(run.root), "--round", "1", "--out",
                 str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert f"image {image_id}: 3 labels" in printed and "gate_decision" in printed
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["input.png", "round_1_hflip.png", "round_1_rot90.png", "round_1_vflip.png", "trace.parquet"]
    png = np.asarray(Image.open(tmp_path / "a" / "round_1_vflip.png"))
    assert np.array_equal(png, audit.pseudo_label(run.root, 1, image_id, "vflip"))
    assert main(["audit", "nope", "--results-dir", str(run.root)]) == 1
