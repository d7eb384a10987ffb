"""qtlib's own fast paths for pyiqa metrics, as data: what each replaces, when it applies, its tolerance.

A metric's catalog entry names its fast paths (``MetricInfo.fast_paths``);
:func:`qtlib.iqa.factory.create_metric` installs each one that applies to the
variant being built (``as_loss`` or scoring) unless ``fast=False``. Each path
swaps the pyiqa arch (``metric.net``) for a module computing the same function;
its tolerance against pyiqa is stated here and tested in ``tests/test_iqa_fast.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class FastPath:
    """One replacement of a pyiqa arch.

    Attributes:
        name: key in :data:`FAST_PATHS` (what catalog entries name).
        applies: ``loss`` (only the ``as_loss=True`` variant), ``score`` (only scoring) or ``both``.
        build: pyiqa arch -> the replacement module.
        tolerance: how far its outputs may be from pyiqa's (measured, tested).
        default: installed by ``create_metric(..., fast=True)``; False = only when named
            (``fast=("niqe_float32",)``): a path whose scores differ from pyiqa's at all.
    """

    name: str
    applies: Literal["loss", "score", "both"]
    build: Callable[[nn.Module], nn.Module]
    tolerance: str
    default: bool = True

    def applies_to(self, as_loss: bool) -> bool:
        return self.applies == "both" or self.applies == ("loss" if as_loss else "score")


def _brisque_grad(arch: nn.Module) -> nn.Module:
    from qtlib.iqa.fast_brisque import FastBRISQUE

    return FastBRISQUE(arch)


def _niqe_float32(arch: nn.Module) -> nn.Module:
    from qtlib.iqa.fast_niqe import Float32NIQE

    return Float32NIQE(arch)


def _musiq_batched_tokens(arch: nn.Module) -> nn.Module:
    from qtlib.iqa.fast_musiq import FastMUSIQ

    return FastMUSIQ(arch)


FAST_PATHS: dict[str, FastPath] = {
    "brisque_filter_grad": FastPath(
        "brisque_filter_grad", "loss", _brisque_grad,
        "scores bit-identical; input gradients within 1e-5 relative (float32 rounding of the adjoint filter)",
    ),
    "niqe_float32": FastPath(
        "niqe_float32", "both", _niqe_float32,
        "within 0.05 NIQE of pyiqa's float64 on ResultsCalibra (measured max 0.031, dist I19); opt-in",
        default=False,
    ),
    "musiq_batched_tokens": FastPath(
        "musiq_batched_tokens", "both", _musiq_batched_tokens,
        "pyiqa's multi-scale patches bit-identical; scores within 1e-4 x max(1, |score|) "
        "(float32 summation order; measured max 6.6e-7 with random weights, 96-224 px, square and not)",
    ),
}
