"""The label stage on real Zarr stores with real pyiqa metrics and a real (tiny) teacher."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from qtlib.augment import get_augmentations, restore_augmented
from qtlib.config import GateConfig, IQAConfig, LabelConfig, ModelConfig, UNetConfig
from qtlib.data import ImageStore
from qtlib.data.store import StoreWriter, commit_path
from qtlib.gate import gate_round
from qtlib.label import label_shard, shard_indices
from qtlib.layout import label_store_in, ledger_in
from qtlib.ledger import ledger_schema, load, read_ledger
from qtlib.models import Checkpoint, build_model, load_model, save_checkpoint

SIZE = 192  # NIQE scores 96 px blocks, so 2x2 blocks need 192 px
IQA = IQAConfig(batch_size=8)


def _photo_crops(n: int) -> np.ndarray:
    """n crops (uint8, n x 3 x 192 x 192) of skimage photos, with a flat gray image last."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n - 1):
        p = photos[i % len(photos)]
        y, x = (i * 37) % (p.shape[0] - SIZE), (i * 53) % (p.shape[1] - SIZE)
        out.append(p[y:y + SIZE, x:x + SIZE].transpose(2, 0, 1))
    out.append(np.full((3, SIZE, SIZE), 128, dtype=np.uint8))  # a flat image: the metrics must not crash
    return np.stack(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("label")
    pixels = _photo_crops(6)
    writer = StoreWriter(root / "images.zarr", len(pixels), SIZE)
    for i, img in enumerate(pixels):
        writer.append(f"img{i}", img.transpose(1, 2, 0))
    writer.close({})
    commit_path(writer.tmp, root / "images.zarr")
    torch.manual_seed(0)
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    model = build_model(cfg)
    with torch.no_grad():  # make the teacher position-dependent so augmentations give different labels
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    teacher = save_checkpoint(root / "teacher.pt", Checkpoint("pretrain", cfg, model.state_dict()))
    return {"root": root, "images": root / "images.zarr", "teacher": teacher}


@pytest.fixture(scope="module")
def labeled(setup: dict[str, Path]) -> Path:
    """Two shards labeled concurrently (two threads, as two Snakemake jobs would)."""
    out = setup["root"] / "round_0"
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            label_shard(setup["teacher"], setup["images"], k, 2, label_store_in(out, k), ledger_in(out, k), 0, IQA, LabelConfig(batch_size=2),
                        device="cpu", progress=False)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def test_shard_indices_partition() -> None:
    parts = [shard_indices(10, k, 3) for k in range(3)]
    assert np.array_equal(np.concatenate(parts), np.arange(10))
    with pytest.raises(ValueError, match="shard"):
        shard_indices(10, 3, 3)


def test_ledger_has_three_rows_per_image_and_its_schema(labeled: Path) -> None:
    for k in range(2):
        path = labeled / "ledger" / f"shard_{k}.parquet"
        assert pq.read_schema(path).equals(ledger_schema(["brisque", "niqe"]), check_metadata=False)
    ledger = load(labeled.parent)
    assert len(ledger) == 18
    assert ledger.groupby("image_id").size().eq(3).all()
    assert set(ledger["augmentation"]) == {"hflip", "vflip", "rot90"}
    assert ledger["source_index"].nunique() == 6
    assert json.loads(ledger["metric_versions"].iloc[0])


def test_concurrent_shards_read_back_intact_and_match_ledger(labeled: Path, setup: dict[str, Path]) -> None:
    ledger = read_ledger([labeled / "ledger" / f"shard_{k}.parquet" for k in range(2)])
    model = load_model(setup["teacher"])
    images = ImageStore(setup["images"])
    augs = get_augmentations(["hflip", "vflip", "rot90"])
    for k in range(2):
        group = zarr.open_group(str(labeled / "labels" / f"shard_{k}.zarr"), mode="r")
        rows = shard_indices(6, k, 2)
        assert group["labels"].shape == (3, 3, 3, SIZE, SIZE) and group["labels"].dtype == np.uint8
        assert group.attrs["source_indices"] == rows.tolist()
        part = ledger[ledger["shard"] == k].sort_values(["index", "aug_index"])
        np.testing.assert_allclose(group["S"][:].reshape(-1), part["S"].to_numpy(), equal_nan=True)
        # The stored pixels are the teacher's labels under each augmentation, mapped back.
        with torch.no_grad():
            x = images.read_tensor(rows[:1])
            expected = restore_augmented(lambda t: model(t, 7.0), x, augs).clamp(0, 1).mul(255).round()
        assert torch.equal(torch.from_numpy(group["labels"][0:1]).float(), expected)
        blocks = np.stack(part["blocks_S"].to_numpy())
        np.testing.assert_allclose(group["blocks_S"][:].reshape(-1, 4), blocks, rtol=1e-6, equal_nan=True)


def test_mean_label_is_the_mean_of_the_views_stored_scored_and_gated(setup: dict[str, Path], tmp_path: Path) -> None:
    """label.mean_label: one more label per image, the pixel mean of the inverse-mapped views."""
    cfg = LabelConfig(batch_size=3, mean_label=True)
    assert cfg.label_names == ("hflip", "vflip", "rot90", "mean")
    out = tmp_path / "round_0"
    result = label_shard(setup["teacher"], setup["images"], 0, 1, label_store_in(out, 0), ledger_in(out, 0),
                         0, IQA, cfg, device="cpu", progress=False)
    assert result.n_rows == 24
    group = zarr.open_group(str(label_store_in(out, 0)), mode="r")
    assert group["labels"].shape == (6, 4, 3, SIZE, SIZE) and group.attrs["augmentations"][-1] == "mean"
    model = load_model(setup["teacher"])
    with torch.no_grad():
        x = ImageStore(setup["images"]).read_tensor(np.arange(2))
        views = restore_augmented(lambda t: model(t, 7.0), x, get_augmentations(["hflip", "vflip", "rot90"]))
    expected = views.mean(1).clamp(0, 1).mul(255).round()
    assert torch.equal(torch.from_numpy(group["labels"][0:2, 3]).float(), expected)
    assert not torch.equal(expected, views[:, 0].clamp(0, 1).mul(255).round())  # a label of its own
    ledger = load(tmp_path)
    assert ledger.groupby("image_id").size().eq(4).all() and (ledger["augmentation"] == "mean").sum() == 6
    mean_rows = ledger[ledger["augmentation"] == "mean"].sort_values("index")
    np.testing.assert_allclose(group["S"][:, 3], mean_rows["S"].to_numpy(), equal_nan=True)
    # a complete set is now 4 labels: the gate keeps the images whose 4 labels are all valid
    result = gate_round(ledger, None, GateConfig(), n_aug=len(cfg.label_names))
    assert set(result.bank["augmentation"]) <= set(cfg.label_names) and len(result.bank) > 0
    from qtlib.augment import pick_labels

    with pytest.raises(ValueError, match="neither a view"):
        pick_labels(views, ["hflip", "vflip", "rot90"], ["identity"])
    # label.view_labels: false -- the mean is each image's only label
    only = LabelConfig(batch_size=3, mean_label=True, view_labels=False)
    assert only.label_names == ("mean",)
    out1 = tmp_path / "round_1"
    label_shard(setup["teacher"], setup["images"], 0, 1, label_store_in(out1, 0), ledger_in(out1, 0), 1, IQA, only,
                device="cpu", progress=False)
    g1 = zarr.open_group(str(label_store_in(out1, 0)), mode="r")
    assert g1["labels"].shape == (6, 1, 3, SIZE, SIZE) and np.array_equal(g1["labels"][:, 0], group["labels"][:, 3])
    from qtlib.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="leaves no pseudo-label"):
        config_from_dict({"label": {"view_labels": False}})


