"""The `compute` section in action: seeds, the determinism switch and bf16 autocast for the training stages."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

_log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_seed(seed: int, round_: int, rank: int) -> int:
    """The global-generator seed of one process: offset by round and rank, so ranks never share a stream."""
    return seed + 1_000 * round_ + 100_003 * rank


def set_determinism(enabled: bool) -> dict[str, bool]:
    """The determinism switch: deterministic algorithms and no cuDNN autotuning, or the fast defaults.

    With ``enabled`` (the config default), ``torch.use_deterministic_algorithms(True)``
    makes an op without a deterministic implementation raise instead of silently
    varying, ``cudnn.benchmark`` is off and ``cudnn.deterministic`` on, and
    ``CUBLAS_WORKSPACE_CONFIG`` is set (needed by cuBLAS on CUDA >= 10.2). The
    state is logged and returned so it can be recorded with the run.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = False if enabled else torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = enabled
    state = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
    }
    _log.info("determinism: %s", state)
    return state


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[dict[str, bool]]:
    """:func:`set_determinism` for the duration of a stage; the previous settings come back afterwards.

    A stage called from a notebook or a test must not leave the process in
    another mode than it found it.
    """
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        yield set_determinism(enabled)
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[2], prev[3]


@contextlib.contextmanager
def autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay fp32)."""
    if bf16 and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
