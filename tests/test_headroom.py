"""The headroom table: per-image columns on hand-made tensors, the summary, and the stage on a real tiny teacher."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyiqa
import pytest
import torch
from iqa_fixtures import natural_images, prepared  # noqa: F401  (fixture)

from qtlib.augment import get_augmentations, restore_augmented
from qtlib.config import (
    DataConfig,
    IQAConfig,
    LabelConfig,
    Member,
    ModelConfig,
    UNetConfig,
)
from qtlib.data import ImageStore, prepare_paired
from qtlib.headroom import headroom, image_table, quantize, restore_labels
from qtlib.headroom_table import (
    UNRESTORED_MARGIN_DB,
    Headroom,
    headroom_schema,
    read_headroom,
    summarize,
    summarize_round,
    unrestored,
)
from qtlib.imageio import write_image
from qtlib.label import label_shard
from qtlib.layout import label_store_in, ledger_in
from qtlib.ledger import read_ledger, write_table
from qtlib.models import Checkpoint, build_model, load_model, save_checkpoint

VIEWS = ("hflip", "vflip", "rot90")
SIZE = 64
IQA = IQAConfig(ensemble=(Member("brisque", 1.0),), blocks=(2, 2), batch_size=16)


def exact_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """pyiqa's formula: 10 log10(1 / (MSE + 1e-8)) over all channels."""
    return 10 * torch.log10(1.0 / ((a - b) ** 2).mean(dim=(1, 2, 3)).add(1e-8))


# --------------------------------------------------------------------------- pure functions