def test_nan_scores_get_a_status_and_are_kept_out_of_the_bank(labeled: Path) -> None:
    from qtlib.iqa.ensemble import BlockScores, EnsembleScores
    from qtlib.label import _ledger_rows

    s = torch.tensor([5.0, float("nan"), 6.0])
    raw = {"brisque": torch.tensor([10.0, 20.0, float("inf")]), "niqe": torch.tensor([3.0, 4.0, 5.0])}
    scores = EnsembleScores(raw=raw, normalized={k: v / 100 for k, v in raw.items()}, S=s)
    blocks = BlockScores(raw={k: torch.zeros(3, 2, 2) for k in raw}, normalized={k: torch.zeros(3, 2, 2) for k in raw},
                         S=torch.zeros(3, 2, 2), grid=(2, 2))
    meta = {"round": 0, "shard": 0, "teacher_hash": "x", "metric_versions": "{}"}
    frame = _ledger_rows(["a"], np.array([0]), np.array([0]), ["hflip", "vflip", "rot90"], scores, blocks,
                         ["brisque", "niqe"], meta)
    assert list(frame["status"]) == ["ok", "nan_score", "nan_score"]
    ledger = load(labeled.parent)
    ledger["status"] = ledger["status"].astype(str)
    ledger.loc[ledger["image_id"] == ledger["image_id"].iloc[0], "status"] = "nan_score"
    result = gate_round(ledger, None, GateConfig(tau1=1.0, tau2=1.0), n_aug=3)
    assert result.counts["invalid"] == 1
    assert ledger["image_id"].iloc[0] not in set(result.bank["image_id"])


