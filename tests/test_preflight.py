"""Whole-config checks before the first job: metric names, data folders, cross-field rules, one line each.

The property test mutates the tiny workflow config the way a hostile but fair user
would (wrong types, unknown keys, bad metric names, out-of-range numbers, missing
paths) and requires that loading it either succeeds or raises a one-line
:class:`ConfigError` naming the source: never another exception, never a traceback.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qtlib.cli import main
from qtlib.config import ConfigError, load_config
from qtlib.preflight import preflight

sys.path.insert(0, str(Path(__file__).parent))
from test_workflow import SNAKEFILE, SNAKEMAKE, TINY  # noqa: E402

SOURCE = "tiny.yaml"


def _images(folder: Path, n: int, size: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"im{i}.png")


def _one_line(exc: ConfigError) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    assert text.startswith(f"{SOURCE}: "), text
    return text


def _fails(data: dict[str, Any], base: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(data, SOURCE, base)
    return _one_line(info.value)


def _with(**sections: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(TINY)
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


def test_smoke_tiny_and_shipped_configs_pass(tmp_path: Path) -> None:
    preflight(TINY, SOURCE, tmp_path)
    root = Path(__file__).resolve().parents[1]
    for name in ("config.yaml", "paper.yaml"):
        path = root / "config" / name
        preflight(yaml.safe_load(path.read_text()), str(path), root)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"iqa": {"ensemble": [{"metric": "brisq", "weight": 1.0}]}},
         "iqa.ensemble[0].metric: unknown metric 'brisq'; the catalog has: "),
        ({"iqa": {"ensemble": [{"metric": "psnr", "weight": 1.0}]}}, "iqa.ensemble[0].metric: 'psnr' needs a reference"),
        ({"evaluate": {"panel": ["brisque", "nope"]}}, "evaluate.panel[1]: unknown metric 'nope'"),
        ({"train": {"patch_size": 96}}, "train.patch_size: 96 px is larger than the prepared images (demo.size 64 px)"),
        ({"pretrain": {"patch_size": 128}}, "pretrain.patch_size: 128 px is larger"),
        ({"iqa": {"ensemble": [{"metric": "niqe", "weight": 1.0}]}},
         "iqa.blocks: 2x2 blocks of the demo.size 64 px images are 32 px, below niqe's minimum side 96 px"),
        ({"label": {"shards": 5}}, "label.shards: 5 shards for 4 unlabeled demo images (demo.n_unlabeled)"),
        ({"train": {"steps": 3, "losses": {"pref": {"start": 6}}}},
         "train.losses.pref.start: 6 lies beyond the iteration budget"),
        ({"train": {"losses": {"pref": {"start": 1000}}}},
         "train.losses.pref.start: 1000 lies beyond the most steps the epochs can make"),
        ({"train": {"score_condition": False}}, "train.preference needs train.score_condition"),
    ],
)
def test_exception_cross_field_rules_name_the_key(sections: dict[str, Any], expected: str, tmp_path: Path) -> None:
    assert expected in _fails(_with(**sections), tmp_path)


def test_exception_crop_below_every_reward_member(tmp_path: Path) -> None:
    data = _with(data={"size": 64}, train={"patch_size": 24, "reward_window": 24,
                                           "losses": {"per": {"kind": "none"}, "cropped": {"fraction": 0.5}}})
    assert "train.losses.cropped.fraction: crops of 12 px (0.5 x the 24 px reward window)" in _fails(data, tmp_path)
    data["train"]["reward_window"] = 0  # 0 = the training patch
    assert "crops of 12 px" in _fails(data, tmp_path)
    data["train"]["reward_window"] = 192  # capped at the 64 px images: crops of 32 px
    preflight(data, SOURCE, tmp_path)
    data["train"]["reward_window"] = 24
    data["train"]["losses"]["cropped"]["weight"] = 0.0  # the term is off: any crop size will do
    preflight(data, SOURCE, tmp_path)


def test_exception_data_paths_name_the_key(tmp_path: Path) -> None:
    assert _fails(_with(data={"unlabeled": "/x/y"}), tmp_path) == f"{SOURCE}: data.unlabeled: /x/y does not exist"
    (tmp_path / "file.png").write_bytes(b"")
    assert "data.unlabeled: file.png is not a folder" in _fails(_with(data={"unlabeled": "file.png"}), tmp_path)
    (tmp_path / "empty").mkdir()
    assert "data.unlabeled: empty holds no image files" in _fails(_with(data={"unlabeled": "empty"}), tmp_path)
    _images(tmp_path / "paired" / "degraded", 1)
    assert "data.paired: paired has no clean/ folder" in _fails(_with(data={"paired": "paired"}), tmp_path)
    _images(tmp_path / "test" / "clean", 1)
    assert "data.test: test: no paired layout found; expected one of degraded/ + clean/, input/ + target/" in _fails(
        _with(data={"test": "test"}), tmp_path)
    _images(tmp_path / "aliased" / "lq", 1)  # a test set in another accepted layout, without ground truth
    preflight(_with(data={"test": "aliased"}), SOURCE, tmp_path)
    _images(tmp_path / "aliased" / "input", 1)
    assert "data.test: aliased: several paired layouts at once" in _fails(_with(data={"test": "aliased"}), tmp_path)


def test_user_data_counts_against_the_shards(tmp_path: Path) -> None:
    _images(tmp_path / "real" / "sub", 3)  # recursive, as qt prepare reads it
    preflight(_with(data={"unlabeled": "real"}, label={"shards": 3}), SOURCE, tmp_path)
    assert "label.shards: 4 shards for 3 image files in data.unlabeled (real)" in _fails(
        _with(data={"unlabeled": "real"}, label={"shards": 4}), tmp_path)


def test_qt_config_show_reports_cross_field_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with(iqa={"ensemble": [{"metric": "nosuch", "weight": 1.0}]})))
    assert main(["config", "show", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "iqa.ensemble[0].metric: unknown metric 'nosuch'" in err


def test_exception_integral_float_becomes_an_int() -> None:
    # JSON-Schema admits 2.0 as an integer; the typed config must still hold an int (range(rounds) works)
    cfg = load_config(None, {"rounds": 2.0})
    assert cfg.rounds == 2 and isinstance(cfg.rounds, int)


# -- property-based: mutations of the tiny config ---------------------------------------------------------------

def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a nested mapping/list (leaves and inner nodes)."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


BASE = copy.deepcopy(TINY)
BASE["train"]["losses"]["pref"] = {"start": 0, "low_levels": [4, 5]}
BASE["gate"]["tau1"] = "auto"
KEY_PATHS = _paths(BASE)

WRONG_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                   st.integers(), max_size=2),
)
METRIC_NAMES = st.one_of(st.sampled_from(["brisque", "niqe", "piqe", "psnr", "musiq", "BRISQUE", "", "nope"]),
                         st.text(max_size=10))


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


@st.composite
def mutations(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "unknown_key", "metric", "number", "path", "delete"]))
        path = draw(st.sampled_from(KEY_PATHS))
        try:
            if kind == "value":
                _set(data, path, draw(WRONG_VALUES))
            elif kind == "unknown_key":
                parent = path[:-1]
                node: Any = data
                for part in parent:
                    node = node[part]
                if isinstance(node, dict):
                    node[draw(st.text(min_size=1, max_size=8))] = draw(WRONG_VALUES)
            elif kind == "metric":
                where = draw(st.sampled_from([("iqa", "ensemble", 0, "metric"), ("evaluate", "panel", 0)]))
                _set(data, where, draw(METRIC_NAMES))
            elif kind == "number":
                _set(data, path, draw(st.one_of(st.integers(-5, 5000), st.floats(-1.0, 2.0))))
            elif kind == "path":
                key = draw(st.sampled_from(["paired", "unlabeled", "test"]))
                data["data"][key] = draw(st.sampled_from(["missing", "/no/such/dir", "file.png", "empty", ""]))
            else:
                _delete(data, path)
        except (KeyError, IndexError, TypeError):
            pass  # the path no longer exists after an earlier mutation
    return data


def _delete(data: dict[str, Any], path: tuple[Any, ...]) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("preflight")
    (base / "file.png").write_bytes(b"")
    (base / "empty").mkdir()
    return base


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations())
def test_property_mutated_configs_give_one_line_or_pass(base_dir: Path, data: dict[str, Any]) -> None:
    try:
        preflight(data, SOURCE, base_dir)
    except ConfigError as exc:
        for line in str(exc).splitlines():  # one line per problem (a mutation can make two)
            assert line.startswith(f"{SOURCE}: ") and "Traceback" not in line, str(exc)
        assert len(str(exc).splitlines()) <= 3 * 2, str(exc)


# -- through Snakemake: one line instead of the jsonschema dump --------------------------------------------------

@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"trian": {}}, "config/config.yaml: unknown config key 'trian'; did you mean 'train'?"),
        ({"iqa": {"ensemble": [{"metric": "nosuch", "weight": 1}]}}, "iqa.ensemble[0].metric: unknown metric 'nosuch'"),
        ({"data": {"unlabeled": "/x/y"}}, "config/config.yaml: data.unlabeled: /x/y does not exist"),
    ],
)
def test_snakemake_dry_run_prints_one_line(tmp_path: Path, bad: dict[str, Any], expected: str) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump({**TINY, **bad}))
    proc = subprocess.run([SNAKEMAKE, "-s", str(SNAKEFILE), "-d", str(tmp_path), "-n", "--cores", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [l for l in (proc.stdout + proc.stderr).splitlines()
             if l.strip() and not l.startswith("Using workflow specific profile")]
    assert lines == [f"config error: {lines[0].removeprefix('config error: ')}"] and expected in lines[0], lines


def test_exception_strong_view_ranges_and_learned_path(tmp_path: Path) -> None:
    bad = _with(train={"strong_view": {"enabled": True, "noise_std": [0.05, 0.01]}})
    assert "train.strong_view.noise_std: [0.05, 0.01] has its low end above its high end" in _fails(bad, tmp_path)
    jpeg = _with(train={"strong_view": {"jpeg_quality": [0, 90]}})
    assert "train.strong_view.jpeg_quality: [0, 90] must lie within 1..100" in _fails(jpeg, tmp_path)
    missing = _with(iqa={"learned": {"path": "fits/model.pt"}})
    assert "iqa.learned.path: fits/model.pt is not a file" in _fails(missing, tmp_path)
    (tmp_path / "fits").mkdir()
    (tmp_path / "fits" / "model.pt").write_bytes(b"x")  # resolved against the config's folder, as data.* are
    preflight(missing, SOURCE, tmp_path)
