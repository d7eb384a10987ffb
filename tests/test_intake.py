"""One intake path (qtlib.data.intake) under qt score, restore, degrade and prepare: bad files on disk."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from iqa_fixtures import natural_images, prepared  # noqa: F401  (fixture)
from PIL import Image

from qtlib.cli import main
from qtlib.config import ModelConfig, UNetConfig
from qtlib.data.decode import DEFAULT_MAX_PIXELS
from qtlib.data.intake import read_file, summary
from qtlib.imageio import write_image
from qtlib.models import Checkpoint, build_model, save_checkpoint


def write_huge_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A real, valid grey PNG of width x height (all zeros), compressed row by row (never held in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row = zlib.compressobj(1), b"\x00" * (width + 1)  # filter byte 0 + a row of zeros
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def write_bad_files(root: Path) -> dict[str, str]:
    """The hostile corpus; returns {name: expected status}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cut.jpg", quality=90)
    data = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "dot.png")
    write_huge_png(root / "huge.png")
    return {"empty.jpg": "empty", "text.jpg": "not_image", "cut.jpg": "truncated", "dot.png": "too_small",
            "huge.png": "too_large"}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad")
    return root, write_bad_files(root)


def test_read_file_statuses(bad_dir: tuple[Path, dict[str, str]]) -> None:
    root, expected = bad_dir
    got = {name: read_file(root / name, min_size=2) for name in expected}
    assert {name: r.status for name, r in got.items()} == expected
    for name, r in got.items():
        assert r.image is None and r.line.startswith(f"{root / name}: {r.status}: ") and "\n" not in r.line
    assert "20000x20000 = 400,000,000 pixels" in got["huge.png"].message
    assert f"{DEFAULT_MAX_PIXELS:,}" in got["huge.png"].message and "--max-pixels" in got["huge.png"].message
    assert "truncated" in got["cut.jpg"].message
    assert summary(got.values()) == "5 files: 0 usable, 5 skipped (empty: 1, not_image: 1, too_large: 1, " \
                                    "too_small: 1, truncated: 1)"


def test_read_file_ok_and_limit(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "a.png")
    ok = read_file(tmp_path / "a.png")
    assert ok.ok and ok.image is not None and ok.image.size == (40, 30) and len(ok.sha256) == 64
    assert ok.tensor().shape == (3, 30, 40)
    small = read_file(tmp_path / "a.png", max_pixels=1199)  # the limit is exclusive: 1200 pixels pass at 1200
    assert small.status == "too_large" and "40x30 = 1,200 pixels" in small.message
    assert read_file(tmp_path / "a.png", max_pixels=1200).ok
    assert read_file(tmp_path / "missing.png").status == "unreadable"
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global limit is restored after each read


def _good_images(root: Path, n: int = 2, size: int = 128) -> list[str]:
    names = [f"good{k}.png" for k in range(n)]
    for name, img in zip(names, natural_images(n, size), strict=True):
        write_image(root / name, img)
    return names


def _lines(err: str, prefix: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(f"{prefix}: skipped ")]


