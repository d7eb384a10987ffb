"""Per-split data sources: paired layouts, each split from the user's folder or the demo, reruns on a new path."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_workflow import TINY, planned_jobs, snakemake, write_config

from qtlib.config.types import DataConfig
from qtlib.data import ImageStore
from qtlib.data.prepare import PAIRED_LAYOUTS, paired_layout, prepare_paired

CFG = DataConfig(size=32, min_size=16, geometry="square")


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_pairs(root: Path, names: tuple[str, str], n: int = 2, seed: int = 0) -> None:
    for side in names:
        (root / side).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_noise(40, 48, seed + i)).save(root / names[0] / f"{i}.png")
        Image.fromarray(_noise(40, 48, seed + 100 + i)).save(root / names[1] / f"{i}.png")


@pytest.mark.parametrize("names", PAIRED_LAYOUTS)
def test_every_paired_layout_is_accepted(names: tuple[str, str], tmp_path: Path) -> None:
    _write_pairs(tmp_path / "in", names)
    assert paired_layout(tmp_path / "in") == names
    result = prepare_paired(tmp_path / "in", tmp_path / "out", CFG)
    manifest = pd.read_parquet(result.manifest)
    assert manifest["path"].tolist() == [f"{names[0]}/0.png", f"{names[0]}/1.png"]
    assert manifest["clean_path"].tolist() == [f"{names[1]}/0.png", f"{names[1]}/1.png"]
    assert len(ImageStore(result.clean)) == 2


def test_exception_no_layout_or_several(tmp_path: Path) -> None:
    (tmp_path / "none" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="degraded/ \\+ clean/, input/ \\+ target/, lq/ \\+ gt/"):
        paired_layout(tmp_path / "none")
    _write_pairs(tmp_path / "two", ("lq", "gt"))
    _write_pairs(tmp_path / "two", ("degraded", "clean"))
    with pytest.raises(ValueError, match="several paired layouts"):
        prepare_paired(tmp_path / "two", tmp_path / "out", CFG)


def test_missing_clean_side_names_the_alias(tmp_path: Path) -> None:
    (tmp_path / "in" / "lq").mkdir(parents=True)
    Image.fromarray(_noise(40, 40, 0)).save(tmp_path / "in" / "lq" / "a.png")
    with pytest.raises(FileNotFoundError, match="gt/ is missing"):
        prepare_paired(tmp_path / "in", tmp_path / "out", CFG)
    assert prepare_paired(tmp_path / "in", tmp_path / "out", CFG, require_clean=False).clean is None


def _write_unlabeled(root: Path, seed: int) -> None:
    root.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_noise(70, 90, seed + i)).save(root / f"real_{i}.png")


@pytest.mark.slow
def test_one_split_given_the_others_from_the_demo_and_a_new_path_reruns_it(tmp_path: Path) -> None:
    _write_unlabeled(tmp_path / "mine_a", 0)
    _write_unlabeled(tmp_path / "mine_b", 10)
    cfg = copy.deepcopy(TINY)
    cfg["data"] = {**cfg["data"], "unlabeled": "mine_a"}
    write_config(tmp_path, cfg)
    targets = [f"results/data/{s}/manifest.parquet" for s in ("paired", "unlabeled", "test")]
    snakemake(tmp_path, *targets)
    unlabeled = pd.read_parquet(tmp_path / "results/data/unlabeled/manifest.parquet")
    assert sorted(unlabeled["path"]) == ["real_0.png", "real_1.png"]  # the user's folder, not the demo
    paired = pd.read_parquet(tmp_path / "results/data/paired/manifest.parquet")
    assert len(paired) == TINY["demo"]["n_paired"] and paired["path"].str.startswith("degraded/").all()
    assert len(pd.read_parquet(tmp_path / "results/data/test/manifest.parquet")) == TINY["demo"]["n_test"]
    assert planned_jobs(snakemake(tmp_path, "-n", *targets).stdout) == {}  # up to date

    cfg["data"]["unlabeled"] = "mine_b"
    write_config(tmp_path, cfg)
    assert planned_jobs(snakemake(tmp_path, "-n", *targets).stdout) == {"prepare_unlabeled": 1}
    cfg["data"]["test"] = "mine_test"
    _write_pairs(tmp_path / "mine_test", ("input", "target"))
    write_config(tmp_path, cfg)
    assert planned_jobs(snakemake(tmp_path, "-n", *targets).stdout) == {"prepare_unlabeled": 1,
                                                                         "prepare_paired": 1}
    snakemake(tmp_path, *targets)
    test = pd.read_parquet(tmp_path / "results/data/test/manifest.parquet")
    assert test["path"].tolist() == ["input/0.png", "input/1.png"]
