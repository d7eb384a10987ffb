"""qt prepare: a corpus of good and bad inputs made on disk, checked through the manifest and the array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import qtlib.data.prepare as prepare_module
from qtlib.cli import main
from qtlib.config.types import DataConfig
from qtlib.data import (
    STATUSES,
    ImageStore,
    NoUsableImagesError,
    image_id,
    load_images,
    prepare_images,
    prepare_paired,
)

CFG = DataConfig(size=32, min_size=16, geometry="square")


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_corpus(root: Path) -> dict[str, str]:
    """Write the corpus; return {relative path: expected status}. Images of 32 x 32 are stored unresized."""
    (root / "nested" / "deeper").mkdir(parents=True)
    expected = {}

    Image.fromarray(_noise(48, 80)).save(root / "good.png")
    expected["good.png"] = "ok"
    Image.fromarray(_noise(64, 40, 1)).save(root / "nested" / "deeper" / "UPPER.JPG", quality=95)
    expected["nested/deeper/UPPER.JPG"] = "ok"

    Image.fromarray(_noise(200, 200, 2)).save(root / "truncated.jpg", quality=90)
    data = (root / "truncated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "truncated"
    Image.fromarray(_noise(100, 100, 3)).save(root / "truncated.png")
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    expected["truncated.png"] = "truncated"

    (root / "text.png").write_text("this is not an image\n")
    expected["text.png"] = "not_image"
    (root / "empty.webp").write_bytes(b"")
    expected["empty.webp"] = "empty"
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    (root / "data.npy").write_bytes(b"\x93NUMPY")

    Image.fromarray(_noise(10, 40, 4)).save(root / "tiny.png")
    expected["tiny.png"] = "too_small"

    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(root / "cmyk.jpg", quality=100)  # pure cyan
    expected["cmyk.jpg"] = "ok"
    Image.fromarray(np.full((32, 32), 100 * 257, dtype=np.uint16)).save(root / "gray16.png")
    expected["gray16.png"] = "ok"

    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (16, 0, 32, 32))  # right half red, left half index 0 = transparent
    palette.save(root / "palette.png", transparency=0)
    expected["palette.png"] = "ok"

    Image.new("L", (32, 32), 77).save(root / "gray.png")
    expected["gray.png"] = "ok"
    Image.new("LA", (32, 32), (0, 0)).save(root / "gray_alpha.png")
    expected["gray_alpha.png"] = "ok"

    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 16:] = (0, 0, 255, 255)  # opaque blue
    Image.fromarray(rgba).save(root / "rgba.png")
    expected["rgba.png"] = "ok"

    # Stored 64 wide x 32 tall, left half red, right half blue; EXIF orientation 6 means
    # "rotate 90 degrees clockwise to display", so the displayed image is 32 x 64, red on top.
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "rotated.jpg", exif=exif.tobytes(), quality=95)
    expected["rotated.jpg"] = "ok"
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, _write_corpus(root)


@pytest.fixture(scope="module")
def prepared(corpus: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prepared")
    result = prepare_images(corpus[0], out, CFG)
    return result, pd.read_parquet(result.manifest).set_index("path"), ImageStore(result.store)


def _pixels(store: ImageStore, manifest: pd.DataFrame, path: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 of one input file, found through its manifest row."""
    return store.read(int(manifest.loc[path, "index"])).transpose(1, 2, 0)


def test_smoke_statuses(prepared, corpus) -> None:
    result, manifest, _ = prepared
    expected = corpus[1]
    assert dict(manifest["status"]) == expected  # one row per image-extension file, none for .txt/.npy
    assert set(manifest["status"]) <= set(STATUSES)
    assert result.n_ok == sum(s == "ok" for s in expected.values())
    assert result.n_skipped == len(expected) - result.n_ok
    assert result.status_counts["truncated"] == 2
    assert (manifest.loc[manifest.status != "ok", "message"] != "").all()


def test_manifest_columns_and_ids(prepared, corpus) -> None:
    result, manifest, store = prepared
    assert list(pd.read_parquet(result.manifest).columns) == [
        "id", "path", "sha256", "orig_width", "orig_height", "mode", "transform", "index", "status", "message",
    ]  # fmt: skip
    for path, row in manifest.iterrows():
        assert row["id"] == image_id(path)
        assert len(row["sha256"]) == 64
    ok = manifest[manifest.status == "ok"]
    assert sorted(ok["index"]) == list(range(len(ok)))
    assert (manifest.loc[manifest.status != "ok", "index"] == -1).all()
    assert list(store.ids) == list(ok.sort_values("index")["id"])
    assert store.shape == (len(ok), 3, 32, 32)
    assert manifest.loc["good.png", ["orig_width", "orig_height", "mode"]].tolist() == [80, 48, "RGB"]
    assert manifest.loc["good.png", "transform"] == "resize 80x48->53x32; crop (10,0)"
    assert manifest.loc["nested/deeper/UPPER.JPG", "transform"] == "resize 40x64->32x51; crop (0,9)"
    assert manifest.loc["tiny.png", ["orig_width", "orig_height"]].tolist() == [40, 10]
    assert manifest.loc["text.png", "orig_width"] == -1


