"""Native-resolution images: per-image stores, max_side, labeling by shape bucket, aligned crops, evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qtlib.config.types import DataConfig
from qtlib.data import ImageStore, prepare_images, prepare_paired

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


def test_square_geometry_is_unchanged(tmp_path: Path) -> None:
    _write(tmp_path / "in")
    store = ImageStore(prepare_images(tmp_path / "in", tmp_path / "out", DataConfig(size=32, min_size=16)).store)
    assert not store.per_image and store.shape == (5, 3, 32, 32) and store.uniform