def hand_made() -> dict:
    """Two images: hflip is the input passed through, vflip nearly the ground truth, rot90 worse than plain."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 16, 16, generator=g)
    x = (gt + 0.2 * torch.randn(2, 3, 16, 16, generator=g)).clamp(0, 1)
    plain = quantize(gt + 0.05 * torch.randn(2, 3, 16, 16, generator=g))
    views = quantize(torch.stack([x, gt + 0.01, (gt + 0.1 * torch.randn(2, 3, 16, 16, generator=g))], dim=1))
    labels = torch.cat([views, quantize(views.mean(1, keepdim=True))], dim=1)
    scores = torch.tensor([[2.0, 5.0, 9.0, 1.0], [float("nan"), 6.0, 3.0, 8.0]])  # S of hflip, vflip, rot90, mean
    return {"x": quantize(x), "gt": gt, "plain": plain, "labels": labels, "scores": scores}


def test_image_table_on_hand_made_tensors() -> None:
    t = hand_made()
    frame = image_table(["a", "b"], t["x"], t["gt"], t["plain"], t["labels"], t["scores"], VIEWS, VIEWS, exact_psnr)
    assert frame["psnr_plain"].to_numpy() == pytest.approx(exact_psnr(t["plain"], t["gt"]).numpy())
    for j, name in enumerate((*VIEWS, "mean")):
        assert frame[f"psnr_{name}"].to_numpy() == pytest.approx(exact_psnr(t["labels"][:, j], t["gt"]).numpy())
    # the mean column: the PSNR of the (quantized) pixel mean of the views
    mean = quantize(t["labels"][:, :3].mean(1))
    assert frame["psnr_mean"].to_numpy() == pytest.approx(exact_psnr(mean, t["gt"]).numpy())
    # a view identical to the input is unrestored, the others are not
    plain_in = frame["psnr_vs_input_plain"]
    assert unrestored(frame["psnr_vs_input_hflip"], plain_in).all() and frame["psnr_vs_input_hflip"].min() > 70
    assert not unrestored(frame["psnr_vs_input_vflip"], plain_in).any()
    # s_first: the largest finite S among the candidates (the mean is no candidate here); gt_best: largest PSNR
    assert list(frame["s_first"]) == ["rot90", "vflip"]
    assert frame["psnr_s_first"].to_numpy() == pytest.approx(frame[["psnr_rot90", "psnr_vflip"]].to_numpy().diagonal())
    assert list(frame["gt_best"]) == ["vflip", "vflip"]
    assert (frame["psnr_gt_best"] >= frame[[f"psnr_{v}" for v in VIEWS]].max(axis=1) - 1e-12).all()
    assert frame["S_mean"].tolist() == [1.0, 8.0] and math.isnan(frame["S_hflip"].iloc[1])
    with_mean = image_table(["a", "b"], t["x"], t["gt"], t["plain"], t["labels"], t["scores"], VIEWS,
                            (*VIEWS, "mean"), exact_psnr)
    assert list(with_mean["s_first"]) == ["rot90", "mean"]
    all_nan = torch.full_like(t["scores"], float("nan"))
    none = image_table(["a", "b"], t["x"], t["gt"], t["plain"], t["labels"], all_nan, VIEWS, VIEWS, exact_psnr)
    assert none["s_first"].isna().all() and none["psnr_s_first"].isna().all()


def test_exception_image_table_shapes() -> None:
    t = hand_made()
    with pytest.raises(ValueError, match="labels"):
        image_table(["a", "b"], t["x"], t["gt"], t["plain"], t["labels"][:, :3], t["scores"], VIEWS, VIEWS,
                    exact_psnr)
    with pytest.raises(ValueError, match="scores"):
        image_table(["a", "b"], t["x"], t["gt"], t["plain"], t["labels"], t["scores"][:, :3], VIEWS, VIEWS,
                    exact_psnr)


def test_summary_shares_by_hand() -> None:
    frame = pd.DataFrame({
        "image_id": ["a", "b", "c", "d"], "round": 0, "teacher_hash": "0" * 16,
        "psnr_plain": [20.0, 20.0, 20.0, 20.0], "psnr_hflip": [21.0, 19.0, 20.0, 22.0],
        "psnr_mean": [20.5, 20.5, 19.0, 21.0], "psnr_s_first": [21.0, 19.0, 19.0, 21.0],
        "s_first": ["hflip", "hflip", "mean", "mean"], "psnr_gt_best": [21.0, 20.5, 20.0, 22.0],
        "gt_best": ["hflip", "mean", "hflip", "hflip"], "S_hflip": 1.0, "S_mean": 2.0,
        "psnr_vs_input_plain": 25.0, "psnr_vs_input_hflip": [25.0 + UNRESTORED_MARGIN_DB, 30.0, 45.0, 20.0],
        "psnr_vs_input_mean": 30.0,
    })
    out = summarize_round(frame, ("hflip",), ("hflip", "mean")).set_index("column")
    assert list(out.index) == ["plain", "hflip", "mean", "s_first", "gt_best"]
    assert out.loc["hflip", "psnr"] == pytest.approx(20.5) and out.loc["hflip", "d_vs_plain"] == pytest.approx(0.5)
    assert out.loc["hflip", "share_better"] == 0.5 and out.loc["mean", "share_better"] == 0.75
    assert out.loc["hflip", "share_unrestored"] == 0.5 and out.loc["mean", "share_unrestored"] == 0.0
    assert out.loc["s_first", "share_unrestored"] == 0.25  # image a: S chose hflip, 6 dB closer to the input
    assert math.isnan(out.loc["plain", "share_unrestored"])
    assert out.loc["gt_best", "share_unrestored"] == 0.5  # images a and c
    assert out.loc["hflip", "share_s_first"] == 0.5 and out.loc["mean", "share_s_first"] == 0.5
    assert out.loc["gt_best", "share_s_first"] == 0.25  # S's first is the best on image a only
    assert math.isnan(out.loc["plain", "share_better"]) and math.isnan(out.loc["s_first", "share_s_first"])
    no_mean = summarize_round(frame, ("hflip",), ("hflip",)).set_index("column")
    assert math.isnan(no_mean.loc["mean", "share_s_first"])  # the mean is not a label: S never ranks it
    two = summarize(Headroom(pd.concat([frame, frame.assign(round=1)]), ("hflip",), ("hflip", "mean")))
    assert list(two["round"].unique()) == [0, 1] and len(two) == 10


def test_schema_and_reading_back(tmp_path: Path) -> None:
    schema = headroom_schema(VIEWS, (*VIEWS, "mean"))
    assert schema.names[:5] == ["image_id", "round", "teacher_hash", "psnr_plain", "psnr_hflip"]
    assert {"psnr_mean", "S_mean", "psnr_vs_input_mean", "s_first", "gt_best"} <= set(schema.names)
    with pytest.raises(ValueError, match="candidates"):
        headroom_schema(VIEWS, ("identity",))
    with pytest.raises(ValueError, match="not a headroom table"):
        pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
        read_headroom([tmp_path / "x.parquet"])
    for r, candidates in enumerate((VIEWS, (*VIEWS, "mean"))):  # two rounds, one with label.mean_label
        schema = headroom_schema(VIEWS, candidates)
        write_table(pd.DataFrame({n: pd.Series([], dtype=object) for n in schema.names}), tmp_path / f"{r}.pq",
                    schema)
    assert read_headroom([tmp_path / "0.pq"]).candidates == VIEWS
    with pytest.raises(ValueError, match=r"1\.pq: its views/labels .* differ from"):
        read_headroom([tmp_path / "0.pq", tmp_path / "1.pq"])


# --------------------------------------------------------------------------- the stage


def write_test_set(root: Path, n: int = 3) -> Path:
    clean = natural_images(n, SIZE)
    degraded = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for k in range(n):
        write_image(root / "raw" / "clean" / f"img_{k}.png", clean[k])
        write_image(root / "raw" / "degraded" / f"img_{k}.png", degraded[k])
    prepare_paired(root / "raw", root / "test", DataConfig(size=SIZE, min_size=16, geometry="square"))
    return root / "test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("headroom")
    test_dir = write_test_set(root)
    torch.manual_seed(0)
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    model = build_model(cfg)
    with torch.no_grad():  # position-dependent, so the views differ from each other and from plain
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    teacher = save_checkpoint(root / "pretrain/model.pt", Checkpoint("pretrain", cfg, model.state_dict()))
    label_cfg = LabelConfig(batch_size=2, mean_label=True)
    result = headroom(teacher, test_dir, root / "round_0/headroom.parquet", 0, IQA, label_cfg, device="cpu",
                      batch_size=2)
    return {"root": root, "test": test_dir, "teacher": teacher, "result": result, "label_cfg": label_cfg}


def test_stage_writes_the_declared_schema(setup: dict) -> None:
    result = setup["result"]
    schema = pq.read_schema(result.path)
    assert schema.equals(headroom_schema(VIEWS, (*VIEWS, "mean")), check_metadata=False)
    frame = pd.read_parquet(result.path)
    assert result.n_images == len(frame) == 3 and tuple(frame["image_id"]) == ImageStore(
        setup["test"] / "degraded.zarr").ids
    assert (frame["round"] == 0).all() and frame["teacher_hash"].str.len().eq(16).all()
    assert frame["s_first"].isin([*VIEWS, "mean"]).all() and frame["gt_best"].isin([*VIEWS, "mean"]).all()
    assert list(result.summary["column"]) == ["plain", *VIEWS, "mean", "s_first", "gt_best"]
    assert read_headroom([result.path]).candidates == (*VIEWS, "mean")


def test_stage_psnr_plain_is_the_teachers_plain_output(setup: dict) -> None:
    """psnr_plain and psnr_<view>, recomputed here from the teacher and the stores with pyiqa."""
    frame = pd.read_parquet(setup["result"].path)
    rows = np.arange(3)
    x = ImageStore(setup["test"] / "degraded.zarr").read_tensor(rows)
    gt = ImageStore(setup["test"] / "clean.zarr").read_tensor(rows)
    model = load_model(setup["teacher"], use_ema=True)
    metric = pyiqa.create_metric("psnr", device="cpu")
    with torch.no_grad():
        plain = model(x, 7.0).clamp(0, 1).mul(255).round().div(255)
        views = restore_augmented(lambda t: model(t, 7.0), x, get_augmentations(VIEWS)).clamp(0, 1)
    np.testing.assert_allclose(frame["psnr_plain"], metric(plain, gt).double().numpy(), rtol=1e-5)
    hflip = views[:, 0].mul(255).round().div(255)
    np.testing.assert_allclose(frame["psnr_hflip"], metric(hflip, gt).double().numpy(), rtol=1e-5)
    assert not np.allclose(frame["psnr_plain"], frame["psnr_rot90"])  # the views are not the plain output


def test_stage_matches_the_label_stage(setup: dict) -> None:
    """The labels and S of the headroom table are the label stage's, on the same images."""
    out = setup["root"] / "labels_of_test"
    label_shard(setup["teacher"], setup["test"] / "degraded.zarr", 0, 1, label_store_in(out, 0), ledger_in(out, 0), 0,
                IQA, setup["label_cfg"], device="cpu", progress=False)
    ledger = read_ledger([ledger_in(out, 0)]).pivot(index="image_id", columns="augmentation", values="S")
    frame = pd.read_parquet(setup["result"].path).set_index("image_id")
    for name in (*VIEWS, "mean"):
        np.testing.assert_allclose(frame[f"S_{name}"], ledger.loc[frame.index, name], rtol=1e-9)


