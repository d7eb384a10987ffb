"""Shape, dtype and value-range checks for tensors at module boundaries.

In the manner of kornia's ``KORNIA_CHECK_SHAPE``: one call states what an
argument must look like, and a failure names the argument, what was expected
and what it got, e.g. ``x: expected shape (B, 3, H, W), got (3, 8, 8)``.

A shape spec is a sequence of dimensions, each one of:

- an ``int`` or a string of digits: that exact size (``3``, ``"3"``);
- any other name (``"B"``, ``"H"``): any size, but every dimension with the
  same name must have the same size (``["S", "S"]`` = square);
- ``"*"`` as the first entry: any number (zero or more) of leading dimensions.

torch is imported only when a check runs, so importing :mod:`qtlib.util`
stays cheap for the torch-free parts (atomic writes, the config CLI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["check_floating", "check_image", "check_range", "check_shape", "check_tensor", "format_shape"]

# Resampling and colour conversions can land a float rounding step outside [0, 1];
# such inputs are valid images, so ranges are checked with this tolerance.
RANGE_TOLERANCE = 1e-6


def format_shape(dims: Sequence[Any]) -> str:
    """Render a shape or a spec like a Python tuple: ``(B, 3, H, W)``, ``(2,)``."""
    inner = ", ".join(str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def _match(shape: tuple[int, ...], spec: Sequence[int | str]) -> dict[str, int] | None:
    """The sizes bound to each name of ``spec``, or None when ``shape`` does not fit it."""
    spec = list(spec)
    if spec and spec[0] == "*":
        spec = spec[1:]
        if len(shape) < len(spec):
            return None
        shape = shape[len(shape) - len(spec):]
    if len(shape) != len(spec):
        return None
    sizes: dict[str, int] = {}
    for size, want in zip(shape, spec, strict=True):
        if isinstance(want, int) or str(want).isdigit():
            if size != int(want):
                return None
        elif sizes.setdefault(str(want), size) != size:
            return None
    return sizes


def check_shape(x: Any, shape: Sequence[int | str], name: str) -> dict[str, int]:
    """Raise ``ValueError`` unless ``x.shape`` fits the spec ``shape`` (see the module docstring).

    Works for anything with a ``.shape`` (tensors, numpy and Zarr arrays).

    Args:
        x: the value to check.
        shape: the spec, e.g. ``["B", "3", "H", "W"]`` or ``["*", "H", "W"]``.
        name: the argument's name, used in the message.

    Returns:
        The size of every named dimension, e.g. ``{"B": 2, "H": 64, "W": 64}``.

    Raises:
        TypeError: ``x`` has no shape.
        ValueError: the shape does not fit.
    """
    if not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected an array or tensor of shape {format_shape(shape)}, got {type(x).__name__}")
    actual = tuple(int(d) for d in x.shape)
    sizes = _match(actual, shape)
    if sizes is None:
        raise ValueError(f"{name}: expected shape {format_shape(shape)}, got {format_shape(actual)}")
    return sizes


def check_tensor(x: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a ``torch.Tensor``."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def check_floating(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` has a floating point dtype."""
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got {x.dtype}")


def check_range(x: torch.Tensor, name: str, low: float, high: float, tol: float = RANGE_TOLERANCE) -> None:
    """Raise ``ValueError`` if any value of ``x`` is outside ``[low, high]`` (by more than ``tol``).

    Args:
        x: the tensor (an empty one passes).
        name: the argument's name, used in the message.
        low: smallest allowed value.
        high: largest allowed value.
        tol: slack for float rounding.
    """
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < low - tol or hi > high + tol:
        raise ValueError(f"{name}: values must be in [{low:g}, {high:g}], got [{lo:.4f}, {hi:.4f}]")


def check_image(
    x: Any,
    name: str,
    channels: int | None = None,
    value_range: tuple[float, float] | None = None,
    min_size: int | None = None,
) -> None:
    """Raise unless ``x`` is a float image batch ``(B, C, H, W)`` with the given properties.

    Checks run cheapest first: type, shape, dtype, side length, then range
    (the only one that reads the values).

    Args:
        x: the value to check.
        name: the argument's name, used in the message.
        channels: required C (None = any).
        value_range: ``(low, high)`` every value must lie in (None = unchecked).
        min_size: smallest allowed H and W (None = any).

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: wrong shape, non-float dtype, too small, or out of range.
    """
    check_tensor(x, name)
    check_shape(x, ["B", "C" if channels is None else channels, "H", "W"], name)
    check_floating(x, name)
    if min_size is not None and min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name}: expected H, W >= {min_size}, got {tuple(x.shape[-2:])}")
    if value_range is not None:
        check_range(x, name, *value_range)
