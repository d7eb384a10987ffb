"""Checks of a whole config before the first job runs: metric names, data folders, cross-field rules.

The schema (``qtlib.config``) checks each key alone. What it cannot see is
checked here, once, by ``qt config show`` and by the Snakefile before it builds
the DAG, so that a bad config fails in seconds with a one-line message naming
the key instead of after pretraining with a traceback:

- every metric of ``iqa.ensemble`` and ``evaluate.panel`` is in the catalog
  (and the ensemble has no full-reference metric);
- every given ``data.*`` folder exists, is a folder and holds images where
  ``qt prepare`` looks for them;
- patch sizes fit the prepared images; blocks, patches and crops are large
  enough for the metrics that score them;
- label shards do not outnumber the unlabeled images; every enabled loss term
  starts inside the iteration budget.

This module sits above the building blocks it consults (the IQA catalog, the
image lister, the training switches); ``qtlib.config`` itself stays free of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qtlib.config import Config, ConfigError, config_from_dict
from qtlib.config.loader import check_budget


def preflight(data: dict[str, Any], source: str = "config", base: str | Path | None = None) -> Config:
    """Validate a config mapping against the schema, then :func:`check_config`; return the typed config.

    Raises:
        ConfigError: one line per problem, each naming the source and the key.
    """
    cfg = config_from_dict(data, source)
    check_config(cfg, source, base)
    return cfg


def check_config(cfg: Config, source: str = "config", base: str | Path | None = None) -> None:
    """Every check the schema cannot do (see the module docstring).

    Args:
        cfg: a schema-valid config.
        source: named at the start of the message (the config file).
        base: folder that relative ``data.*`` paths are relative to (default: the working directory).

    Raises:
        ConfigError: the first problem found, as ``"<source>: <key>: <what is wrong>"``.
    """
    for problem in problems(cfg, Path.cwd() if base is None else Path(base)):
        raise ConfigError(f"{source}: {problem}")
    check_budget(cfg, source)


def problems(cfg: Config, base: Path) -> Iterator[str]:
    """Yield each problem as ``"<key>: <message>"``, in the order a user would fix them."""
    yield from _metric_problems(cfg)
    yield from _path_problems(cfg, base)
    yield from _learned_problems(cfg, base)
    yield from _view_problems(cfg)
    yield from _size_problems(cfg)
    yield from _switch_problems(cfg)
    yield from _count_problems(cfg, base)


def _learned_problems(cfg: Config, base: Path) -> Iterator[str]:
    """``iqa.learned.path``, when given, is a file (resolved as the ``data.*`` paths are)."""
    given = cfg.iqa.learned.path
    if given and not resolve(given, base).is_file():
        yield (f"iqa.learned.path: {given} is not a file (a fitted liteiqa model; leave it empty and the workflow "
               "fits one)")


def _view_problems(cfg: Config) -> Iterator[str]:
    """``train.strong_view``'s ranges: low <= high, JPEG quality within 1..100."""
    sv = cfg.train.strong_view
    for key in ("blur_sigma", "noise_std", "jpeg_quality"):
        lo, hi = getattr(sv, key)
        if lo > hi:
            yield f"train.strong_view.{key}: [{lo:g}, {hi:g}] has its low end above its high end"
    lo, hi = sv.jpeg_quality
    if not 1 <= lo <= 100 or not 1 <= hi <= 100:
        yield f"train.strong_view.jpeg_quality: [{lo:g}, {hi:g}] must lie within 1..100"


def _metric_problems(cfg: Config) -> Iterator[str]:
    from qtlib.iqa.catalog import CATALOG

    known = ", ".join(sorted(CATALOG))
    for key, members in (("iqa.ensemble", cfg.iqa.ensemble), ("train.reward_ensemble", cfg.train.reward_ensemble)):
        for i, member in enumerate(members):
            info = CATALOG.get(member.metric)
            if info is None:
                yield f"{key}[{i}].metric: unknown metric {member.metric!r}; the catalog has: {known}"
            elif info.needs_reference:
                yield (f"{key}[{i}].metric: {member.metric!r} needs a reference image; the ensemble scores "
                       "unlabeled images, so use no-reference metrics")
    for i, name in enumerate(cfg.evaluate.panel):
        if name not in CATALOG:
            yield f"evaluate.panel[{i}]: unknown metric {name!r}; the catalog has: {known}"



