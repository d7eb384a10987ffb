"""`qt weights` and `qt score` end to end: the issue's "done when" on pyiqa's calibration images."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from iqa_fixtures import prepared  # noqa: F401  (fixture)

from qtlib.cli import main as qt
from qtlib.iqa import CATALOG
from qtlib.iqa.calibration import (
    PUBLISHED,
    TOLERANCE,
    calibration_dir,
    calibration_images,
)

ROOT = Path(__file__).resolve().parents[1]


def test_weights_prepare_then_score_reproduces_published_values(prepared, tmp_path: Path,  # noqa: F811
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert qt(["weights", "prepare"]) == 0
    assert "present, verified" in capsys.readouterr().out
    out = tmp_path / "scores.parquet"
    dist = calibration_dir() / "dist_dir"
    assert qt(["score", "--metrics", "brisque,niqe", str(dist), "--blocks", "2x2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "I03.bmp" in printed and f"wrote {out}" in printed

    frame = pd.read_parquet(out)
    assert list(frame["path"]) == [str(p) for p in calibration_images()]
    for m in ("brisque", "niqe"):
        assert frame[m].tolist() == pytest.approx(PUBLISHED[m], abs=TOLERANCE)
        assert frame[f"{m}_norm"].between(0, 1).all()
    assert frame["S"].between(0, 10).all()
    blocks = [f"{name}_r{i}c{j}" for name in ("brisque", "niqe", "S") for i in range(2) for j in range(2)]
    assert set(blocks) <= set(frame.columns)
    assert frame["S"].idxmin() == 0, "I03 is the worst image"


def test_score_single_file_default_config(prepared, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    image = calibration_images()[1]
    assert qt(["score", str(image), "--config", str(ROOT / "config" / "config.yaml")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["image", "brisque", "niqe", "S"]
    assert lines[1].startswith("I04.bmp")


def test_weights_status_lists_catalog(capsys: pytest.CaptureFixture) -> None:
    assert qt(["weights", "status"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in CATALOG)
    assert "brisque_svm_weights.pth" in out and "RN50.pt" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "--metrics", "brisque,nope", "IMG"], "unknown metric 'nope'"),
        (["score", "--metrics", "brisque", "IMG", "--blocks", "2by2"], "--blocks: expected ROWSxCOLS"),
        (["score", "--metrics", "psnr", "IMG"], "needs a reference image"),
        (["score", "--metrics", "brisque", "/no/such/folder"], "no such file or folder"),
    ],
)
def test_exception_score_errors_are_one_line(argv: list[str], message: str, prepared,  # noqa: F811
                                             capsys: pytest.CaptureFixture) -> None:
    argv = [str(calibration_images()[0]) if a == "IMG" else a for a in argv]
    assert qt(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("qt score: error: ") and err.count("\n") == 1 and message in err


def test_score_folder_of_mixed_sizes(prepared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    from iqa_fixtures import natural_images

    from qtlib.imageio import write_image

    images = natural_images(3, 96)
    write_image(tmp_path / "a.png", images[0])
    write_image(tmp_path / "sub" / "b.png", images[1][:, :80, :72])
    write_image(tmp_path / "c.png", images[2])
    out = tmp_path / "s.parquet"
    assert qt(["score", "--metrics", "brisque,piqe", str(tmp_path), "--batch-size", "2", "--out", str(out)]) == 0
    frame = pd.read_parquet(out)
    assert [Path(p).name for p in frame["path"]] == ["a.png", "c.png", "b.png"]  # sorted by relative path
    assert list(frame.columns[:3]) == ["path", "brisque", "piqe"] and frame["S"].notna().all()
    assert "sub/b.png" in capsys.readouterr().out