def test_rerun_replaces_store_atomically(labeled: Path, setup: dict[str, Path]) -> None:
    before = zarr.open_group(str(labeled / "labels" / "shard_0.zarr"), mode="r")["S"][:]
    label_shard(setup["teacher"], setup["images"], 0, 2, label_store_in(labeled, 0), ledger_in(labeled, 0), 0, IQA, LabelConfig(batch_size=2),
                device="cpu", progress=False)
    after = zarr.open_group(str(labeled / "labels" / "shard_0.zarr"), mode="r")["S"][:]
    np.testing.assert_array_equal(before, after)  # same teacher and batches: identical labels
    leftovers = [p.name for p in (labeled / "labels").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _broken_teacher(root: Path, kind: str) -> Path:
    """Finite weights whose labels are NaN (activations overflow) or constant (output pushed below 0, clamped)."""
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        if kind == "nan":
            for p in model.parameters():
                if p.ndim > 1:
                    p.mul_(1e25)
        else:
            head = next(m for n, m in model.named_modules() if n.split(".")[-1] == "head")
            head.weight.zero_()
            head.bias.fill_(-10.0)  # residual output x - 10, clamped to a black label
    return save_checkpoint(root / f"{kind}_teacher.pt", Checkpoint("pretrain", cfg, model.state_dict()))


@pytest.mark.parametrize(("kind", "status"), [("nan", "nonfinite_label"), ("constant", "constant_label")])
def test_teacher_with_nonfinite_or_constant_labels(setup: dict[str, Path], tmp_path: Path, kind: str,
                                                   status: str) -> None:
    """Real metrics, real stores: no traceback, every row marked, the gate keeps all of them out of the bank."""
    teacher = _broken_teacher(tmp_path, kind)
    out = tmp_path / "round_0"
    result = label_shard(teacher, setup["images"], 0, 1, label_store_in(out, 0), ledger_in(out, 0), 0, IQA,
                         LabelConfig(batch_size=3), device="cpu", progress=False)
    ledger = read_ledger([ledger_in(out, 0)])
    assert result.n_nan == result.n_rows == len(ledger) == 18
    assert set(ledger["status"].astype(str)) == {status}
    if kind == "nan":
        assert ledger["S"].isna().all()
    gate = gate_round(ledger, None, GateConfig(tau1=1.0, tau2=1.0), n_aug=3)
    assert gate.counts["invalid"] == 6 and gate.bank.empty


def test_label_status_constant_block() -> None:
    """A label with one flat block of its 2x2 grid is constant_label even when its whole-image scores are finite."""
    from qtlib.iqa.ensemble import BlockScores, EnsembleScores
    from qtlib.label import label_status

    labels = torch.rand(2, 3, 64, 64)
    labels[1, :, :32, :32] = 0.5
    fin = {"brisque": torch.tensor([1.0, 2.0])}
    scores = EnsembleScores(fin, fin, torch.tensor([5.0, 6.0]))
    blocks = BlockScores({"brisque": torch.ones(2, 2, 2)}, {"brisque": torch.ones(2, 2, 2)}, torch.ones(2, 2, 2),
                         (2, 2))
    status = label_status(torch.tensor([False, False]), labels, (2, 2), scores, blocks)
    assert list(status) == ["ok", "constant_label"]


def test_exception_ensemble_out_of_memory_names_the_images(setup: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """What a 6000x4000 label did with BRISQUE + NIQE on 24 GiB (NIQE asked for 27.5 GB): one clear message."""
    from qtlib.iqa import Ensemble
    from qtlib.label import LabelMemoryError

    def oom(self, images):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Ensemble, "score", oom)
    out = tmp_path / "round_0"
    with pytest.raises(LabelMemoryError, match=r"labeling .* px\): the IQA ensemble ran out of memory.*data.max_side"):
        label_shard(setup["teacher"], setup["images"], 0, 1, label_store_in(out, 0), ledger_in(out, 0), 0, IQA,
                    LabelConfig(batch_size=3), device="cpu", progress=False)
    assert not ledger_in(out, 0).exists()  # nothing partial is left as if complete
