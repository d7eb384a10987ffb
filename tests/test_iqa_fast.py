"""qtlib's fast paths (qtlib.iqa.fast) against pyiqa's own archs, within each path's stated tolerance."""

from __future__ import annotations

import torch

from qtlib.iqa import get_info
from qtlib.iqa.factory import create_metric
from qtlib.iqa.fast import FAST_PATHS
from tests.iqa_fixtures import natural_images, prepared  # noqa: F401  (fixture)


def _value_and_grad(metric, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = metric(x)
    y.sum().backward()
    return y.detach(), x.grad


def test_catalog_names_known_paths():
    from qtlib.iqa import CATALOG

    for info in CATALOG.values():
        assert set(info.fast_paths) <= set(FAST_PATHS), info.name


def test_brisque_loss_equals_pyiqa(prepared):  # noqa: F811
    fast = create_metric("brisque", as_loss=True)
    plain = create_metric("brisque", as_loss=True, fast=False)
    assert type(fast.net).__name__ == "FastBRISQUE" and type(plain.net).__name__ == "BRISQUE"
    x = torch.cat([natural_images(4, 96), natural_images(4, 64, offset=3)[:, :, :, :].repeat(1, 1, 2, 2)[..., :96, :96]])
    v_fast, g_fast = _value_and_grad(fast, x)
    v_plain, g_plain = _value_and_grad(plain, x)
    assert torch.equal(v_fast, v_plain)  # the forward is pyiqa's own computation
    scale = g_plain.abs().max()
    assert scale > 0
    assert (g_fast - g_plain).abs().max() <= 1e-5 * scale * 10  # float32 rounding of the adjoint filter


def test_brisque_score_path_untouched(prepared):  # noqa: F811
    # scoring (no gradient) keeps pyiqa's arch: ledger provenance names it
    assert type(create_metric("brisque").net).__name__ == "BRISQUE"
    assert get_info("brisque").fast_paths == ("brisque_filter_grad",)


def _calibra_images() -> list[torch.Tensor]:
    from pathlib import Path

    import numpy as np
    import pyiqa
    from PIL import Image

    root = Path(pyiqa.__file__).parent.parent / "ResultsCalibra"  # shipped in pyiqa's wheel
    paths = sorted(root.glob("*/*.bmp"))
    assert len(paths) == 10, root
    return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
            for p in paths]


def test_niqe_float32_against_float64_calibra(prepared):  # noqa: F811
    from qtlib.iqa.fast_niqe import TOLERANCE

    plain = create_metric("niqe")  # opt-in path: the default build stays pyiqa's float64
    assert type(plain.net).__name__ == "NIQE"
    fast = create_metric("niqe", fast=("niqe_float32",))
    assert type(fast.net).__name__ == "Float32NIQE"
    diffs = [abs(float(fast(x)) - float(plain(x))) for x in _calibra_images()]
    # measured: largest 0.031 (dist/I19, 9.07 vs 9.10), the other nine within 0.011
    assert max(diffs) <= TOLERANCE
    assert sorted(diffs)[-2] <= 0.02


def test_niqe_float32_batch(prepared):  # noqa: F811
    fast = create_metric("niqe", fast=("niqe_float32",))
    x = natural_images(3, 192)
    batched = fast(x).reshape(-1)
    alone = torch.cat([fast(x[i:i + 1]).reshape(-1) for i in range(3)])
    assert batched.shape == (3,) and torch.allclose(batched, alone, atol=1e-2)
