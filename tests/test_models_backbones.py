"""Backbones: shapes on odd sizes, injection points, config checks."""

from __future__ import annotations

import pytest
import torch

from qtlib.config import ModelConfig, NAFNetConfig, UNetConfig
from qtlib.models import (
    BACKBONES,
    NAFNet,
    UNet,
    build_backbone,
    build_model,
    size_multiple,
)
from qtlib.models.nafnet import LayerNorm2d, NAFBlock

TINY = {
    "unet": ModelConfig(backbone="unet", unet=UNetConfig(width=4, depth=3)),
    "nafnet": ModelConfig(backbone="nafnet", nafnet=NAFNetConfig(width=4, enc_blocks=(1, 1, 2), middle_blocks=1,
                                                                 dec_blocks=(1, 1, 1))),
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (17, 33), (31, 8), (64, 64)])
def test_smoke_odd_sizes(name: str, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = build_backbone(TINY[name])
    x = torch.rand(2, 3, *hw)
    assert net(x).shape == x.shape


def test_cardinality_channels() -> None:
    net = UNet(UNetConfig(width=4, depth=2, in_channels=1, out_channels=5))
    assert net(torch.rand(1, 1, 9, 11)).shape == (1, 5, 9, 11)
    naf = NAFNet(NAFNetConfig(width=4, enc_blocks=(1,), middle_blocks=0, dec_blocks=(0,), in_channels=4,
                              out_channels=2))
    assert naf(torch.rand(1, 4, 9, 11)).shape == (1, 2, 9, 11)


@pytest.mark.parametrize("name", sorted(TINY))
def test_injection_channels_match_features(name: str) -> None:
    net = build_backbone(TINY[name])
    seen: dict[str, int] = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.shape[1]))
             for n in net.injection_channels]
    net(torch.rand(1, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert seen == dict(net.injection_channels)
    assert "bottleneck" in seen


def test_default_widths() -> None:
    unet = build_backbone(ModelConfig())
    assert unet.injection_channels["bottleneck"] == 128  # width 16, depth 3: the authors' 128-channel bottleneck
    assert size_multiple(unet) == 8
    naf = build_backbone(ModelConfig(backbone="nafnet"))
    assert naf.injection_channels["bottleneck"] == 512
    assert len(naf.encoders[3]) == 28
    assert size_multiple(naf) == 16
    # Published sizes: NAFNet-width32 (GoPro) 17.11 M parameters, width64 67.89 M.
    assert sum(p.numel() for p in naf.parameters()) == pytest.approx(17.11e6, rel=1e-3)


def test_nafblock_starts_as_identity() -> None:
    block = NAFBlock(8)
    x = torch.randn(2, 8, 5, 6)
    assert torch.equal(block(x), x)


def test_layernorm2d_matches_layer_norm() -> None:
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_()
        ln.bias.uniform_()
    x = torch.randn(2, 6, 4, 5)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)


def test_exception_bad_input() -> None:
    net = build_backbone(TINY["unet"])
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, H, W\)"):
        net(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="enc_blocks and dec_blocks"):
        NAFNet(NAFNetConfig(enc_blocks=(1, 1), dec_blocks=(1,)))


def test_backbone_table_is_explicit() -> None:
    assert set(BACKBONES) == {"unet", "nafnet"}
    assert isinstance(build_model(ModelConfig(backbone="nafnet", nafnet=TINY["nafnet"].nafnet)).backbone, NAFNet)


def test_gradcheck_unet() -> None:
    net = UNet(UNetConfig(width=2, depth=1)).double()
    x = torch.rand(1, 3, 4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,), eps=1e-6, atol=1e-4)
