"""Offline demo data (``qt demo-data``) from photos that ship inside installed packages.

A small real-world proxy: square crops of ``demo.size`` from scikit-image's and
matplotlib's sample photos, split into three sets with disjoint source photos:

- ``paired/{degraded,clean}``: the synthetic source domain (``demo.source_recipe``);
- ``unlabeled/``: the shifted "real" target domain (``demo.target_recipe``), clean kept nowhere;
- ``test/{degraded,clean}``: the target domain with its clean ground truth kept aside.

Everything is drawn from seeds derived from the config seed, so a rerun writes
identical files. ``OUT/demo.json`` records the source photo, crop box and
degradation parameters of every file.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qtlib.config.types import DegradeConfig, DemoConfig, Recipe
from qtlib.data.degradations import degrade_seeded, derive_seed, get_recipe, recipe_record, versions
from qtlib.data.store import commit_path, staging_path, remove_path, write_json
from qtlib.imageio import to_tensor, write_image

SETS = ("paired", "unlabeled", "test")


def _skimage(loader: Callable[[], Any]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        image = loader()
        return image[0] if isinstance(image, tuple) else image

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        with cbook.get_sample_data(name, asfileobj=True) as fh:
            return np.asarray(Image.open(io.BytesIO(fh.read())).convert("RGB"))

    return load


@dataclass(frozen=True)
class Source:
    """A photo shipped inside an installed package."""

    name: str
    origin: str
    colour: bool
    load: Callable[[], np.ndarray]


def catalog() -> list[Source]:
    """The demo's source photos: natural photos and textures that load offline, no duplicates.

    ``skimage.data.cat`` is the same photo as ``chelsea`` and the right motorcycle
    frame nearly the same as the left, so they are left out (sets must be disjoint).
    """
    from skimage import data as sk

    colour = [
        Source("astronaut", "skimage.data.astronaut", True, _skimage(sk.astronaut)),
        Source("chelsea", "skimage.data.chelsea", True, _skimage(sk.chelsea)),
        Source("coffee", "skimage.data.coffee", True, _skimage(sk.coffee)),
        Source("rocket", "skimage.data.rocket", True, _skimage(sk.rocket)),
        Source("motorcycle", "skimage.data.stereo_motorcycle[0]", True, _skimage(sk.stereo_motorcycle)),
        Source("hubble", "skimage.data.hubble_deep_field", True, _skimage(sk.hubble_deep_field)),
        Source("grace_hopper", "matplotlib sample_data grace_hopper.jpg", True, _matplotlib("grace_hopper.jpg")),
    ]
    grey = [
        Source("camera", "skimage.data.camera", False, _skimage(sk.camera)),
        Source("coins", "skimage.data.coins", False, _skimage(sk.coins)),
        Source("clock", "skimage.data.clock", False, _skimage(sk.clock)),
        Source("moon", "skimage.data.moon", False, _skimage(sk.moon)),
        Source("brick", "skimage.data.brick", False, _skimage(sk.brick)),
        Source("grass", "skimage.data.grass", False, _skimage(sk.grass)),
        Source("gravel", "skimage.data.gravel", False, _skimage(sk.gravel)),
    ]
    return colour + grey


@dataclass(frozen=True)
class DemoResult:
    """Outcome of :func:`make_demo_data`: the folder, files per set, and the record."""

    out_dir: Path
    counts: dict[str, int]
    record: Path


def _allocate(n_items: int, weights: Sequence[int]) -> list[int]:
    """Split ``n_items`` in proportion to ``weights`` (largest remainder), at least one each when possible."""
    exact = [n_items * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: n_items - sum(shares)]:
        shares[i] += 1
    for i in range(len(shares)):  # an empty set takes one item from the largest
        if shares[i] == 0 and n_items >= len(weights):
            shares[max(range(len(shares)), key=lambda j: shares[j])] -= 1
            shares[i] = 1
    return shares


def split_sources(sources: Sequence[Source], counts: Sequence[int], seed: int) -> dict[str, list[Source]]:
    """Assign every source photo to one set (disjoint), colour and grey photos spread across sets."""
    g = torch.Generator().manual_seed(derive_seed(seed, "demo", "split"))
    out: dict[str, list[Source]] = {name: [] for name in SETS}
    for colour in (True, False):
        group = [s for s in sources if s.colour == colour]
        group = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
        start = 0
        for name, share in zip(SETS, _allocate(len(group), counts), strict=True):
            out[name] += group[start : start + share]
            start += share
    return out


def _photo(source: Source, size: int) -> np.ndarray:
    """The source as RGB uint8, its shorter side brought down to ``2 * size`` (so a crop shows a scene,
    not a detail) but never up, except to ``size`` for a photo smaller than one crop."""
    image = source.load()
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    pil = Image.fromarray(image).convert("RGB")
    short = max(size, min(min(pil.size), 2 * size))
    if short == min(pil.size):
        return np.asarray(pil)
    scale = short / min(pil.size)
    new_size = (max(size, round(pil.width * scale)), max(size, round(pil.height * scale)))
    return np.asarray(pil.resize(new_size, Image.Resampling.BICUBIC))


def _crop(photo: np.ndarray, size: int, g: torch.Generator) -> tuple[np.ndarray, list[int]]:
    """A random ``size`` crop; flat crops (grey std < 0.05) are redrawn up to 10 times."""
    h, w = photo.shape[:2]
    best, best_box, best_std = photo[:size, :size], [0, 0], -1.0
    for _ in range(10):
        top = int(torch.randint(0, h - size + 1, (), generator=g))
        left = int(torch.randint(0, w - size + 1, (), generator=g))
        crop = photo[top : top + size, left : left + size]
        std = float(crop.mean(axis=2).std() / 255.0)
        if std > best_std:
            best, best_box, best_std = crop, [top, left], std
        if std >= 0.05:
            break
    return np.ascontiguousarray(best), [*best_box, size]


def _check_recipes(demo: DemoConfig, recipes: Mapping[str, Recipe]) -> dict[str, Recipe]:
    config = DegradeConfig(recipes=dict(recipes))
    chosen = {}
    for key in ("source_recipe", "target_recipe"):
        name = getattr(demo, key)
        recipe = get_recipe(config, name)
        if recipe.kind != demo.task:
            raise ValueError(f"demo.{key}: recipe {name!r} is a {recipe.kind} recipe, but demo.task is {demo.task!r}")
        chosen[key] = recipe
    return chosen


def _files(set_name: str, index: int) -> tuple[str, str | None]:
    """(degraded file, clean file or None) relative to the demo folder."""
    name = f"{index:04d}.png"
    if set_name == "unlabeled":
        return f"unlabeled/{name}", None
    return f"{set_name}/degraded/{name}", f"{set_name}/clean/{name}"


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: the crops are tiny, and a thread pool only adds synchronisation
    (measured 10x slower on a busy 2-core machine). Results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _SetPlan:
    name: str
    photos: list[tuple[Source, np.ndarray]]
    count: int
    recipe_name: str
    recipe: Recipe


def _make_set(tmp: Path, plan: _SetPlan, size: int, seed: int) -> list[dict[str, Any]]:
    """Write ``plan.count`` crops, round-robin over the set's photos; return one record per file."""
    g = torch.Generator().manual_seed(derive_seed(seed, "demo", plan.name, "crops"))
    records = []
    for index in range(plan.count):
        source, photo = plan.photos[index % len(plan.photos)]
        crop, box = _crop(photo, size, g)
        clean = to_tensor(crop)
        result = degrade_seeded(clean[None], plan.recipe, [derive_seed(seed, "demo", plan.name, str(index))])
        degraded_file, clean_file = _files(plan.name, index)
        write_image(tmp / degraded_file, result.images[0])
        if clean_file is not None:
            write_image(tmp / clean_file, clean)
        records.append(
            {
                "file": degraded_file,
                "clean": clean_file,
                "source": source.name,
                "box": box,
                "recipe": plan.recipe_name,
                "params": result.params[0],
            }
        )
    return records


