"""Complete checkpoints that rebuild their own model, saved atomically, loaded safely.

A checkpoint is a zip file written by ``torch.save`` holding only tensors and
plain values (dicts, lists, tuples, str, int, float, bool, None): the model
config as a plain mapping, model weights, EMA, optimizer and scheduler state,
step, round, RNG states, the qtlib version and an ``extra`` JSON mapping. It is
read with ``torch.load(weights_only=True)``, whose unpickler refuses every
Python global, so loading never runs code from the file; the writer checks the
same rule up front so every saved file can be read back.
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qtlib import __version__
from qtlib.config.loader import ConfigError, config_from_dict, to_dict
from qtlib.config.types import ModelConfig
from qtlib.models.build import build_model
from qtlib.util.atomic import atomic_path

CHECKPOINT_KINDS = ("pretrain", "student", "teacher", "train-state")
FORMAT = "qtlib-checkpoint"
FORMAT_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, of another kind, or unsafe to load; the message names it."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to rebuild a model and resume its training.

    Attributes:
        kind: one of :data:`CHECKPOINT_KINDS`.
        model_config: the config that :func:`~qtlib.models.build_model` rebuilds the model from.
        model_state: the model's ``state_dict()``.
        ema_state: :meth:`qtlib.models.EMA.state_dict` (its ``"module"`` entry is the teacher), or None.
        optimizer_state: the optimizer's ``state_dict()``, or None.
        step: optimizer steps taken (within the round).
        round: pseudo-labeling round (0 for pretraining).
        rng: :func:`capture_rng_state` at save time (empty = not recorded).
        qtlib_version: the version that wrote it.
        extra: plain JSON-able values (losses, timings, hashes of inputs...).
        scheduler_state: the LR scheduler's ``state_dict()``, or None.
    """

    kind: str
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None
    step: int = 0
    round: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    qtlib_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)
    scheduler_state: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in CHECKPOINT_KINDS:
            raise ValueError(f"kind: got {self.kind!r}, expected one of {', '.join(CHECKPOINT_KINDS)}")
        if not isinstance(self.model_config, ModelConfig):
            raise TypeError(f"model_config: expected a ModelConfig, got {type(self.model_config).__name__}")
        try:
            json.dumps(self.extra, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra: must hold plain JSON values only: {exc}") from exc


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Raises:
        CheckpointError: a field holds something ``weights_only`` loading would refuse.

    Returns:
        The path written.
    """
    path = Path(path)
    payload = _to_payload(ckpt)
    _check_plain(payload, "checkpoint", path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(path: str | Path, kinds: Iterable[str] | None = None) -> Checkpoint:
    """Read a checkpoint without running code from it (``torch.load(weights_only=True)``, on CPU).

    Args:
        path: the file.
        kinds: accepted kinds (None = any of :data:`CHECKPOINT_KINDS`).

    Raises:
        CheckpointError: missing, not a qtlib checkpoint, corrupt, of a kind not in ``kinds``,
            holding pickled Python objects (unsafe), or weights with NaN/inf values (the message
            names the first such tensor).
    """
    path = Path(path)
    payload = _read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qtlib checkpoint (no '{FORMAT}' marker); save it with save_checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this qtlib reads ({FORMAT_VERSION})"
        )
    kind = payload.get("kind")
    allowed = tuple(kinds) if kinds is not None else CHECKPOINT_KINDS
    if kind not in allowed:
        raise CheckpointError(f"{path}: a {kind!r} checkpoint, expected {' or '.join(map(repr, allowed))}")
    _check_finite(payload, path)
    try:
        model_config = config_from_dict({"model": payload["model_config"]}, source=str(path)).model
        return Checkpoint(
            kind=kind,
            model_config=model_config,
            model_state=payload["model_state"],
            ema_state=payload.get("ema_state"),
            optimizer_state=payload.get("optimizer_state"),
            step=int(payload.get("step", 0)),
            round=int(payload.get("round", 0)),
            rng=payload.get("rng") or {},
            qtlib_version=str(payload.get("qtlib_version", "unknown")),
            extra=json.loads(payload.get("extra", "{}")),
            scheduler_state=payload.get("scheduler_state"),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its model config is invalid: {' '.join(str(exc).split())}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete or malformed checkpoint: {exc!r}") from exc


def load_model(
    path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu", kinds: Iterable[str] | None = None
) -> nn.Module:
    """Rebuild the model stored in a checkpoint from its own config, in eval mode.

    Args:
        path: the checkpoint.
        use_ema: take the EMA (teacher) weights when the checkpoint has them, else the model weights.
        device: where to put the model.
        kinds: accepted checkpoint kinds (None = any).

    Raises:
        CheckpointError: see :func:`load_checkpoint`; also weights that do not fit the stored config.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, kinds)
    model = build_model(ckpt.model_config)
    state = ckpt.ema_state["module"] if use_ema and ckpt.ema_state else ckpt.model_state
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise CheckpointError(f"{path}: weights do not fit the stored model config: {first}") from exc
    return model.to(device).eval()


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators (CUDA only if CUDA is initialized)."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        # Querying CUDA generators would initialize CUDA; a CPU-only run has nothing to record.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators from :func:`capture_rng_state`'s output (CUDA when recorded and available)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_payload(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": ckpt.kind,
        "model_config": to_dict(ckpt.model_config),
        "model_state": ckpt.model_state,
        "ema_state": ckpt.ema_state,
        "optimizer_state": ckpt.optimizer_state,
        "scheduler_state": ckpt.scheduler_state,
        "step": int(ckpt.step),
        "round": int(ckpt.round),
        "rng": ckpt.rng,
        "qtlib_version": ckpt.qtlib_version,
        "extra": json.dumps(ckpt.extra),
    }


_PLAIN = (torch.Tensor, str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(obj: Any, where: str, path: Path) -> None:
    """Raise unless ``obj`` is built only from what ``weights_only`` loading accepts."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{path}: cannot save {where}: key {key!r} is not a str or int")
            _check_plain(value, f"{where}.{key}", path)
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]", path)
        return
    raise CheckpointError(
        f"{path}: cannot save {where}: a {type(obj).__name__} would not load with weights_only=True; "
        "store tensors and plain values only"
    )


def _check_finite(payload: dict[str, Any], path: Path) -> None:
    """Refuse weights with NaN/inf: restoring with them writes black images, labeling with them poisons a round."""
    ema = payload.get("ema_state")
    sources = {"model_state": payload.get("model_state"),
               "ema_state.module": ema.get("module") if isinstance(ema, dict) else None}
    for where, state in sources.items():
        if not isinstance(state, dict):
            continue
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
                n_bad = int((~value.isfinite()).sum())
                raise CheckpointError(
                    f"{path}: refused to load: tensor {where}[{name!r}] has {n_bad} non-finite (NaN/inf) value(s) "
                    f"of {value.numel()}; the run that wrote it diverged"
                )


def _read_payload(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a checkpoint file (corrupt, truncated, or another format)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), None)
        if reason is not None:
            reason = reason.removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0]
            raise CheckpointError(
                f"{path}: refused to load: it contains a pickled Python object that could run code "
                f"({reason}); only tensors and plain values are accepted"
            ) from None
        raise CheckpointError(f"{path}: corrupt checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt checkpoint ({first})") from None
