"""Load, default-fill, validate and type a config against the JSON-Schema.

The schema (``workflow/schemas/config.schema.yaml``, shipped inside the package
as ``qtlib/config/config.schema.yaml``) is the single truth for keys, types,
ranges and defaults. Errors name the key, what was found and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from qtlib.config.types import Config

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A config file or mapping that does not match the schema."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """Return the parsed JSON-Schema of the config."""
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def fill_defaults(data: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """Return a copy of ``data`` with every missing key set to its schema default, recursively."""
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    if isinstance(data, dict):
        out = dict(data)
        props = schema.get("properties", {})
        for key, sub in props.items():
            sub = _resolve(sub, root)
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        for key, value in out.items():
            if key in props:
                out[key] = fill_defaults(value, props[key], root)
            elif isinstance(schema.get("additionalProperties"), dict):
                out[key] = fill_defaults(value, schema["additionalProperties"], root)
        return out
    if isinstance(data, list) and isinstance(schema.get("items"), dict):
        return [fill_defaults(v, schema["items"], root) for v in data]
    return data


def _describe(schema: dict[str, Any], root: dict[str, Any]) -> str:
    """Say in words which values ``schema`` allows."""
    schema = _resolve(schema, root)
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    if "oneOf" in schema:
        return " or ".join(_describe(s, root) for s in schema["oneOf"])
    kind = schema.get("type", "value")
    bounds = []
    for word, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if word in schema:
            bounds.append(f"{op} {schema[word]}")
    if kind == "array":
        n = ""
        if "minItems" in schema and schema.get("minItems") == schema.get("maxItems"):
            n = f"{schema['minItems']} "
        elif "minItems" in schema:
            n = f"at least {schema['minItems']} "
        items = schema.get("items")
        inner = _describe(items, root) if isinstance(items, dict) else "values"
        return f"a list of {n}items, each {inner}"
    text = {"number": "a number", "integer": "an integer", "string": "a string", "boolean": "true or false",
            "object": "a mapping", "null": "null"}.get(kind, str(kind))
    return text + (" " + " and ".join(bounds) if bounds else "")


def _key(path: typing.Iterable[Any]) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


def _format_error(err: jsonschema.ValidationError, root: dict[str, Any]) -> str:
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        msgs = []
        for name in extra:
            full = f"{key}.{name}" if err.absolute_path else name
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
            msgs.append(f"unknown config key '{full}'{hint}")
        return "\n".join(msgs)
    if err.validator == "required":
        return f"config key '{key}': {err.message}"
    return f"config key '{key}': got {json.dumps(err.instance)}, expected {_describe(err.schema, root)}"


def validate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Fill defaults and validate; return the completed mapping or raise :class:`ConfigError`."""
    schema = load_schema()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys, got {type(data).__name__}")
    full = fill_defaults(data, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(full), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        # one line per problem, each naming the source: a single mistake is a single line
        messages = [m for e in errors for m in _format_error(e, schema).splitlines()]
        raise ConfigError("\n".join(f"{source}: {m}" for m in messages))
    return full


def _build(tp: Any, value: Any) -> Any:
    """Convert a validated JSON value into the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v) for v in value)
        return tuple(_build(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if typing.get_origin(arg) is typing.Literal and value in typing.get_args(arg):
                return value
        non_literal = [a for a in args if a is not type(None) and typing.get_origin(a) is not typing.Literal]
        return _build(non_literal[0], value)
    if tp is float:
        return float(value)
    if tp is int:  # JSON-Schema's "integer" admits 2.0; the dataclass field is an int
        return int(value)
    return value


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a mapping (defaults filled) and return the typed :class:`Config`."""
    cfg = _build(Config, validate(data, source))
    check_budget(cfg, source)
    if not cfg.label.label_names:
        raise ConfigError(f"{source}: label.view_labels: false leaves no pseudo-label without label.mean_label: "
                          "true; turn one of them on")
    return cfg


def check_budget(cfg: Config, source: str = "config") -> None:
    """With an iteration budget (``train.steps``), every enabled loss term must start inside it.

    A term whose ``start`` lies at or beyond ``rounds x train.steps`` would silently never
    run (the paper's 2000-step starts with a small bank, for instance).

    Raises:
        ConfigError: naming the term, its start and the budget.
    """
    tc = cfg.train
    if tc.steps == 0:
        return
    budget = cfg.rounds * tc.steps
    enabled = {"rec": True, "per": True, "pref": tc.preference, "cropped": tc.cropped, "sup": True}
    for name, on in enabled.items():
        term = getattr(tc.losses, name)
        if on and term.weight > 0 and term.start >= 1 and term.start >= budget:  # a share is inside
            raise ConfigError(
                f"{source}: train.losses.{name}.start: {term.start:g} lies beyond the iteration budget "
                f"(rounds {cfg.rounds} x train.steps {tc.steps} = {budget} steps), so the term would never run; "
                f"lower the start, raise train.steps or rounds, or set its weight to 0")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config file (or only the defaults when ``path`` is None).

    Args:
        path: YAML file; None = schema defaults.
        overrides: mapping deep-merged on top of the file before validation.

    Returns:
        The frozen, typed :class:`Config`.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if overrides:
        data = deep_merge(data, overrides)
    return config_from_dict(data, source)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(config: Any) -> Any:
    """A JSON-ready plain copy of a config object (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def canonical_json(config: Any) -> str:
    """Canonical JSON of a config (slice): sorted keys, no spaces; used as Snakemake params."""
    return json.dumps(to_dict(config), sort_keys=True, separators=(",", ":"))