def resolve(path: str, base: Path) -> Path:
    """A ``data.*`` path as the workflow reads it: ``~`` expanded, relative to ``base``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _image_folders(key: str, folder: Path) -> list[tuple[str, bool]]:
    """The sub-folders of a ``data.<key>`` folder that ``qt prepare`` reads, each with whether it must exist.

    Paired and test sets use one layout of :data:`qtlib.data.prepare.PAIRED_LAYOUTS` (the test set's
    clean folder is optional: without it there is no ground truth); unlabeled images are the folder.

    Raises:
        FileNotFoundError, ValueError: no paired layout, or several (from ``paired_layout``).
    """
    from qtlib.data.prepare import paired_layout

    if key == "unlabeled":
        return [("", True)]
    degraded, clean = paired_layout(folder)
    return [(degraded, True), (clean, key == "paired")]


def _path_problems(cfg: Config, base: Path) -> Iterator[str]:
    for key in ("paired", "unlabeled", "test"):
        given = getattr(cfg.data, key)
        if not given:
            continue
        folder = resolve(given, base)
        if not folder.exists():
            yield f"data.{key}: {given} does not exist"
            continue
        if not folder.is_dir():
            yield f"data.{key}: {given} is not a folder"
            continue
        try:
            subs = _image_folders(key, folder)
        except (FileNotFoundError, ValueError) as exc:
            yield f"data.{key}: {given}: {str(exc).split(': ', 1)[-1]}"
            continue
        for sub, required in subs:
            where = folder / sub if sub else folder
            shown = f"{given}/{sub}" if sub else given
            if not where.is_dir():
                if required:
                    yield f"data.{key}: {given} has no {sub}/ folder"
            elif not _has_image(where):
                yield f"data.{key}: {shown} holds no image files ({', '.join(_extensions())}, searched recursively)"


def _extensions() -> tuple[str, ...]:
    from qtlib.imageio import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def _has_image(folder: Path) -> bool:
    exts = _extensions()
    return any(p.suffix.lower() in exts and p.is_file() for p in folder.rglob("*"))


def _count_images(folder: Path) -> int:
    from qtlib.imageio import list_images

    return len(list_images(folder))


def _size_problems(cfg: Config) -> Iterator[str]:
    side = _prepared_side(cfg)
    if side is not None:
        yield from _side_problems(cfg, *side)
    yield from _reward_size_problems(cfg)


def _prepared_side(cfg: Config) -> tuple[int, str] | None:
    """The side every prepared image has, and the key that sets it, when it is known before intake.

    Square geometry: ``data.size``. Native geometry keeps each image at its own size, so the side
    is known only for the generated demo (``demo.size``, or ``data.max_side`` when smaller); with a
    user folder, an image smaller than a patch is reported when it is read.
    """
    if cfg.data.geometry == "square":
        return cfg.data.size, "data.size"
    if any(getattr(cfg.data, split) for split in ("paired", "unlabeled", "test")):
        return None
    if cfg.data.max_side and cfg.data.max_side < cfg.demo.size:
        return cfg.data.max_side, "data.max_side"
    return cfg.demo.size, "demo.size"


def _side_problems(cfg: Config, size: int, key_of_size: str) -> Iterator[str]:
    from qtlib.iqa.catalog import CATALOG

    for key, patch in (("pretrain.patch_size", cfg.pretrain.patch_size), ("train.patch_size", cfg.train.patch_size)):
        if patch > size:
            yield f"{key}: {patch} px is larger than the prepared images ({key_of_size} {size} px)"
    infos = [(m.metric, CATALOG[m.metric]) for m in cfg.iqa.ensemble if m.metric in CATALOG]
    gh, gw = cfg.iqa.blocks
    block = min(size // gh, size // gw)
    for name, info in infos:
        if block < info.min_size:
            yield (f"iqa.blocks: {gh}x{gw} blocks of the {key_of_size} {size} px images are {block} px, below "
                   f"{name}'s minimum side {info.min_size} px; raise {key_of_size} or use fewer blocks")
    for i, name in enumerate(cfg.evaluate.panel):
        if name in CATALOG and size < CATALOG[name].min_size:
            yield (f"evaluate.panel[{i}]: {name} needs images of at least {CATALOG[name].min_size} px, "
                   f"{key_of_size} is {size}")


def _reward_size_problems(cfg: Config) -> Iterator[str]:
    """The reward terms' images (the reward window, its crops) must be large enough for some member."""
    from qtlib.iqa.catalog import CATALOG
    from qtlib.train.samples import reward_side
    from qtlib.train.step import crop_side, reward_iqa

    infos = [(m.metric, CATALOG[m.metric]) for m in reward_iqa(cfg.train, cfg.iqa).ensemble if m.metric in CATALOG]
    if cfg.train.method != "qualiteacher" or not infos:
        return
    known = _prepared_side(cfg)
    window = reward_side(cfg.train.reward_window, cfg.train.patch_size, known[0] if known else None)
    smallest = min(info.reward_size for _, info in infos)
    lc = cfg.train.losses
    if cfg.train.preference and lc.pref.weight > 0 and window < smallest:
        yield (f"train.reward_window: no member of iqa.ensemble is well defined on {window} px windows (the "
               f"smallest needs {smallest} px), so train.losses.pref has no reward; raise train.reward_window "
               "or the image size")
    crop = crop_side(window, lc.cropped.fraction)
    if cfg.train.cropped and lc.cropped.weight > 0 and crop < smallest:
        yield (f"train.losses.cropped.fraction: crops of {crop} px ({lc.cropped.fraction} x the {window} px reward "
               f"window) are below every iqa.ensemble member's reward size (the smallest needs {smallest} px); "
               "raise the fraction or train.reward_window, or set train.losses.cropped.weight to 0")