def test_cli_score_folder_with_bad_files(prepared, tmp_path: Path, bad_dir, capsys) -> None:  # noqa: F811
    root, expected = bad_dir
    folder = tmp_path / "in"
    folder.mkdir()
    for name in expected:
        (folder / name).write_bytes((root / name).read_bytes())
    good = _good_images(folder)
    out = tmp_path / "s.parquet"
    assert main(["score", "--metrics", "brisque", str(folder), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = _lines(captured.err, "qt score")
    assert len(lines) == len(expected)
    for name, status in expected.items():
        assert any(ln.startswith(f"qt score: skipped {folder / name}: {status}: ") for ln in lines), name
    assert "7 files: 2 scored, 5 skipped" in captured.err
    frame = pd.read_parquet(out)
    assert sorted(Path(p).name for p in frame["path"]) == good and frame["S"].notna().all()


def test_cli_score_nothing_usable_exits_1(prepared, bad_dir, capsys) -> None:  # noqa: F811
    root, _ = bad_dir
    assert main(["score", "--metrics", "brisque", str(root)]) == 1
    assert "0 scored, 5 skipped" in capsys.readouterr().err


def test_cli_score_max_pixels_flag(prepared, tmp_path: Path, capsys) -> None:  # noqa: F811
    _good_images(tmp_path, 1)
    assert main(["score", "--metrics", "brisque", str(tmp_path), "--max-pixels", "1000"]) == 1
    err = capsys.readouterr().err
    assert "too_large: 128x128 = 16,384 pixels is above the limit of 1,000 pixels" in err


def test_cli_score_constant_image_is_nan_not_a_traceback(prepared, tmp_path: Path, capsys) -> None:  # noqa: F811
    Image.new("RGB", (128, 128), (90, 90, 90)).save(tmp_path / "flat.png")
    _good_images(tmp_path, 1)
    out = tmp_path / "s.parquet"
    assert main(["score", "--metrics", "brisque,niqe", str(tmp_path), "--blocks", "1x1", "--out", str(out)]) == 0
    frame = pd.read_parquet(out).set_index(pd.read_parquet(out)["path"].map(lambda p: Path(p).name))
    assert np.isnan(frame.loc["flat.png", ["brisque", "niqe", "S", "S_r0c0"]].astype(float)).all()
    assert np.isfinite(frame.loc["good0.png", ["brisque", "niqe", "S"]].astype(float)).all()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "model.pt", Checkpoint("pretrain", cfg, build_model(cfg).state_dict()))


def test_cli_restore_folder_with_bad_files(tmp_path: Path, bad_dir, checkpoint: Path, capsys) -> None:
    root, expected = bad_dir
    folder = tmp_path / "in"
    folder.mkdir()
    for name in expected:
        (folder / name).write_bytes((root / name).read_bytes())
    good = _good_images(folder, 2, 48)
    rc = main(["restore", "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet", str(folder),
               str(tmp_path / "out")])
    assert rc == 0
    err = capsys.readouterr().err
    lines = _lines(err, "qt restore")
    expected_restore = {**expected, "dot.png": "ok"}  # a 1x1 image restores (the model pads it)
    for name, status in expected_restore.items():
        if status != "ok":
            assert any(ln.startswith(f"qt restore: skipped {folder / name}: {status}: ") for ln in lines), name
    assert len(lines) == 4 and "Traceback" not in err
    assert "7 files: 3 restored, 4 skipped" in err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([*good, "dot.png"])


def test_cli_restore_only_bad_files_exits_1(tmp_path: Path, checkpoint: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    rc = main(["restore", "--checkpoint", str(checkpoint), "--quiet", str(tmp_path / "in" / "empty.jpg"),
               str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"qt restore: skipped {tmp_path / 'in' / 'empty.jpg'}: empty: zero-byte file" in err


def test_cli_restore_max_pixels_flag(tmp_path: Path, checkpoint: Path, capsys) -> None:
    _good_images(tmp_path / "in", 1, 48)
    args = ["restore", "--checkpoint", str(checkpoint), "--quiet", str(tmp_path / "in"), str(tmp_path / "out")]
    assert main([*args, "--max-pixels", "2000"]) == 1
    assert "too_large: 48x48 = 2,304 pixels is above the limit of 2,000" in capsys.readouterr().err
    assert main([*args, "--max-pixels", "2304"]) == 0


def test_cli_degrade_folder_with_bad_files(tmp_path: Path, bad_dir, capsys) -> None:
    root, expected = bad_dir
    folder = tmp_path / "in"
    folder.mkdir()
    for name in expected:
        (folder / name).write_bytes((root / name).read_bytes())
    _good_images(folder, 1, 32)
    assert main(["degrade", "--recipe", "rain_source", str(folder), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    for name, status in expected.items():
        assert f"qt degrade: skipped {name} ({status}: " in err
    assert "6 files: 1 degraded, 5 skipped" in err
    assert main(["degrade", "--recipe", "rain_source", str(root), str(tmp_path / "none")]) == 1


def test_cli_prepare_names_each_bad_file(tmp_path: Path, bad_dir, capsys) -> None:
    root, expected = bad_dir
    folder = tmp_path / "in"
    folder.mkdir()
    for name in expected:
        (folder / name).write_bytes((root / name).read_bytes())
    _good_images(folder, 1, 64)
    config = tmp_path / "c.yaml"
    config.write_text("data: {size: 32, min_size: 16}\n")
    assert main(["prepare", str(folder), str(tmp_path / "out"), "--config", str(config)]) == 0
    err = capsys.readouterr().err
    for name, status in expected.items():
        assert f"qt prepare: skipped {folder / name}: {status}: " in err, name
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("path")
    assert manifest.loc["huge.png", "status"] == "too_large"
    assert main(["prepare", str(folder), str(tmp_path / "out2"), "--config", str(config),
                 "--max-pixels", "100"]) == 1  # the one good image is now too large too
    assert "no usable images" in capsys.readouterr().err
