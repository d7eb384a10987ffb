"""Degradations: every default recipe, real kornia ops, seeded and recorded; qt degrade on files and folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from qtlib.cli import main
from qtlib.config import load_config
from qtlib.config.types import DegradeConfig, Recipe
from qtlib.data import (
    KINDS,
    UnknownRecipeError,
    degrade,
    degrade_path,
    degrade_seeded,
    derive_seed,
    get_recipe,
)
from qtlib.imageio import read_image

RECIPES = load_config(None).degrade.recipes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's thread pool only adds overhead (10x on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two 64 x 64 photos as a (2, 3, 64, 64) batch in [0, 1]."""
    photos = [skdata.astronaut(), skdata.coffee()]
    out = [torch.from_numpy(np.array(Image.fromarray(p).resize((64, 64), Image.Resampling.BICUBIC))) for p in photos]
    return torch.stack(out).permute(0, 3, 1, 2).float().div(255)


def _run(images: torch.Tensor, recipe: Recipe, seed: int):
    return degrade(images, recipe, torch.Generator().manual_seed(seed))


def test_cardinality_default_recipes() -> None:
    assert {r.kind for r in RECIPES.values()} == set(KINDS) == {"rain", "snow", "haze", "low_light", "underwater"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_smoke_recipe(images: torch.Tensor, name: str) -> None:
    recipe = RECIPES[name]
    first, again, other = _run(images, recipe, 0), _run(images, recipe, 0), _run(images, recipe, 1)
    assert first.images.shape == images.shape and first.images.dtype == images.dtype
    assert float(first.images.min()) >= 0 and float(first.images.max()) <= 1
    assert (first.images - images).abs().mean(dim=(1, 2, 3)).min() > 0.005  # every image changed
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)  # same seed, same output
    assert not torch.equal(first.images, other.images)  # another seed, another output
    assert first.params == again.params and first.params != other.params
    assert len(first.params) == 2 and first.params[0]["seed"] != first.params[1]["seed"]
    for params in first.params:
        assert params["kind"] == recipe.kind
        assert recipe.intensity[0] <= params["intensity"] <= recipe.intensity[1]
        assert recipe.blur_sigma[0] <= params["blur_sigma"] <= recipe.blur_sigma[1]
        assert recipe.noise_std[0] <= params["noise_std"] <= recipe.noise_std[1]
        if recipe.jpeg_quality is None:
            assert params["jpeg_quality"] is None
        else:
            assert recipe.jpeg_quality[0] <= params["jpeg_quality"] <= recipe.jpeg_quality[1]
        assert json.loads(json.dumps(params)) == params  # plain JSON


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_replay_from_recorded_seed(images: torch.Tensor, name: str) -> None:
    result = _run(images, RECIPES[name], 3)
    seeds = [p["seed"] for p in result.params]
    replay = degrade_seeded(images[1:], RECIPES[name], seeds[1:])  # alone, not in its batch
    torch.testing.assert_close(replay.images[0], result.images[1], rtol=0, atol=0)
    assert replay.params[0] == result.params[1]


def _contrast(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=(1, 2, 3))


def test_haze_moves_toward_airlight(images: torch.Tensor) -> None:
    result = _run(images, RECIPES["haze_source"], 0)
    assert (_contrast(result.images) < 0.8 * _contrast(images)).all()
    for b, params in enumerate(result.params):
        airlight = torch.tensor(params["airlight"]).view(3, 1, 1)
        assert (result.images[b] - airlight).abs().mean() < 0.7 * (images[b] - airlight).abs().mean()
        assert 0 < params["mean_transmission"] < 1


def test_low_light_darkens(images: torch.Tensor) -> None:
    result = _run(images, RECIPES["low_light_source"], 0)
    assert (result.images.mean(dim=(1, 2, 3)) < 0.6 * images.mean(dim=(1, 2, 3))).all()
    assert all(p["gamma"] > 1 and 0 < p["gain"] < 1 for p in result.params)


def _red_ratio(x: torch.Tensor) -> torch.Tensor:
    means = x.mean(dim=(2, 3))
    return means[:, 0] / means[:, 1:].mean(dim=1)


def test_underwater_loses_red(images: torch.Tensor) -> None:
    result = _run(images, RECIPES["underwater_source"], 0)
    assert (_red_ratio(result.images) < 0.6 * _red_ratio(images)).all()
    for params in result.params:
        red, green, blue = params["attenuation"]
        assert red > green and red > blue


def test_rain_and_snow_add_bright_structures(images: torch.Tensor) -> None:
    for name in ("rain_source", "snow_source"):
        result = _run(images, RECIPES[name], 0)
        brighter = (result.images - images).mean(dim=1) > 0.1
        assert brighter.float().mean() > 0.005, name
    rain = _run(images, RECIPES["rain_source"], 0).params[0]
    assert rain["drops"] > 0 and 2 <= rain["drop_length"] < 64
    snow = _run(images, RECIPES["snow_source"], 0).params[0]
    assert len(snow["flakes"]) == 3 and snow["flake_sigma"] == sorted(snow["flake_sigma"])