def test_conversions(prepared) -> None:
    _, manifest, store = prepared
    modes = manifest["mode"].to_dict()
    assert modes["cmyk.jpg"] == "CMYK" and modes["gray16.png"] == "I;16" and modes["palette.png"] == "P"
    assert np.abs(_pixels(store, manifest, "cmyk.jpg").astype(int) - (0, 255, 255)).max() <= 3
    assert (_pixels(store, manifest, "gray16.png") == 100).all()  # 16-bit scaled by 1/257, not clipped
    assert (_pixels(store, manifest, "gray.png") == 77).all()
    assert (_pixels(store, manifest, "gray_alpha.png") == 255).all()  # transparent grey -> white
    pal = _pixels(store, manifest, "palette.png")
    assert (pal[:, :16] == 255).all() and (pal[:, 16:] == (255, 0, 0)).all()
    rgba = _pixels(store, manifest, "rgba.png")
    assert (rgba[:, :16] == 255).all() and (rgba[:, 16:] == (0, 0, 255)).all()
    assert "alpha composited on white" in manifest.loc["rgba.png", "transform"]


def test_exif_orientation(prepared) -> None:
    _, manifest, store = prepared
    row = manifest.loc["rotated.jpg"]
    assert (row["orig_width"], row["orig_height"]) == (64, 32)  # as stored in the file
    assert row["transform"].startswith("exif orientation 6")
    assert "crop (0,16)" in row["transform"]  # displayed 32 x 64: the crop is vertical
    pixels = _pixels(store, manifest, "rotated.jpg").astype(int)
    top, bottom = pixels[:12].mean(axis=(0, 1)), pixels[-12:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue at the bottom


def test_rerun_determinism(corpus, prepared, tmp_path: Path) -> None:
    first, manifest, store = prepared
    again = prepare_images(corpus[0], tmp_path, CFG)
    pd.testing.assert_frame_equal(pd.read_parquet(again.manifest).set_index("path"), manifest)
    ids, array = load_images(again.store)
    assert ids == list(store.ids)
    np.testing.assert_array_equal(array, store.read(slice(None)))


def test_store_reader(prepared) -> None:
    _, _, store = prepared
    everything = store.read(slice(None))
    np.testing.assert_array_equal(store.read([2, 0, 2]), everything[[2, 0, 2]])
    assert store.read([]).shape == (0, 3, 32, 32)
    tensor = store.read_tensor([1])
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 3, 32, 32)
    assert 0 <= float(tensor.min()) and float(tensor.max()) <= 1
    assert store.index_of(store.ids[3]) == 3
    with pytest.raises(KeyError, match="no image with id"):
        store.index_of("nope")
    batches = list(store.batches(4))
    assert [len(rows) for rows, _ in batches] == [4] * (len(store) // 4) + ([len(store) % 4] if len(store) % 4 else [])
    torch.testing.assert_close(torch.cat([b for _, b in batches]), store.read_tensor(slice(None)))
    assert store.attrs["transform"]["size"] == 32
    with pytest.raises(ValueError, match="read-only"):
        store._array[0] = 0


def test_exception_empty_result(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_text("nope")
    Image.fromarray(_noise(8, 8)).save(tmp_path / "in" / "b.png")
    with pytest.raises(NoUsableImagesError, match=r"not_image: 1, too_small: 1"):
        prepare_images(tmp_path / "in", tmp_path / "out", CFG)
    assert not (tmp_path / "out" / "images.zarr").exists()
    (tmp_path / "none").mkdir()
    with pytest.raises(NoUsableImagesError, match="no image files"):
        prepare_images(tmp_path / "none", tmp_path / "out", CFG)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        prepare_images(tmp_path / "missing", tmp_path / "out", CFG)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        prepare_images(tmp_path / "in" / "b.png", tmp_path / "out", CFG)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_atomic_existing_output_survives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_noise(40, 40)).save(src / "a.png")
    prepare_images(src, out, CFG)
    before = _snapshot(out)

    # A rerun that finds nothing usable fails before touching the outputs.
    (src / "a.png").write_text("broken now")
    with pytest.raises(NoUsableImagesError):
        prepare_images(src, out, CFG)
    assert _snapshot(out) == before

    # A rerun that dies after the new store is complete but before the swap leaves no trace either.
    Image.fromarray(_noise(40, 40, 9)).save(src / "a.png")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "write_parquet", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_images(src, out, CFG)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["images.zarr", "manifest.parquet"]


def test_output_inside_input_is_skipped(tmp_path: Path) -> None:
    Image.fromarray(_noise(40, 40)).save(tmp_path / "a.png")
    prepare_images(tmp_path, tmp_path / "out", CFG)
    (tmp_path / "out" / "stray.png").write_bytes((tmp_path / "a.png").read_bytes())
    result = prepare_images(tmp_path, tmp_path / "out", CFG)
    assert list(pd.read_parquet(result.manifest)["path"]) == ["a.png"]


def test_duplicates_are_flagged(tmp_path: Path) -> None:
    Image.fromarray(_noise(40, 40)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    manifest = pd.read_parquet(prepare_images(tmp_path, tmp_path / "out", CFG).manifest)
    assert list(manifest["status"]) == ["ok", "ok"]
    assert manifest["message"].tolist() == ["", "same bytes as a.png"]


def _write_paired(root: Path) -> None:
    for side in ("degraded", "clean"):
        (root / side / "sub").mkdir(parents=True)
    clean = _noise(40, 60, 5)
    degraded = np.clip(clean.astype(int) + 10, 0, 255).astype(np.uint8)
    Image.fromarray(clean).save(root / "clean" / "sub" / "a.png")
    Image.fromarray(degraded).save(root / "degraded" / "sub" / "a.png")
    Image.fromarray(_noise(50, 50, 6)).save(root / "clean" / "b.png")
    Image.fromarray(_noise(50, 50, 7)).save(root / "degraded" / "b.jpg")  # matched without extension
    Image.fromarray(_noise(40, 40, 8)).save(root / "degraded" / "only_degraded.png")
    Image.fromarray(_noise(40, 40, 8)).save(root / "clean" / "only_clean.png")
    Image.fromarray(_noise(40, 40, 8)).save(root / "degraded" / "sizes.png")
    Image.fromarray(_noise(40, 44, 8)).save(root / "clean" / "sizes.png")
    (root / "clean" / "bad.png").write_text("nope")
    Image.fromarray(_noise(40, 40, 8)).save(root / "degraded" / "bad.png")


def test_paired(tmp_path: Path) -> None:
    _write_paired(tmp_path / "in")
    result = prepare_paired(tmp_path / "in", tmp_path / "out", CFG)
    manifest = pd.read_parquet(result.manifest).set_index("path")
    status = manifest["status"].to_dict()
    assert status["degraded/sub/a.png"] == "ok" and status["degraded/b.jpg"] == "ok"
    assert status["degraded/only_degraded.png"] == "no_clean"
    assert status["degraded/sizes.png"] == "size_mismatch"
    assert status["degraded/bad.png"] == "not_image" and manifest.loc["degraded/bad.png", "message"].startswith(
        "clean:"
    )
    orphan = manifest[manifest["clean_path"] == "clean/only_clean.png"]
    assert orphan.index.tolist() == [""] and orphan["status"].tolist() == ["no_degraded"]
    assert manifest.loc["degraded/b.jpg", "clean_path"] == "clean/b.png"
    assert manifest.loc["degraded/sub/a.png", "id"] == image_id("sub/a.png")
    assert (result.n_ok, result.n_skipped) == (2, 4)

    degraded, clean = ImageStore(result.degraded), ImageStore(result.clean)
    assert degraded.ids == clean.ids and degraded.shape == clean.shape == (2, 3, 32, 32)
    row = int(manifest.loc["degraded/sub/a.png", "index"])
    diff = degraded.read(row).astype(int) - clean.read(row).astype(int)
    assert abs(np.median(diff) - 10) <= 1  # same geometry: the pixel offset survives resize and crop

    # Same ids as preparing degraded/ alone.
    alone = prepare_images(tmp_path / "in" / "degraded", tmp_path / "alone", CFG)
    alone_ids = pd.read_parquet(alone.manifest).set_index("path")["id"]
    assert alone_ids["sub/a.png"] == manifest.loc["degraded/sub/a.png", "id"]


def test_paired_without_clean(tmp_path: Path) -> None:
    (tmp_path / "in" / "degraded").mkdir(parents=True)
    Image.fromarray(_noise(40, 40)).save(tmp_path / "in" / "degraded" / "a.png")
    with pytest.raises(FileNotFoundError, match="clean/ is missing"):
        prepare_paired(tmp_path / "in", tmp_path / "out", CFG)
    result = prepare_paired(tmp_path / "in", tmp_path / "out", CFG, require_clean=False)
    assert result.clean is None and not (tmp_path / "out" / "clean.zarr").exists()
    assert len(ImageStore(result.degraded)) == 1


def test_cli_prepare(corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("data: {size: 32, min_size: 16}\n")
    out = tmp_path / "out"
    assert main(["prepare", str(corpus[0]), str(out), "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    n_ok = sum(s == "ok" for s in corpus[1].values())
    assert f"{n_ok} images ok" in printed and "truncated: 2" in printed
    assert len(ImageStore(out / "images.zarr")) == n_ok

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", str(empty), str(out), "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("qt prepare: error:") and "no image files" in err and "\n" not in err

    assert main(["prepare", "--clean-optional", str(corpus[0]), str(out), "--config", str(config)]) == 1
    assert "--paired only" in capsys.readouterr().err

    _write_paired(tmp_path / "paired")
    assert main(["prepare", "--paired", str(tmp_path / "paired"), str(tmp_path / "p"), "--config", str(config)]) == 0
    assert (tmp_path / "p" / "clean.zarr").is_dir()
