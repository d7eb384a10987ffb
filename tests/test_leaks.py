"""Leak check: a test file with the bytes of a paired or unlabeled file is an error naming both files."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_workflow import TINY, snakemake, write_config

from qtlib.config.types import DataConfig
from qtlib.data.leaks import LEAK_SCHEMA, LeakError, check_leaks, find_leaks
from qtlib.data.prepare import prepare_images, prepare_paired

CFG = DataConfig(size=32, min_size=16, geometry="square")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def splits(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Three prepared splits; test/clean/t1.png is paired/clean/p1.png and test/degraded/t2.png is u1.png."""
    src = tmp_path / "src"
    for i in range(2):
        _png(src / "paired" / "degraded" / f"p{i}.png", i)
        _png(src / "paired" / "clean" / f"p{i}.png", 10 + i)
        _png(src / "unlabeled" / f"u{i}.png", 20 + i)
    for i in range(3):
        _png(src / "test" / "degraded" / f"t{i}.png", 30 + i)
        _png(src / "test" / "clean" / f"t{i}.png", 40 + i)
    shutil.copy(src / "paired" / "clean" / "p1.png", src / "test" / "clean" / "t1.png")
    shutil.copy(src / "unlabeled" / "u1.png", src / "test" / "degraded" / "t2.png")
    out = tmp_path / "prepared"
    manifests = {
        "paired": prepare_paired(src / "paired", out / "paired", CFG).manifest,
        "unlabeled": prepare_images(src / "unlabeled", out / "unlabeled", CFG).manifest,
        "test": prepare_paired(src / "test", out / "test", CFG).manifest,
    }
    return {s: (m, src / s) for s, m in manifests.items()}


def test_smoke_finds_both_leaks_on_either_side_of_a_pair(splits) -> None:
    leaks = find_leaks(splits["test"], {"paired": splits["paired"], "unlabeled": splits["unlabeled"]})
    src = splits["test"][1].parent
    assert list(leaks.columns) == LEAK_SCHEMA.names
    assert leaks[["test_file", "other_split", "other_file"]].values.tolist() == [
        [str(src / "test/clean/t1.png"), "paired", str(src / "paired/clean/p1.png")],
        [str(src / "test/degraded/t2.png"), "unlabeled", str(src / "unlabeled/u1.png")],
    ]


def test_exception_a_leak_is_an_error_naming_both_files(splits, tmp_path: Path) -> None:
    others = {"paired": splits["paired"], "unlabeled": splits["unlabeled"]}
    with pytest.raises(LeakError, match=r"test/degraded/t2\.png has the same bytes as unlabeled file .*u1\.png"):
        check_leaks(splits["test"], others, tmp_path / "report.parquet")
    assert not (tmp_path / "report.parquet").exists()


def test_warn_mode_logs_and_writes_the_report(splits, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    others = {"paired": splits["paired"], "unlabeled": splits["unlabeled"]}
    check_leaks(splits["test"], others, tmp_path / "report.parquet", mode="warn")
    assert "2 test file(s) are also training files" in caplog.text
    assert len(pd.read_parquet(tmp_path / "report.parquet")) == 2


def test_no_leak_gives_an_empty_report(splits, tmp_path: Path) -> None:
    leaks = check_leaks(splits["test"], {"paired": splits["paired"]}, tmp_path / "r.parquet", mode="warn")
    assert len(leaks) == 1  # only the paired one is compared
    leaks = check_leaks(splits["paired"], {"unlabeled": splits["unlabeled"]}, tmp_path / "r.parquet")
    assert leaks.empty and pd.read_parquet(tmp_path / "r.parquet").empty


@pytest.mark.slow
def test_workflow_stops_before_training_on_a_leak(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / "mine" / f"u{i}.png", i)
        _png(tmp_path / "mytest" / "degraded" / f"t{i}.png", 10 + i)
    shutil.copy(tmp_path / "mine" / "u0.png", tmp_path / "mytest" / "degraded" / "copy.png")
    cfg = copy.deepcopy(TINY)
    cfg["data"] = {**cfg["data"], "unlabeled": "mine", "test": "mytest"}
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "results/pretrain/model.pt", check=False)
    assert proc.returncode != 0 and not (tmp_path / "results/pretrain/model.pt").exists()
    log = (tmp_path / "results/logs/leak_check.log").read_text()
    assert "mytest/degraded/copy.png has the same bytes as unlabeled file mine/u0.png" in log

    cfg["data"]["leaks"] = "warn"
    write_config(tmp_path, cfg)
    snakemake(tmp_path, "results/data/leak_check.parquet")
    assert len(pd.read_parquet(tmp_path / "results/data/leak_check.parquet")) == 1