def test_blur_noise_jpeg(images: torch.Tensor) -> None:
    base = Recipe(kind="haze", intensity=(0.0, 0.0))
    clean = _run(images, base, 0).images  # intensity 0 still hazes a little; compare on top of it
    noisy = _run(images, Recipe(kind="haze", intensity=(0.0, 0.0), noise_std=(0.05, 0.05)), 0).images
    assert abs(float((noisy - clean).std()) - 0.05) < 0.01
    blurred = _run(images, Recipe(kind="haze", intensity=(0.0, 0.0), blur_sigma=(1.5, 1.5)), 0).images
    high = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert high(blurred) < 0.7 * high(clean)
    jpeg = _run(images, Recipe(kind="haze", intensity=(0.0, 0.0), jpeg_quality=(10, 10)), 0)
    assert jpeg.params[0]["jpeg_quality"] == 10
    assert 0.005 < float((jpeg.images - clean).abs().mean()) < 0.1


def test_exception_inputs(images: torch.Tensor) -> None:
    recipe = RECIPES["rain_source"]
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="image: expected a \\(B, 3, H, W\\)"):
        degrade(images[0], recipe, g)
    with pytest.raises(ValueError, match="image: expected values in \\[0, 1\\]"):
        degrade(images * 2, recipe, g)
    with pytest.raises(ValueError, match="image: expected a float"):
        degrade((images * 255).to(torch.uint8), recipe, g)
    with pytest.raises(ValueError, match="recipe.intensity"):
        degrade(images, Recipe(kind="rain", intensity=(0.8, 0.2)), g)
    with pytest.raises(ValueError, match="seeds: expected 2"):
        degrade_seeded(images, recipe, [1])
    with pytest.raises(UnknownRecipeError, match="unknown recipe 'drizzle'; available: .*rain_source"):
        get_recipe(DegradeConfig(recipes=dict(RECIPES)), "drizzle")


def _photo_files(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()[::8, ::8]).save(root / "a.png")
    Image.fromarray(skdata.coffee()[::6, ::6]).save(root / "sub" / "b.jpg")
    (root / "sub" / "broken.png").write_text("not an image")


def test_degrade_path_folder(tmp_path: Path) -> None:
    _photo_files(tmp_path / "in")
    run = degrade_path(tmp_path / "in", tmp_path / "out", "rain_target", RECIPES["rain_target"], seed=5)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in run.outputs) == ["a.png", "sub/b.png"]
    assert len(run.failed) == 1 and run.failed[0].startswith("sub/broken.png (not_image")
    record = json.loads(run.record.read_text())
    assert record["recipe"]["name"] == "rain_target" and record["recipe"]["kind"] == "rain"
    assert record["seed"] == 5 and set(record["versions"]) == {"qtlib", "torch", "kornia"}
    assert [(i["source"], i["output"]) for i in record["images"]] == [("a.png", "a.png"), ("sub/b.jpg", "sub/b.png")]
    assert record["images"][0]["seed"] == derive_seed(5, "a.png")
    assert record["failed"][0]["source"] == "sub/broken.png"
    original = read_image(tmp_path / "in" / "a.png")
    degraded = read_image(tmp_path / "out" / "a.png")
    assert degraded.shape == original.shape and not torch.equal(degraded, original)

    # A single file gets the same degradation as inside the folder; output and sidecar by name.
    alone = degrade_path(tmp_path / "in" / "a.png", tmp_path / "one.png", "rain_target", RECIPES["rain_target"], 5)
    assert alone.record == tmp_path / "one.json"
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "out" / "a.png").read_bytes()
    into_dir = degrade_path(tmp_path / "in" / "a.png", tmp_path / "dir", "rain_target", RECIPES["rain_target"], 5)
    assert into_dir.outputs == [tmp_path / "dir" / "a.png"] and into_dir.record == tmp_path / "dir" / "degrade.json"
    with pytest.raises(ValueError, match="writes PNG"):
        degrade_path(tmp_path / "in" / "a.png", tmp_path / "x.jpg", "rain_target", RECIPES["rain_target"], 5)


def test_degrade_path_name_clash(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "in" / "x.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "in" / "x.jpg")
    with pytest.raises(ValueError, match="same PNG: x.jpg, x.png"):
        degrade_path(tmp_path / "in", tmp_path / "out", "rain_source", RECIPES["rain_source"], 0)


def test_cli_degrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _photo_files(tmp_path / "in")
    config = tmp_path / "config.yaml"
    config.write_text("seed: 3\n")
    args = ["degrade", "--recipe", "haze_target", "--config", str(config)]
    assert main([*args, "--seed", "7", str(tmp_path / "in" / "a.png"), str(tmp_path / "a_hazy.png")]) == 0
    sidecar = json.loads((tmp_path / "a_hazy.json").read_text())
    assert sidecar["seed"] == 7 and sidecar["images"][0]["kind"] == "haze"

    assert main([*args, str(tmp_path / "in"), str(tmp_path / "out")]) == 0  # one unreadable input, skipped
    captured = capsys.readouterr()
    assert "2 images degraded with haze_target (seed 3)" in captured.out
    assert "skipped sub/broken.png" in captured.err
    first = (tmp_path / "out" / "sub" / "b.png").read_bytes()
    assert main([*args, str(tmp_path / "in"), str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "sub" / "b.png").read_bytes() == first  # deterministic
    capsys.readouterr()

    assert main(["degrade", "--recipe", "fog", "--config", str(config), str(tmp_path / "in"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("qt degrade: error: unknown recipe 'fog'; available: haze_source, haze_target")
    assert "\n" not in err
