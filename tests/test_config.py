"""The config schema is the single truth; dataclasses, files and Snakemake agree with it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from qtlib.cli import main
from qtlib.config import Config, ConfigError, config_from_dict, load_config, load_schema, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_schema_defaults_equal_dataclass_defaults() -> None:
    # The dataclasses carry defaults only for convenience; they must be the schema's.
    # (The named recipes live in the schema alone.)
    import dataclasses

    from_schema = config_from_dict({})
    assert set(from_schema.degrade.recipes) >= {"rain_source", "rain_target"}
    assert dataclasses.replace(from_schema, degrade=Config().degrade) == Config()


def test_shipped_configs_load() -> None:
    demo = load_config(ROOT / "config" / "config.yaml")
    paper = load_config(ROOT / "config" / "paper.yaml")
    assert [m.metric for m in demo.iqa.ensemble] == ["brisque", "niqe"]
    assert [(m.metric, m.weight) for m in paper.iqa.ensemble] == [("musiq", 0.4), ("brisque", 0.4), ("clipiqa", 0.2)]
    assert paper.model.backbone == "nafnet" and paper.train.lr == 5e-5 and paper.train.ema_decay == 0.998
    assert paper.train.betas == (0.9, 0.999)


def test_schema_properties_match_dataclass_fields() -> None:
    import dataclasses
    import typing

    schema = load_schema()

    def walk(cls: type, node: dict, path: str) -> None:
        props = node.get("properties", {})
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(props) == fields, f"{path}: schema {sorted(props)} != dataclass {sorted(fields)}"
        hints = typing.get_type_hints(cls)
        for name in fields:
            if dataclasses.is_dataclass(hints[name]):
                walk(hints[name], props[name], f"{path}.{name}")

    walk(Config, schema, "config")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"trian": {}}, r"unknown config key 'trian'; did you mean 'train'\?"),
        ({"train": {"lrr": 1.0}}, r"unknown config key 'train\.lrr'; did you mean 'lr'\?"),
        ({"train": {"lr": "fast"}}, r"config key 'train\.lr': got \"fast\", expected a number > 0"),
        ({"gate": {"tau1": -1}}, r"config key 'gate\.tau1': got -1, expected a number > 0 or 'auto'"),
        ({"model": {"backbone": "resnet"}}, r"config key 'model\.backbone'.*one of 'unet', 'nafnet'"),
        ({"iqa": {"blocks": [2]}}, r"config key 'iqa\.blocks'.*list of 2 items"),
        ({"iqa": {"ensemble": [{"metric": "brisque", "wieght": 1}]}}, r"iqa\.ensemble\[0\]\.wieght'; did you mean 'weight'"),
        ({"degrade": {"recipes": {"x": {"kind": "fog"}}}}, r"degrade\.recipes\.x\.kind'.*one of 'rain'"),
        ({"rounds": 0}, r"config key 'rounds': got 0, expected an integer >= 1"),
    ],
)
def test_invalid_configs_name_key_and_allowed_values(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(data)


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: -3\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(AttributeError):
        config.seed = 3  # type: ignore[misc]


def test_qt_config_show_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(ROOT / "config" / "paper.yaml")]) == 0
    printed = capsys.readouterr().out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    assert load_config(resolved) == load_config(ROOT / "config" / "paper.yaml")
    assert yaml.safe_load(printed) == to_dict(load_config(ROOT / "config" / "paper.yaml"))


def test_qt_config_show_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {}\n")
    assert main(["config", "show", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unknown config key 'modle'; did you mean 'model'?" in err


def test_snakemake_validates_with_the_same_schema() -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = ROOT / "workflow" / "schemas" / "config.schema.yaml"
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(config, str(schema))
    assert config["train"]["gpus"] == Config().train.gpus  # defaults filled by Snakemake too
    with pytest.raises(WorkflowError):
        validate({"trian": {}}, str(schema))


def test_environment_yml_pins_match_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = {p for p in pip_section if not p.startswith("-e")}
    assert env_pins == pins


def test_exception_start_beyond_iteration_budget() -> None:
    from qtlib.config import ConfigError, config_from_dict

    ok = {"rounds": 2, "train": {"steps": 1500, "losses": {"pref": {"start": 2000}}}}
    assert config_from_dict(ok).train.steps == 1500  # 2000 < 2 x 1500: the term runs in round 1
    bad = {"rounds": 1, "train": {"steps": 1500, "losses": {"pref": {"start": 2000}}}}
    with pytest.raises(ConfigError, match=r"train.losses.pref.start: 2000 lies beyond the iteration budget"):
        config_from_dict(bad)
    off = {"rounds": 1, "train": {"steps": 1500, "preference": False, "losses": {"pref": {"start": 2000}}}}
    assert config_from_dict(off).train.preference is False  # a term that is off may start anywhere


def test_start_below_one_is_a_share_of_the_budget() -> None:
    """train.losses.*.start: a value below 1 is a share of rounds x steps; 1 or more is a global step."""
    from qtlib.config.types import start_step
    from qtlib.train.step import resolve_starts

    cfg = config_from_dict({"rounds": 5, "train": {"steps": 2000}})
    assert cfg.train.losses.pref.start == 0.2 and cfg.train.losses.cropped.start == 0.2  # the authors' 20%
    losses = resolve_starts(cfg.train.losses, budget=cfg.rounds * cfg.train.steps)
    assert (losses.pref.start, losses.cropped.start, losses.rec.start) == (2000, 2000, 0)
    assert start_step(0.5, 7) == 3 and start_step(3, 7) == 3 and start_step(0, 7) == 0
    # a share is always inside the budget; a step beyond it is still an error
    config_from_dict({"rounds": 1, "train": {"steps": 10, "losses": {"pref": {"start": 0.99}}}})