def test_restore_labels_plain_is_the_identity_view(setup: dict) -> None:
    model = load_model(setup["teacher"], use_ema=True)
    x = ImageStore(setup["test"] / "degraded.zarr").read_tensor(np.arange(2))
    with torch.no_grad():
        plain, labels = restore_labels(lambda t: model(t, 7.0), x, get_augmentations(("identity", "hflip")))
        views = restore_augmented(lambda t: model(t, 7.0), x, get_augmentations(("identity", "hflip")))
    assert labels.shape == (2, 3, 3, SIZE, SIZE) and torch.equal(plain, labels[:, 0])
    assert torch.equal(labels * 255, (labels * 255).round())  # quantized
    assert torch.equal(labels[:, 2], quantize(views.mean(1)))  # the mean of the views, as the label stage makes it


def test_exception_no_ground_truth_names_the_folder(setup: dict, tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'test'}: no clean.zarr.*evaluate.headroom: false"):
        headroom(setup["teacher"], tmp_path / "test", tmp_path / "h.parquet", 0, IQA, LabelConfig(), device="cpu")
    assert not (tmp_path / "h.parquet").exists()



def test_stage_on_images_of_two_sizes_tiled(setup: dict, tmp_path: Path) -> None:
    """Non-square images of two sizes (rot90 swaps the shape), the larger restored tile by tile."""
    photos = natural_images(2, 96)
    for k, (h, w) in enumerate(((64, 80), (72, 56))):
        write_image(tmp_path / "raw" / "clean" / f"img_{k}.png", photos[k, :, :h, :w])
        write_image(tmp_path / "raw" / "degraded" / f"img_{k}.png", photos[k, :, :h, :w].mul(0.9))
    prepare_paired(tmp_path / "raw", tmp_path / "test", DataConfig(geometry="native", min_size=16))
    cfg = LabelConfig(tile=76, tile_overlap=8)
    result = headroom(setup["teacher"], tmp_path / "test", tmp_path / "h.parquet", 1, IQA, cfg, device="cpu")
    frame = pd.read_parquet(result.path)
    assert len(frame) == 2 and np.isfinite(frame.filter(like="psnr_").to_numpy()).all()
    assert frame.filter(like="S_").notna().all().all() and (frame["round"] == 1).all()