def _switch_problems(cfg: Config) -> Iterator[str]:
    from qtlib.train.step import resolve_switches

    try:
        resolve_switches(cfg.train, conditioned=cfg.model.conditioning.enabled, perceptual="none")
    except ValueError as exc:
        yield str(exc)


def _count_problems(cfg: Config, base: Path) -> Iterator[str]:
    if cfg.data.unlabeled:
        folder = resolve(cfg.data.unlabeled, base)
        if not folder.is_dir():
            return  # reported by _path_problems
        n, where = _count_images(folder), f"image files in data.unlabeled ({cfg.data.unlabeled})"
    else:
        n, where = cfg.demo.n_unlabeled, "unlabeled demo images (demo.n_unlabeled)"
    if cfg.label.shards > n:
        yield f"label.shards: {cfg.label.shards} shards for {n} {where} would leave a shard empty; use at most {n}"
    yield from _epoch_budget_problems(cfg, n)


def _epoch_budget_problems(cfg: Config, n_unlabeled: int) -> Iterator[str]:
    """Without ``train.steps``, a term must start before the most steps the epochs can make.

    A round's bank holds at most ``gate.bank_size`` labels per image, so a round makes at most
    ``train.epochs x ceil(n x bank_size / train.batch_size)`` steps (fewer with several GPUs).
    """
    tc = cfg.train
    if tc.steps != 0:
        return  # check_budget covers an explicit budget
    most = cfg.rounds * tc.epochs * math.ceil(n_unlabeled * cfg.gate.bank_size / tc.batch_size)
    enabled = {"rec": True, "per": True, "pref": tc.preference, "cropped": tc.cropped, "sup": True}
    for name, on in enabled.items():
        term = getattr(tc.losses, name)
        if on and term.weight > 0 and term.start >= 1 and term.start >= most:  # a share is inside
            yield (f"train.losses.{name}.start: {term.start:g} lies beyond the most steps the epochs can make "
                   f"(rounds {cfg.rounds} x train.epochs {tc.epochs} x at most {n_unlabeled} images x bank_size "
                   f"{cfg.gate.bank_size} / batch_size {tc.batch_size} = {most}), so the term would never run; "
                   "lower the start or set train.steps")
