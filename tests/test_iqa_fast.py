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


# --- MUSIQ: batched multi-scale tokens (qtlib.iqa.fast_musiq) against pyiqa's arch, same random weights ---

def _musiq_pair(as_loss: bool = False):
    """(pyiqa's MUSIQ metric, qtlib's default build) with the same random weights."""
    torch.manual_seed(0)
    plain = create_metric("musiq", as_loss=as_loss, pretrained=False, fast=False)
    fast = create_metric("musiq", as_loss=as_loss, pretrained=False)
    assert type(plain.net).__name__ == "MUSIQ" and type(fast.net).__name__ == "FastMUSIQ"
    fast.net.arch.load_state_dict(plain.net.state_dict())
    return plain, fast


def _photo_batch(n: int, h: int, w: int, offset: int = 0) -> torch.Tensor:
    return natural_images(n, max(h, w), offset=offset)[..., :h, :w].contiguous()


def test_musiq_tokens_are_pyiqas():
    from pyiqa.data.multiscale_trans_util import get_multiscale_patches

    from qtlib.iqa.fast_musiq import FastMUSIQ

    _, fast = _musiq_pair()
    net: FastMUSIQ = fast.net
    for h, w in ((96, 96), (100, 150), (130, 97)):
        x = (_photo_batch(2, h, w) - 0.5) * 2
        ref = get_multiscale_patches(x, **net.arch.data_preprocess_opts)  # (B, L_padded, 3*32*32 + 3)
        patches, spatial, scale = net.tokens(x)
        mask = ref[0, :, -1].bool()
        assert (ref[:, :, -1] == ref[:1, :, -1]).all()  # equal-size images: one mask for the batch
        assert not (ref[:, ~mask, :-1]).any()  # what is dropped is pyiqa's zero padding
        assert patches.shape[1] == int(mask.sum())
        assert torch.equal(patches.reshape(*patches.shape[:2], -1), ref[:, mask, :-3])  # bit-identical
        assert torch.equal(spatial, ref[0, mask, -3].long()) and torch.equal(scale, ref[0, mask, -2].long())


def test_musiq_scores_equal_pyiqa():
    from qtlib.iqa.fast_musiq import TOLERANCE

    plain, fast = _musiq_pair()
    worst = 0.0
    # square blocks (no padding: 49 + 144 + original-size tokens) and non-square ones (padding dropped)
    for n, h, w, offset in ((4, 96, 96, 0), (4, 96, 96, 5), (2, 224, 224, 1), (3, 100, 150, 2), (2, 130, 97, 3)):
        x = _photo_batch(n, h, w, offset)
        with torch.no_grad():
            want, got = plain(x).reshape(-1), fast(x).reshape(-1)
        assert got.shape == (n,)
        diff = (got - want).abs() / want.abs().clamp_min(1.0)
        worst = max(worst, float(diff.max()))
    # measured (random weights, scores -0.6 to -1.6): largest 5.4e-7 here, 6.6e-7 on uniform noise
    assert worst <= TOLERANCE, worst


def test_musiq_loss_gradients_equal_pyiqa():
    plain, fast = _musiq_pair(as_loss=True)
    x = _photo_batch(2, 64, 80)
    v_plain, g_plain = _value_and_grad(plain, x)
    v_fast, g_fast = _value_and_grad(fast, x)
    assert torch.allclose(v_fast.reshape(-1), v_plain.reshape(-1), atol=1e-4)
    scale = g_plain.abs().max()
    assert scale > 0
    assert (g_fast - g_plain).abs().max() <= 1e-3 * scale