def _check_target(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier demo (a user's data must never be swapped out)."""
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "demo.json").is_file()):
        raise ValueError(f"{out_dir}: exists and is not a qt demo-data folder (no demo.json); choose another OUT_DIR")


def make_demo_data(out_dir: str | Path, demo: DemoConfig, recipes: Mapping[str, Recipe], seed: int) -> DemoResult:
    """Build the demo folder: ``paired/{degraded,clean}``, ``unlabeled/``, ``test/{degraded,clean}``, ``demo.json``.

    Args:
        out_dir: the folder to (re)create; an earlier demo there is replaced only once the new one is complete.
        demo: the ``demo`` config section (task, recipe names, counts, crop size).
        recipes: ``degrade.recipes`` of the config.
        seed: the config seed.

    Returns:
        A :class:`DemoResult`.

    Raises:
        UnknownRecipeError: a recipe name is not in ``recipes``.
        ValueError: a recipe's kind differs from ``demo.task``, or ``out_dir`` holds something else.
    """
    out_dir = Path(out_dir)
    chosen = _check_recipes(demo, recipes)
    _check_target(out_dir)
    counts = {"paired": demo.n_paired, "unlabeled": demo.n_unlabeled, "test": demo.n_test}
    sources = split_sources(catalog(), list(counts.values()), seed)
    recipe_of = {"paired": "source_recipe", "unlabeled": "target_recipe", "test": "target_recipe"}
    plans = [
        _SetPlan(
            name,
            [(s, _photo(s, demo.size)) for s in sources[name]],
            counts[name],
            getattr(demo, recipe_of[name]),
            chosen[recipe_of[name]],
        )
        for name in SETS
    ]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(out_dir)
    remove_path(tmp)
    try:
        with _single_thread():
            files = [record for plan in plans for record in _make_set(tmp, plan, demo.size, seed)]
        write_json(tmp / "demo.json", _record(demo, chosen, seed, sources, files))
        commit_path(tmp, out_dir)
    finally:
        remove_path(tmp)
    return DemoResult(out_dir, counts, out_dir / "demo.json")


def _record(
    demo: DemoConfig,
    chosen: dict[str, Recipe],
    seed: int,
    sources: dict[str, list[Source]],
    files: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "seed": seed,
        "demo": dataclasses.asdict(demo),
        "recipes": {getattr(demo, key): recipe_record(getattr(demo, key), r) for key, r in chosen.items()},
        "sources": {name: [{"name": s.name, "origin": s.origin} for s in group] for name, group in sources.items()},
        "files": files,
        "versions": versions(),
    }
