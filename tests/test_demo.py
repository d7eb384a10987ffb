"""qt demo-data: layout, counts, disjoint sources, determinism, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qtlib.cli import main
from qtlib.config import load_config
from qtlib.config.types import DemoConfig
from qtlib.data import UnknownRecipeError, make_demo_data
from qtlib.data.demo import catalog, split_sources

CONFIG = "seed: 11\ndemo: {n_paired: 5, n_unlabeled: 4, n_test: 3, size: 48}\n"


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    (root / "config.yaml").write_text(CONFIG)
    assert main(["demo-data", str(root / "demo"), "--config", str(root / "config.yaml")]) == 0
    return root


def test_layout_and_counts(demo: Path) -> None:
    out = demo / "demo"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir()) == [
        "paired", "paired/clean", "paired/degraded", "test", "test/clean", "test/degraded", "unlabeled",
    ]  # fmt: skip
    assert _pngs(out / "paired" / "degraded") == _pngs(out / "paired" / "clean") == [f"{i:04d}.png" for i in range(5)]
    assert len(_pngs(out / "unlabeled")) == 4
    assert _pngs(out / "test" / "degraded") == _pngs(out / "test" / "clean") == [f"{i:04d}.png" for i in range(3)]
    for path in out.rglob("*.png"):
        with Image.open(path) as img:
            assert img.size == (48, 48) and img.mode == "RGB"
    for split in ("paired", "test"):
        for name in _pngs(out / split / "clean"):
            clean = np.asarray(Image.open(out / split / "clean" / name), dtype=float)
            degraded = np.asarray(Image.open(out / split / "degraded" / name), dtype=float)
            assert np.abs(clean - degraded).mean() > 1  # the pair differs by the degradation


def test_record_and_disjoint_sources(demo: Path) -> None:
    record = json.loads((demo / "demo" / "demo.json").read_text())
    assert record["seed"] == 11 and record["demo"]["task"] == "rain"
    assert set(record["recipes"]) == {"rain_source", "rain_target"}
    by_set = {name: {s["name"] for s in group} for name, group in record["sources"].items()}
    assert by_set["paired"] and by_set["unlabeled"] and by_set["test"]
    assert not (by_set["paired"] & by_set["unlabeled"] or by_set["paired"] & by_set["test"])
    assert not by_set["unlabeled"] & by_set["test"]
    files = record["files"]
    assert len(files) == 5 + 4 + 3
    for entry in files:
        split = entry["file"].split("/")[0]
        assert entry["source"] in by_set[split]
        assert entry["recipe"] == ("rain_source" if split == "paired" else "rain_target")
        assert entry["params"]["kind"] == "rain" and entry["box"][2] == 48
        assert (entry["clean"] is None) == (split == "unlabeled")


def test_deterministic_and_replaces_earlier_demo(demo: Path, tmp_path: Path) -> None:
    cfg = load_config(demo / "config.yaml")
    make_demo_data(tmp_path / "again", cfg.demo, cfg.degrade.recipes, cfg.seed)
    assert _tree(tmp_path / "again") == _tree(demo / "demo")
    other = make_demo_data(tmp_path / "again", cfg.demo, cfg.degrade.recipes, cfg.seed + 1)  # replaces it
    assert json.loads(other.record.read_text())["seed"] == 12
    assert _tree(tmp_path / "again") != _tree(demo / "demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp folders left


def test_default_config_counts(tmp_path: Path) -> None:
    cfg = load_config(None)
    demo = DemoConfig(size=64)  # default counts and recipes, smaller crops to stay fast
    result = make_demo_data(tmp_path / "d", demo, cfg.degrade.recipes, cfg.seed)
    assert result.counts == {"paired": cfg.demo.n_paired, "unlabeled": cfg.demo.n_unlabeled, "test": cfg.demo.n_test}
    assert len(_pngs(tmp_path / "d" / "unlabeled")) == cfg.demo.n_unlabeled


def test_split_every_source_once() -> None:
    sources = catalog()
    assert len({s.name for s in sources}) == len(sources)
    split = split_sources(sources, [12, 8, 4], seed=0)
    names = [s.name for group in split.values() for s in group]
    assert sorted(names) == sorted(s.name for s in sources)
    assert all(any(s.colour for s in group) for group in split.values())  # colour photos in every set
    assert split == split_sources(sources, [12, 8, 4], seed=0)


def test_exception_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipes = load_config(None).degrade.recipes
    with pytest.raises(ValueError, match="'haze_source' is a haze recipe, but demo.task is 'rain'"):
        make_demo_data(tmp_path / "d", DemoConfig(source_recipe="haze_source"), recipes, 0)
    with pytest.raises(UnknownRecipeError, match="unknown recipe 'nope'"):
        make_demo_data(tmp_path / "d", DemoConfig(target_recipe="nope"), recipes, 0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("user data")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    assert main(["demo-data", str(tmp_path / "mine"), "--config", str(config)]) == 1
    assert "not a qt demo-data folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "precious.txt").read_text() == "user data"
