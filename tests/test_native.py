"""Native-resolution images: per-image stores, max_side, labeling by shape bucket, aligned crops, evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from qtlib import audit
from qtlib.augment import get_augmentations
from qtlib.config import GateConfig, IQAConfig, LabelConfig, ModelConfig, UNetConfig
from qtlib.config.types import DataConfig, Member
from qtlib.data import ImageStore, prepare_images, prepare_paired
from qtlib.data.store import LabelStore, PerImageWriter, commit_path
from qtlib.gate import run_gate
from qtlib.label import label_shard
from qtlib.layout import Layout
from qtlib.models import Checkpoint, build_model, load_model, save_checkpoint
from qtlib.restore import restore_tiled
from qtlib.train.losses import block_weight_map
from qtlib.train.samples import (
    BankReader,
    PairedReader,
    block_weight_window,
    build_samples,
    draw_epoch_plan,
)

NATIVE = DataConfig(geometry="native", max_side=160, min_size=16)
#: (H, W) of the mixed-size corpus: landscape, portrait, square, one above max_side, one equal to another.
SIZES = [(60, 80), (100, 50), (64, 64), (300, 200), (60, 80)]


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(root: Path, sizes=SIZES, seed: int = 0) -> list[np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    images = [_noise(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / f"{i}.png")
    return images


def test_native_store_keeps_each_size_and_caps_at_max_side(tmp_path: Path) -> None:
    images = _write(tmp_path / "in")
    result = prepare_images(tmp_path / "in", tmp_path / "out", NATIVE)
    manifest = pd.read_parquet(result.manifest).set_index("path")
    store = ImageStore(result.store)
    assert store.per_image and not store.uniform
    assert store.sizes.tolist() == [[60, 80], [100, 50], [64, 64], [160, 107], [60, 80]]
    for i, img in enumerate(images):
        row = int(manifest.loc[f"{i}.png", "index"])
        if i != 3:
            assert manifest.loc[f"{i}.png", "transform"] == "none"
            assert np.array_equal(store.read(row).transpose(1, 2, 0), img)  # bit-exact, never resized
    assert manifest.loc["3.png", "transform"] == "resize 200x300->107x160 (max_side 160, bicubic, antialiased)"
    expected = np.asarray(Image.fromarray(images[3]).resize((107, 160), Image.Resampling.BICUBIC))
    assert np.array_equal(store.read(3).transpose(1, 2, 0), expected)  # the recorded transform, exactly
    assert store.attrs["transform"]["geometry"] == "native"
    with pytest.raises(ValueError, match="no common shape"):
        _ = store.shape


def test_one_chunk_per_image_and_reading_one_touches_no_other(tmp_path: Path) -> None:
    _write(tmp_path / "in")
    store_path = prepare_images(tmp_path / "in", tmp_path / "out", NATIVE).store
    for row in range(len(SIZES)):
        chunks = [p for p in (store_path / str(row)).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert len(chunks) == 1
    for row in (0, 2):  # another image's chunk gone: this one still reads
        for p in (store_path / str(row)).rglob("*"):
            if p.is_file() and p.name != "zarr.json":
                p.unlink()
    store = ImageStore(store_path)
    assert store.read(1).shape == (3, 100, 50) and store.read_window(3, 10, 20, 30, 40).shape == (3, 30, 40)
    assert np.array_equal(store.read_window(1, 5, 7, 20, 30), store.read(1)[:, 5:25, 7:37])


def test_batches_bucket_by_shape_and_never_pad(tmp_path: Path) -> None:
    _write(tmp_path / "in")
    store = ImageStore(prepare_images(tmp_path / "in", tmp_path / "out", NATIVE).store)
    batches = list(store.batches(4))
    assert [rows.tolist() for rows, _ in batches] == [[0, 4], [1], [2], [3]]
    for rows, x in batches:
        assert tuple(x.shape[-2:]) == store.size_of(int(rows[0]))
    assert [r.tolist() for r, _ in store.batches(2, rows=[4, 2, 0])] == [[4, 0], [2]]  # given order per size
    with pytest.raises(ValueError, match="several sizes"):
        store.read([0, 1])


def test_paired_native_keeps_both_sides_aligned(tmp_path: Path) -> None:
    clean = _write(tmp_path / "in" / "clean", SIZES[:4])
    (tmp_path / "in" / "degraded").mkdir()
    for i, img in enumerate(clean):
        Image.fromarray(255 - img).save(tmp_path / "in" / "degraded" / f"{i}.png")
    result = prepare_paired(tmp_path / "in", tmp_path / "out", NATIVE)
    degraded, clean_store = ImageStore(result.degraded), ImageStore(result.clean)
    assert degraded.sizes.tolist() == clean_store.sizes.tolist() == [[60, 80], [100, 50], [64, 64], [160, 107]]
    assert np.array_equal(degraded.read(1), 255 - clean_store.read(1))


def test_native_is_the_default_and_square_is_unchanged(tmp_path: Path) -> None:
    assert DataConfig().geometry == "native"
    _write(tmp_path / "in")
    square = DataConfig(size=32, min_size=16, geometry="square")
    store = ImageStore(prepare_images(tmp_path / "in", tmp_path / "out", square).store)
    assert not store.per_image and store.shape == (5, 3, 32, 32) and store.uniform


# ---------------------------------------------------------------- labeling, training crops, evaluation

IQA = IQAConfig(ensemble=(Member("brisque", 1.0),), blocks=(2, 2), batch_size=8)
AUGS = ["hflip", "vflip", "rot90"]
TILE = 96  # the 160 x 107 image is restored tile by tile


def _photos(root: Path) -> None:
    """Photo crops of several sizes and aspects (BRISQUE needs texture, not noise)."""
    from skimage import data

    photo = data.astronaut()
    root.mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(photo[20 * i:20 * i + h, 30 * i:30 * i + w]).save(root / f"{i}.png")
    Image.fromarray(photo[:300, 100:300]).save(root / "3.png")  # 300 x 200 -> max_side 160


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    root = tmp_path_factory.mktemp("native")
    layout = Layout(root / "results")
    _photos(root / "photos")
    prepare_images(root / "photos", layout.prepared("unlabeled"), NATIVE)
    torch.manual_seed(0)
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    layout.pretrained.parent.mkdir(parents=True)
    save_checkpoint(layout.pretrained, Checkpoint("pretrain", cfg, model.state_dict()))
    for k in range(2):
        label_shard(layout.pretrained, layout.unlabeled_images, k, 2, layout.label_store(0, k), layout.ledger(0, k),
                    0, IQA, LabelConfig(batch_size=4, tile=TILE, tile_overlap=16), device="cpu", progress=False)
    run_gate([layout.ledger(0, k) for k in range(2)], None, GateConfig(tau1=1e9, tau2=1e9), 3, layout.gate(0),
             layout.bank(0))
    return layout


def test_labels_are_stored_at_each_images_size_and_are_the_teachers_views(labeled: Layout) -> None:
    images = ImageStore(labeled.unlabeled_images)
    model = load_model(labeled.pretrained)
    manifest = pd.read_parquet(labeled.manifest("unlabeled")).set_index("path")
    augs = get_augmentations(AUGS)
    for path in ("1.png", "3.png"):  # portrait (rot90 on its own), and the tiled one
        image_id = manifest.loc[path, "id"]
        x = images.read_tensor(images.index_of(image_id))
        with torch.no_grad():
            if max(x.shape[-2:]) > TILE:
                views = [a.inverse(restore_tiled(model, a.forward(x), 7.0, TILE, 16)) for a in augs]
            else:
                views = [a.inverse(model(a.forward(x[None]), 7.0)[0]) for a in augs]
        for k, name in enumerate(AUGS):
            label = audit.pseudo_label(labeled.root, 0, path, name)
            assert label.shape == (*images.size_of(images.index_of(image_id)), 3)
            expected = views[k].clamp(0, 1).mul(255).round().byte().numpy().transpose(1, 2, 0)
            assert np.abs(label.astype(int) - expected).max() <= 1


def test_pseudo_label_returns_every_image_at_its_original_size_or_cap(labeled: Layout) -> None:
    manifest = pd.read_parquet(labeled.manifest("unlabeled")).set_index("path")
    ledger = pd.concat([pd.read_parquet(labeled.ledger(0, k)) for k in range(2)])
    assert len(ledger) == 3 * len(SIZES) and ledger["S"].notna().all()
    for path, row in manifest.iterrows():
        w, h = int(row["orig_width"]), int(row["orig_height"])
        scale = min(1.0, 160 / max(w, h))
        expected = (round(h * scale), round(w * scale))
        for name in AUGS:
            assert audit.pseudo_label(labeled.root, 0, path, name).shape == (*expected, 3)
    stores = [LabelStore(labeled.label_store(0, k)) for k in range(2)]
    assert any(s.per_image for s in stores)


def _coded(h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8 whose pixels encode their (row, column) modulo 256, so a crop can be located."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8)


def test_bank_reader_crops_x_pl_and_weights_at_the_same_place(tmp_path: Path) -> None:
    """Synthetic PL = 255 - x at every image size: every crop of the PL must be 255 - the crop of x."""
    sizes = [(40, 72), (90, 33), (300, 280)]
    writer = PerImageWriter(tmp_path / "images.zarr")
    for i, (h, w) in enumerate(sizes):
        writer.append(f"img{i}", _coded(h, w))
    writer.close({})
    commit_path(writer.tmp, tmp_path / "images.zarr")
    import zarr

    g = zarr.open_group(str(tmp_path / "round_0/labels/shard_0.zarr"), mode="w")
    labels = g.create_group("labels")
    labels.attrs.update({"layout": "per_image", "sizes": [list(s) for s in sizes]})
    blocks = np.array([[[[1.0, 2.0], [3.0, 4.0]]] * 3] * 3, dtype=np.float32)  # (N, K, 2, 2)
    for i, (h, w) in enumerate(sizes):
        labels.create_array(str(i), data=np.stack([255 - _coded(h, w).transpose(2, 0, 1)] * 3))
    g.create_array("blocks_S", data=blocks)
    bank = pd.DataFrame({"image_id": [f"img{i}" for i in range(3)], "source_index": [0, 1, 2], "rank": 0,
                         "store": "round_0/labels/shard_0.zarr", "index": [0, 1, 2], "aug_index": [0, 1, 2],
                         "S": [5.0, 6.0, 4.0], "blocks_S": [b[0].reshape(-1) for b in blocks]})
    samples = build_samples(bank, "qualiteacher", 7.0, True)
    reader = BankReader(samples, tmp_path / "images.zarr", tmp_path, 24)
    assert reader.image_size.shape == (3, 2)
    plan = draw_epoch_plan(len(samples), 6, reader.image_size, 24, 12, (4.0,), 0, 0, 0)
    batch = reader.read(plan, np.arange(6))
    for j in range(6):
        i = plan.sample[j]
        top, left = (int(v) for v in plan.patch_yx[j])
        h, w = sizes[samples.source_index[i]]
        assert top + 24 <= h and left + 24 <= w
        x = (batch.x[j] * 255).round().to(torch.int64)
        assert torch.equal(x, torch.from_numpy(_coded(h, w)[top:top + 24, left:left + 24].transpose(2, 0, 1))
                           .to(torch.int64))
        assert torch.equal((batch.target[j] * 255).round().to(torch.int64), 255 - x)
        full = block_weight_map(torch.from_numpy(samples.blocks[i].reshape(1, 2, 2)), (h, w))
        assert torch.equal(batch.weight[j], full[0, :, top:top + 24, left:left + 24])


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (101, 7 * 13), (1000, 999)])
def test_block_weight_window_equals_a_crop_of_the_full_map(size: tuple[int, int]) -> None:
    blocks = np.array([[1.0, 3.0, 2.0], [5.0, 4.0, 0.5]], dtype=np.float32)
    full = block_weight_map(torch.from_numpy(blocks[None]), size)[0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        top, left = (int(rng.integers(0, s - 7 + 1)) for s in size)
        assert torch.equal(block_weight_window(blocks, size, top, left, 7), full[:, top:top + 7, left:left + 7])


def test_paired_reader_native_crops_are_aligned_and_inside(tmp_path: Path) -> None:
    sizes = [(40, 72), (90, 33), (50, 50)]
    for name, f in (("degraded", lambda a: a), ("clean", lambda a: 255 - a)):
        writer = PerImageWriter(tmp_path / f"{name}.zarr")
        for i, (h, w) in enumerate(sizes):
            writer.append(f"p{i}", f(_coded(h, w)))
        writer.close({})
        commit_path(writer.tmp, tmp_path / f"{name}.zarr")
    reader = PairedReader(tmp_path, 30)
    for step in range(5):
        x, y = reader.read(seed=0, step=step, batch=3)
        assert torch.allclose(x + y, torch.ones_like(x))
    with pytest.raises(ValueError, match="smallest side 33"):
        PairedReader(tmp_path, 34)


# ---------------------------------------------------------------- the whole workflow on mixed sizes

NATIVE_SIZES = {"paired": [(80, 112), (96, 72), (70, 70), (150, 100)],
                "unlabeled": [(72, 96), (100, 68), (64, 64), (200, 130)],
                "test": [(66, 90), (90, 66), (160, 120)]}


def _write_split(root: Path, split: str) -> None:
    from skimage import data

    photo = data.chelsea() if split == "test" else data.astronaut() if split == "paired" else data.coffee()
    rng = np.random.default_rng(len(split))
    for i, (h, w) in enumerate(NATIVE_SIZES[split]):
        clean = photo[10 * i:10 * i + h, 20 * i:20 * i + w]
        degraded = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
        if split == "unlabeled":
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(degraded).save(root / split / f"u{i}.png")
            continue
        for side, img in (("lq", degraded), ("gt", clean)):
            (root / split / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / split / side / f"{i}.png")


@pytest.mark.slow
def test_workflow_runs_on_images_of_several_sizes(tmp_path: Path) -> None:
    import copy

    from test_workflow import TINY, snakemake, write_config

    for split in NATIVE_SIZES:
        _write_split(tmp_path / "mine", split)
    cfg = copy.deepcopy(TINY)
    cfg["data"] = {"geometry": "native", "max_side": 128, "min_size": 16,
                   **{s: f"mine/{s}" for s in NATIVE_SIZES}}
    cfg["label"] = {**cfg["label"], "tile": 112, "tile_overlap": 16}
    cfg["evaluate"] = {**cfg["evaluate"], "tile": 112, "tile_overlap": 16}
    write_config(tmp_path, cfg)
    snakemake(tmp_path, "--resources", "gpu=2")
    results = tmp_path / "results"
    assert not (results / "data" / "demo").exists()  # every split given: no demo built
    manifest = pd.read_parquet(results / "data/unlabeled/manifest.parquet")
    for row in manifest.itertuples():
        scale = min(1.0, 128 / max(row.orig_width, row.orig_height))
        expected = (round(row.orig_height * scale), round(row.orig_width * scale))
        for r in range(cfg["rounds"]):
            for aug in AUGS:
                assert audit.pseudo_label(results, r, row.path, aug).shape == (*expected, 3)
    assert manifest.loc[manifest["path"] == "u3.png", "transform"].item().endswith(
        "resize 130x200->83x128 (max_side 128, bicubic, antialiased)")
    metrics = pd.read_parquet(results / "eval/metrics.parquet")
    assert metrics["image_id"].nunique() == len(NATIVE_SIZES["test"])
    assert metrics["psnr"].notna().all()
    trail = audit.trace(results, "u1.png")
    assert sorted(set(trail["round"])) == list(range(cfg["rounds"]))
