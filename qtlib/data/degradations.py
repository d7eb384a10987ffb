"""Named synthetic degradations (``qt degrade``), built from kornia ops.

A :class:`~qtlib.config.types.Recipe` names a kind (rain, snow, haze, low_light,
underwater), an ``intensity`` range in [0, 1] and optional blur / noise / JPEG
ranges. Every image gets its own seed; all of its parameters are drawn once
from a generator seeded with it, applied deterministically, and returned as a
plain dict, so one recorded seed replays one image exactly
(:func:`degrade_seeded`), whatever batch it was in.

How each kind maps ``intensity`` to physics (all sizes scale with the image):

- rain: kornia ``RandomRain`` draws the streak geometry (drop count, length,
  slant, positions; passed as explicit ``params``). kornia writes an opaque
  200/255 line, so the line is used as a mask, softened, and blended toward a
  bright streak colour with an intensity-dependent opacity.
- snow: kornia's ``RandomSnow`` only brightens dark pixels (see DESIGN.md), so
  flakes of three sizes are rendered as Gaussian blobs (``gaussian_blur2d`` of
  random impulses) over a light veil.
- haze: ``I = J t + A (1 - t)``, ``t = exp(-beta d)``, with a depth-like map
  ``d`` mixing a vertical ramp (far at the top) and a plasma fractal
  (``kornia.contrib.diamond_square``, the map behind ``RandomPlasma*``).
- low_light: ``I = gain * J ** gamma`` plus signal-dependent shot and read noise.
- underwater: the haze model per channel, red attenuated most, blue-green
  backscatter.

Then, in camera order: Gaussian blur (``RandomGaussianBlur``), Gaussian noise
(``RandomGaussianNoise``), each with explicit params, then a real JPEG round
trip (Pillow; see :func:`jpeg` for why not ``RandomJPEG``), and a final clamp
to [0, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import kornia
import numpy as np
import torch
from kornia.augmentation import RandomGaussianBlur, RandomGaussianNoise, RandomRain
from kornia.contrib import diamond_square
from kornia.filters import gaussian_blur2d
from PIL import Image

from qtlib import __version__
from qtlib.config.types import DegradeConfig, Recipe
from qtlib.data.decode import DEFAULT_MAX_PIXELS
from qtlib.data.intake import read_file
from qtlib.data.store import write_json
from qtlib.imageio import IMAGE_EXTENSIONS, list_images, to_tensor, to_uint8, write_image

Tensor = torch.Tensor
KindFn = Callable[[Tensor, float, torch.Generator], tuple[Tensor, dict[str, Any]]]
_SEED_LIMIT = 2**63 - 1


class UnknownRecipeError(KeyError):
    """A recipe name not in ``degrade.recipes``; the message lists the available ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class DegradeResult:
    """Degraded images ``(B, 3, H, W)`` in [0, 1] and, per image, the drawn parameters (JSON-ready)."""

    images: Tensor
    params: list[dict[str, Any]]


def get_recipe(config: DegradeConfig, name: str) -> Recipe:
    """The recipe called ``name``; :class:`UnknownRecipeError` lists the available names."""
    if name not in config.recipes:
        available = ", ".join(sorted(config.recipes)) or "none"
        raise UnknownRecipeError(f"unknown recipe {name!r}; available: {available}")
    return config.recipes[name]


def check_recipe(recipe: Recipe) -> None:
    """Raise ValueError naming the field if a recipe's ranges are out of bounds or reversed."""
    bounds = {"intensity": (0.0, 1.0), "blur_sigma": (0.0, 20.0), "noise_std": (0.0, 1.0), "jpeg_quality": (1.0, 100.0)}
    for name, (low, high) in bounds.items():
        value = getattr(recipe, name)
        if value is None:
            continue
        if len(value) != 2 or not low <= value[0] <= value[1] <= high:
            raise ValueError(
                f"recipe.{name}: expected [low, high] with {low} <= low <= high <= {high}, got {list(value)}"
            )


