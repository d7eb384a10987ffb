"""qtlib.util.checks: shape specs and image checks whose messages name argument, expected and actual."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtlib.util.checks import (
    check_floating,
    check_image,
    check_range,
    check_shape,
    check_tensor,
    format_shape,
)


def test_format_shape() -> None:
    assert format_shape(["B", 3, "H", "W"]) == "(B, 3, H, W)"
    assert format_shape([2]) == "(2,)"
    assert format_shape(()) == "()"


def test_smoke_check_shape_returns_named_sizes() -> None:
    sizes = check_shape(torch.zeros(2, 3, 5, 7), ["B", "3", "H", "W"], "x")
    assert sizes == {"B": 2, "H": 5, "W": 7}
    assert check_shape(torch.zeros(2, 3, 5, 7), ["B", 3, "H", "W"], "x") == sizes  # int == digit string


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((4, 4, 3), ["S", "S", 3]),  # a repeated name = equal sizes
        ((2, 3, 8, 8), ["*", "H", "W"]),  # any leading dims
        ((8, 8), ["*", "H", "W"]),  # including none
        ((5,), [5]),
    ],
)
def test_check_shape_accepts(shape: tuple[int, ...], spec: list) -> None:
    check_shape(np.zeros(shape), spec, "a")  # numpy arrays work too


@pytest.mark.parametrize(
    ("shape", "spec", "message"),
    [
        ((3, 8, 8), ["B", 3, "H", "W"], r"x: expected shape \(B, 3, H, W\), got \(3, 8, 8\)"),
        ((2, 1, 8, 8), ["B", 3, "H", "W"], r"x: expected shape \(B, 3, H, W\), got \(2, 1, 8, 8\)"),
        ((4, 5, 3), ["S", "S", 3], r"x: expected shape \(S, S, 3\), got \(4, 5, 3\)"),
        ((8,), ["*", "H", "W"], r"x: expected shape \(\*, H, W\), got \(8,\)"),
        ((3,), [2], r"x: expected shape \(2,\), got \(3,\)"),
    ],
)
def test_exception_check_shape(shape: tuple[int, ...], spec: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_shape(torch.zeros(shape), spec, "x")


def test_exception_check_shape_no_shape() -> None:
    with pytest.raises(TypeError, match=r"x: expected an array or tensor of shape \(B, C\), got list"):
        check_shape([1, 2], ["B", "C"], "x")


def test_check_tensor_and_floating() -> None:
    check_tensor(torch.zeros(1), "t")
    with pytest.raises(TypeError, match="t: expected a torch.Tensor, got ndarray"):
        check_tensor(np.zeros(1), "t")
    check_floating(torch.zeros(1, dtype=torch.float16), "t")
    with pytest.raises(ValueError, match="t: expected a floating point tensor, got torch.uint8"):
        check_floating(torch.zeros(1, dtype=torch.uint8), "t")


def test_check_range() -> None:
    check_range(torch.tensor([0.0, 1.0 + 1e-7, -1e-7]), "r", 0.0, 1.0)  # rounding slack
    check_range(torch.zeros(0), "r", 0.0, 1.0)  # empty passes
    with pytest.raises(ValueError, match=r"r: values must be in \[0, 1\], got \[0.0000, 2.0000\]"):
        check_range(torch.tensor([0.0, 2.0]), "r", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"r: values must be in \[-1, 1\], got \[-1.5000, 0.0000\]"):
        check_range(torch.tensor([-1.5, 0.0]), "r", -1.0, 1.0)


def test_smoke_check_image() -> None:
    check_image(torch.rand(2, 3, 16, 16), "images", channels=3, value_range=(0.0, 1.0), min_size=8)
    check_image(torch.randn(1, 5, 4, 4), "x")  # any channels, no range


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "message"),
    [
        ([0.5], {}, TypeError, "images: expected a torch.Tensor, got list"),
        (torch.rand(3, 8, 8), {"channels": 3}, ValueError, r"images: expected shape \(B, 3, H, W\), got \(3, 8, 8\)"),
        (torch.rand(1, 3, 8), {}, ValueError, r"images: expected shape \(B, C, H, W\), got \(1, 3, 8\)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), {}, ValueError, "images: expected a floating point tensor"),
        (torch.rand(1, 3, 4, 9), {"min_size": 8}, ValueError, r"images: expected H, W >= 8, got \(4, 9\)"),
        (torch.rand(1, 3, 8, 8) * 3, {"value_range": (0.0, 1.0)}, ValueError, r"images: values must be in \[0, 1\]"),
    ],
)
def test_exception_check_image(x: object, kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        check_image(x, "images", **kwargs)


def test_check_image_reads_values_last() -> None:
    # A wrong shape is reported before anything that needs the values (and a NaN-free read).
    with pytest.raises(ValueError, match="expected shape"):
        check_image(torch.full((3, 8, 8), 5.0), "x", channels=3, value_range=(0.0, 1.0))