def derive_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed from a base seed and names (e.g. a relative path): stable across runs and machines."""
    text = "|".join([str(seed), *parts]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & _SEED_LIMIT


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    """One uniform draw in [low, high] (always consumes one draw, so the stream does not depend on the range)."""
    u = float(torch.rand((), generator=g))
    return low + (high - low) * u


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _plasma(height: int, width: int, roughness: float, g: torch.Generator) -> Tensor:
    """A ``(1, 1, H, W)`` plasma fractal in [0, 1] drawn from ``g`` (kornia's diamond-square)."""
    return diamond_square(
        (1, 1, height, width),
        roughness=roughness,
        random_fn=partial(torch.rand, generator=g),
        normalize_range=(0.0, 1.0),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def _depth_map(height: int, width: int, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """A depth-like map in [0, 1]: a vertical ramp (far at the top) mixed with a plasma fractal."""
    roughness = _uniform(g, 0.4, 0.7)
    ramp_weight = _uniform(g, 0.3, 0.7)
    ramp = torch.linspace(1.0, 0.0, height).view(1, 1, height, 1).expand(1, 1, height, width)
    depth = ramp_weight * ramp + (1.0 - ramp_weight) * _plasma(height, width, roughness, g)
    return depth, {"roughness": roughness, "ramp_weight": ramp_weight}


def _odd_kernel(sigma: float, limit: int) -> int:
    """Odd Gaussian kernel side covering +-3 sigma, kept below the image side ``limit``."""
    side = 2 * math.ceil(3 * sigma) + 1
    largest = limit - 1 if limit % 2 == 0 else limit - 2
    return max(3, min(side, largest))


def _rain(image: Tensor, intensity: float, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    _, _, h, w = image.shape
    length = max(2, min(h - 1, round(h * (0.06 + 0.16 * intensity) * _uniform(g, 0.8, 1.2))))
    slant = round(length * _uniform(g, -0.35, 0.35))
    slant = max(-(w - 1), min(w - 1, slant))
    drops = max(1, round((0.02 + 0.10 * intensity) * h * w / length))
    opacity = 0.5 + 0.35 * intensity
    params = {
        "number_of_drops_factor": torch.tensor([drops]),
        "drop_height_factor": torch.tensor([length]),
        "drop_width_factor": torch.tensor([slant]),
        "coordinates_factor": torch.rand(1, drops, 2, generator=g),
    }
    lines = RandomRain(p=1.0)(torch.zeros(1, 1, h, w), params=params).gt(0).float()
    # Soften the one-pixel kornia line so streaks are not perfectly aliased.
    alpha = (gaussian_blur2d(lines, (3, 3), (0.5, 0.5)) * 1.3).clamp(0, 1) * opacity
    out = torch.lerp(image, torch.full_like(image, 0.9), alpha.to(image))
    return out, {"drops": drops, "drop_length": length, "drop_slant": slant, "opacity": opacity}


# Snow flake layers: (minimum sigma in px, sigma as a fraction of the shorter side, share of the covered area).
_FLAKE_LAYERS = ((0.5, 0.002, 0.5), (0.9, 0.004, 0.3), (1.6, 0.008, 0.2))


def _flake_layer(h: int, w: int, sigma: float, count: int, g: torch.Generator) -> Tensor:
    """``(1, 1, H, W)`` opacity of ``count`` Gaussian flakes of width ``sigma`` at random places."""
    impulses = torch.zeros(h * w)
    where = torch.randint(0, h * w, (count,), generator=g)
    impulses.index_add_(0, where, 0.6 + 0.4 * torch.rand(count, generator=g))
    k_h, k_w = _odd_kernel(sigma, h), _odd_kernel(sigma, w)
    blobs = gaussian_blur2d(impulses.view(1, 1, h, w), (k_h, k_w), (sigma, sigma), border_type="constant")
    return (blobs * (2 * math.pi * sigma**2)).clamp(0, 1)  # a lone flake peaks at its brightness


def _snow(image: Tensor, intensity: float, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    _, _, h, w = image.shape
    cover = 0.01 + 0.05 * intensity
    veil = 0.12 * intensity * _uniform(g, 0.5, 1.5)
    alpha = torch.zeros(1, 1, h, w)
    sigmas, counts = [], []
    for min_sigma, rel_sigma, share in _FLAKE_LAYERS:
        sigma = max(min_sigma, rel_sigma * min(h, w))
        count = max(1, round(share * cover * h * w / (math.pi * (1.5 * sigma) ** 2)))
        alpha = 1 - (1 - alpha) * (1 - _flake_layer(h, w, sigma, count, g))
        sigmas.append(sigma)
        counts.append(count)
    out = torch.lerp(image, torch.full_like(image, 0.85), veil)
    out = torch.lerp(out, torch.full_like(image, 0.97), alpha.to(image))
    return out, {"flakes": counts, "flake_sigma": sigmas, "veil": veil}


def _haze(image: Tensor, intensity: float, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    _, _, h, w = image.shape
    depth, info = _depth_map(h, w, g)
    beta = (0.6 + 2.4 * intensity) * _uniform(g, 0.85, 1.15)
    grey = _uniform(g, 0.7, 0.95)
    airlight = [min(1.0, grey + _uniform(g, -0.03, 0.03)) for _ in range(3)]
    t = torch.exp(-beta * depth).to(image)
    a = torch.tensor(airlight).view(1, 3, 1, 1).to(image)
    out = image * t + a * (1 - t)
    return out, {"beta": beta, "airlight": airlight, "mean_transmission": float(t.mean()), **info}


def _low_light(image: Tensor, intensity: float, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    gamma = (1.2 + 1.6 * intensity) * _uniform(g, 0.9, 1.1)
    gain = (0.75 - 0.6 * intensity) * _uniform(g, 0.85, 1.15)
    shot, read = 0.004 * intensity, 0.002 + 0.008 * intensity
    dark = gain * image.clamp(0, 1) ** gamma
    noise = torch.randn(image.shape, generator=g).to(image)
    out = dark + noise * torch.sqrt(shot * dark + read**2)
    return out, {"gamma": gamma, "gain": gain, "shot_noise": shot, "read_noise": read}


def _underwater(image: Tensor, intensity: float, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    _, _, h, w = image.shape
    depth, info = _depth_map(h, w, g)
    distance = 0.3 + 0.7 * depth
    beta_red = (0.8 + 2.4 * intensity) * _uniform(g, 0.85, 1.15)
    beta = [beta_red, beta_red * _uniform(g, 0.2, 0.45), beta_red * _uniform(g, 0.1, 0.35)]
    backscatter = [_uniform(g, 0.0, 0.12), _uniform(g, 0.35, 0.6), _uniform(g, 0.45, 0.75)]
    t = torch.exp(-torch.tensor(beta).view(1, 3, 1, 1) * distance).to(image)
    b = torch.tensor(backscatter).view(1, 3, 1, 1).to(image)
    out = image * t + b * (1 - t)
    mean_t = [float(v) for v in t.mean(dim=(0, 2, 3))]
    return out, {"attenuation": beta, "backscatter": backscatter, "mean_transmission": mean_t, **info}


KINDS: Mapping[str, KindFn] = {
    "rain": _rain,
    "snow": _snow,
    "haze": _haze,
    "low_light": _low_light,
    "underwater": _underwater,
}


def blur(image: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(1, 3, H, W)`` at ``sigma`` px (kornia, kernel +-3 sigma); 0 = unchanged."""
    if sigma <= 0:
        return image
    _, _, h, w = image.shape
    kernel = (_odd_kernel(sigma, h), _odd_kernel(sigma, w))
    op = RandomGaussianBlur(kernel, (sigma, sigma), p=1.0)
    return op(image, params={"sigma": torch.tensor([sigma], dtype=image.dtype, device=image.device)})


def add_noise(image: Tensor, std: float, g: torch.Generator) -> Tensor:
    """Gaussian noise of ``std`` on ``(1, 3, H, W)``, drawn from ``g`` (kornia); 0 = unchanged."""
    if std <= 0:
        return image
    noise = (torch.randn(image.shape, generator=g) * std).to(image)
    return RandomGaussianNoise(std=std, p=1.0)(image, params={"gaussian_noise": noise})


def jpeg(image: Tensor, quality: int | None) -> Tensor:
    """Real baseline JPEG (Pillow's libjpeg, 4:2:0) at ``quality``.

    kornia's ``RandomJPEG`` is a differentiable approximation that takes ~0.4 s per
    192 px image on a CPU; nothing here needs gradients, and the real codec's
    artefacts are the ones real images carry.
    """
    if quality is None:
        return image
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image[0])).save(buffer, format="JPEG", quality=int(quality))
    with Image.open(buffer) as decoded:
        return to_tensor(np.asarray(decoded.convert("RGB")))[None].to(image)


def _degrade_one(image: Tensor, recipe: Recipe, seed: int) -> tuple[Tensor, dict[str, Any]]:
    """Degrade one ``(1, 3, H, W)`` image with every parameter drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    intensity = _uniform(g, *recipe.intensity)
    blur_sigma = _uniform(g, *recipe.blur_sigma)
    noise_std = _uniform(g, *recipe.noise_std)
    quality = round(_uniform(g, *recipe.jpeg_quality)) if recipe.jpeg_quality is not None else None
    out, drawn = KINDS[recipe.kind](image, intensity, g)
    out = jpeg(add_noise(blur(out, blur_sigma), noise_std, g), quality)
    params = {"seed": seed, "kind": recipe.kind, "intensity": intensity, **drawn}
    params.update(blur_sigma=blur_sigma, noise_std=noise_std, jpeg_quality=quality)
    return out.clamp(0, 1), {k: _rounded(v) for k, v in params.items()}


def _check_images(image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image: expected a (B, 3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
    if not image.is_floating_point():
        raise ValueError(f"image: expected a float tensor in [0, 1], got {image.dtype}")
    if min(image.shape[-2:]) < 8:
        raise ValueError(f"image: expected H, W >= 8, got {tuple(image.shape[-2:])}")
    if image.numel() and (image.min() < -1e-6 or image.max() > 1 + 1e-6):
        raise ValueError(f"image: expected values in [0, 1], got [{float(image.min()):.4f}, {float(image.max()):.4f}]")


def degrade_seeded(image: Tensor, recipe: Recipe, seeds: Sequence[int]) -> DegradeResult:
    """Degrade each image ``b`` with all its parameters drawn from ``seeds[b]``.

    Args:
        image: ``(B, 3, H, W)`` float in [0, 1].
        recipe: the degradation recipe.
        seeds: one non-negative int per image (e.g. ``params[b]["seed"]`` of an earlier run, to replay it).

    Returns:
        :class:`DegradeResult`; ``params[b]`` holds the seed, the kind, every drawn value.
    """
    _check_images(image)
    check_recipe(recipe)
    if len(seeds) != image.shape[0]:
        raise ValueError(f"seeds: expected {image.shape[0]} seeds (one per image), got {len(seeds)}")
    outputs, params = [], []
    for b, seed in enumerate(seeds):
        out, drawn = _degrade_one(image[b : b + 1], recipe, int(seed))
        outputs.append(out)
        params.append(drawn)
    return DegradeResult(torch.cat(outputs) if outputs else image.clone(), params)


def degrade(image: Tensor, recipe: Recipe, generator: torch.Generator) -> DegradeResult:
    """Degrade a batch with ``recipe``; one seed per image is drawn from ``generator``.

    Args:
        image: ``(B, 3, H, W)`` float in [0, 1] (any device; parameters are drawn on the CPU).
        recipe: the degradation recipe.
        generator: a seeded CPU ``torch.Generator``; the same seed gives identical output.

    Returns:
        :class:`DegradeResult` with images in [0, 1] and one parameter dict per image.

    Shape:
        ``(B, 3, H, W) -> (B, 3, H, W)``.
    """
    seeds = torch.randint(0, _SEED_LIMIT, (image.shape[0],), generator=generator).tolist()
    return degrade_seeded(image, recipe, seeds)


def recipe_record(name: str, recipe: Recipe) -> dict[str, Any]:
    """A JSON-ready record of a named recipe."""
    return {"name": name, **{k: _rounded(v) for k, v in dataclasses.asdict(recipe).items()}}


@dataclass(frozen=True)
class DegradeRun:
    """Outcome of :func:`degrade_path`: written files, failed inputs, and the JSON record."""

    outputs: list[Path]
    failed: list[str]
    record: Path


def _plan(src: Path, dst: Path) -> tuple[list[tuple[str, Path, Path]], Path]:
    """``(relative name, input, output)`` per image and the record path, for a file or a folder."""
    if src.is_file():
        if dst.suffix.lower() in IMAGE_EXTENSIONS:
            if dst.suffix.lower() != ".png":
                raise ValueError(f"{dst}: qt degrade writes PNG; name the output .png or give a folder")
            return [(src.name, src, dst)], dst.with_suffix(".json")
        return [(src.name, src, dst / f"{src.stem}.png")], dst / "degrade.json"
    files = [p for p in list_images(src) if not p.resolve().is_relative_to(dst.resolve())]
    if not files:
        raise FileNotFoundError(f"{src}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found (recursive)")
    plan = [(p.relative_to(src).as_posix(), p, dst / p.relative_to(src).with_suffix(".png")) for p in files]
    by_output: dict[Path, list[str]] = {}
    for rel, _, out in plan:
        by_output.setdefault(out, []).append(rel)
    clashes = [names for names in by_output.values() if len(names) > 1]
    if clashes:
        raise ValueError(f"{src}: inputs that would write the same PNG: {'; '.join(', '.join(c) for c in clashes)}")
    return plan, dst / "degrade.json"


def _read_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Tensor | None, str]:
    """Full-size RGB tensor ``(3, H, W)`` through the one intake path, or None and ``"status: message"``."""
    item = read_file(path, min_size=8, max_pixels=max_pixels, digest=False)
    if not item.ok:
        return None, f"{item.status}: {' '.join(item.message.split())}"
    return item.tensor(), ""


def degrade_path(src: str | Path, dst: str | Path, name: str, recipe: Recipe, seed: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> DegradeRun:
    """Degrade an image file or a folder of images (recursive) into PNGs, and record what was drawn.

    Each image's seed is ``derive_seed(seed, relative name)``, so an image gets the
    same degradation alone or inside any folder. Outputs keep the relative names
    (extension ``.png``). The record (recipe, seed, per-image parameters, failures)
    goes to ``DST/degrade.json``, or ``DST.json`` beside a single output file.

    Args:
        src: an image file or a folder.
        dst: a folder, or a ``.png`` path when ``src`` is a file.
        name: the recipe's name (recorded).
        recipe: the recipe.
        seed: base seed.
        max_pixels: images with more pixels are skipped as ``too_large`` before decoding.

    Returns:
        A :class:`DegradeRun`. Unusable inputs (see :mod:`qtlib.data.intake`) are listed in ``failed``
        as ``"NAME (status: message)"`` and skipped.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    check_recipe(recipe)
    plan, record_path = _plan(src, dst)
    images, failed, outputs = [], [], []
    for rel, path, out in plan:
        image, why = _read_rgb(path, max_pixels)
        if image is None:
            failed.append({"source": rel, "reason": why})
            continue
        result = degrade_seeded(image[None], recipe, [derive_seed(seed, rel)])
        write_image(out, result.images[0])
        outputs.append(out)
        images.append({"source": rel, "output": out.relative_to(record_path.parent).as_posix(), **result.params[0]})
    record = {
        "recipe": recipe_record(name, recipe),
        "seed": seed,
        "versions": versions(),
        "images": images,
        "failed": failed,
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(record_path, record)
    return DegradeRun(outputs, [f"{f['source']} ({f['reason']})" for f in failed], record_path)


def versions() -> dict[str, str]:
    return {"qtlib": __version__, "torch": torch.__version__, "kornia": kornia.__version__}
