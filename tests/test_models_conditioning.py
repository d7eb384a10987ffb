"""Score conditioning: zero-init exactness, per-sample scores, training, custom backbones."""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from qtlib.config import ConditioningConfig, ModelConfig, NAFNetConfig, UNetConfig
from qtlib.models import (
    ScoreConditioned,
    build_backbone,
    build_model,
    sinusoidal_encoding,
)
from qtlib.models.conditioning import DiscreteEmbedding, SinusoidalEmbedding

EMBEDDINGS = ("sinusoidal", "discrete")


def tiny(backbone: str = "unet", embedding: str = "sinusoidal", **cond) -> ModelConfig:
    return ModelConfig(
        backbone=backbone,
        unet=UNetConfig(width=4, depth=2),
        nafnet=NAFNetConfig(width=4, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1)),
        conditioning=ConditioningConfig(embedding=embedding, hidden=16, **cond),
    )


def perturb(model: nn.Module, std: float = 0.05) -> None:
    """Make NAFNet blocks (zero-initialized scales) and embeddings non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))


@pytest.mark.parametrize("backbone", ["unet", "nafnet"])
@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_zero_init_equals_bare_backbone(backbone: str, embedding: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(backbone, embedding, injection=("bottleneck", "decoders.0")))
    perturb(model.backbone)  # a "pretrained" backbone, freshly wrapped
    x = torch.rand(3, 3, 13, 18)
    bare = model.backbone(x)
    for score in (None, 0.0, 3.5, 7.0, torch.tensor([0.0, 4.2, 10.0])):
        assert torch.equal(model(x, score), bare)


@pytest.mark.parametrize("backbone", ["unet", "nafnet"])
@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_gradient_step_makes_scores_matter(backbone: str, embedding: str) -> None:
    """One AdamW step on a preference-like objective (score 6 brighter than score 2) separates the scores."""
    torch.manual_seed(0)
    model = build_model(tiny(backbone, embedding))
    x = torch.rand(2, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(x, torch.tensor([2.0, 6.0]))  # one batch, a score per sample
    (out[0].mean() - out[1].mean()).backward()
    opt.step()
    with torch.no_grad():
        diff = model(x, 6.0) - model(x, 2.0)
    assert diff.abs().max() > 1e-5  # far above float rounding (the fresh wrapper gives exactly 0)
    assert diff.mean() > 0  # and in the direction of the objective


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_embeddings_train_on_score_dependent_task(embedding: str) -> None:
    """Target = input shifted by -0.2 (score 2) or +0.2 (score 6): unconditioned MSE cannot go below 0.04."""
    torch.manual_seed(0)
    model = build_model(tiny("unet", embedding))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scores = torch.tensor([2.0, 6.0, 2.0, 6.0])
    shift = torch.where(scores > 4, 0.2, -0.2)[:, None, None, None]
    losses = []
    for _ in range(200):
        x = torch.rand(4, 3, 8, 8)
        loss = nn.functional.mse_loss(model(x, scores), x + shift)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.04
    assert sum(losses[-10:]) / 10 < 0.01, losses[-10:]  # well below the unconditioned optimum 0.04


def test_per_sample_scores_equal_separate_calls() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("nafnet", "sinusoidal"))
    perturb(model)
    x = torch.rand(3, 3, 9, 10)
    scores = torch.tensor([1.0, 5.5, 7.0])
    batched = model(x, scores)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], model(x[i : i + 1], float(scores[i])), atol=1e-6, rtol=1e-6)


def test_score_clamping_and_default() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("unet", "sinusoidal", top_score=7.0))
    perturb(model)
    x = torch.rand(1, 3, 8, 8)
    top = model(x, 7.0)
    assert torch.equal(model(x), top)
    assert torch.equal(model(x, 9.3), top)
    assert torch.equal(model(x, torch.tensor(10.0)), top)
    assert torch.equal(model(x, -1.0), model(x, 0.0))
    assert not torch.equal(model(x, 3.0), top)


def test_exception_scores() -> None:
    model = build_model(tiny())
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"score: expected shape \(2,\)"):
        model(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="score: expected a finite number"):
        model(x, float("nan"))
    with pytest.raises(TypeError, match="score"):
        model(x, "7")


def test_sinusoidal_encoding_eq6() -> None:
    s = torch.tensor([0.0, 0.3])
    g = sinusoidal_encoding(s, 3)
    assert g.shape == (2, 6)
    expected = [math.sin(math.pi * 0.3), math.cos(math.pi * 0.3), math.sin(2 * math.pi * 0.3),
                math.cos(2 * math.pi * 0.3), math.sin(4 * math.pi * 0.3), math.cos(4 * math.pi * 0.3)]
    torch.testing.assert_close(g[1], torch.tensor(expected))
    torch.testing.assert_close(g[0], torch.tensor([0.0, 1.0] * 3))
    # the module's fused form feeds S / 10 through the same encoding
    emb = SinusoidalEmbedding(bands=3, hidden=4, channels=[2])
    scores = torch.tensor([0.0, 3.0, 7.0])
    torch.testing.assert_close(torch.sin(torch.addcmul(emb.phase, scores[:, None], emb.freqs)),
                               sinusoidal_encoding(scores / 10, 3), atol=1e-6, rtol=0)
    assert "freqs" not in emb.state_dict()


def test_discrete_levels_floor_and_merge_top() -> None:
    emb = DiscreteEmbedding(levels=8, channels=[1])
    with torch.no_grad():
        emb.tables[0].weight.copy_(torch.arange(8.0)[:, None])
    model_cfg = ConditioningConfig(embedding="discrete", top_score=7.0)
    from qtlib.models.conditioning import prepare_scores

    s = prepare_scores(torch.tensor([-1.0, 0.5, 3.99, 6.99, 7.0, 9.5]), 6, model_cfg.top_score, torch.device("cpu"))
    assert emb(s)[0][:, 0].tolist() == [0.0, 0.0, 3.0, 6.0, 7.0, 7.0]


def test_injection_parameters_and_reg() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("unet", "sinusoidal", injection=("bottleneck", "decoders.1")))
    params = model.injection_parameters()
    assert {id(p) for p in params} == {id(p) for p in model.embedding.parameters()}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not backbone_ids & {id(p) for p in params}
    init = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.rand(2, 3, 8, 8)
        opt.zero_grad()
        model(x, torch.tensor([1.0, 6.0])).mean().backward()
        opt.step()
    reg = 0.5 * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.injection_parameters(), init, strict=True))
    assert reg > 0
    reg.backward()  # L_reg is differentiable w.r.t. the injection layers


@pytest.mark.parametrize("backbone", ["unet", "nafnet"])
def test_reg_parameters_groups(backbone: str) -> None:
    """train.losses.pref.reg_params: the embedding, the modules at the injection points, the upsampling."""
    model = build_model(tiny(backbone, "sinusoidal", injection=("bottleneck", "decoders.1")))
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(model.reg_parameters(["embedding"])) == ids(model.embedding.parameters())
    inj = ids(model.backbone.bottleneck.parameters()) | ids(model.backbone.decoders[1].parameters())
    assert ids(model.reg_parameters(["injected"])) == inj
    assert ids(model.reg_parameters(["upsampling"])) == ids(model.backbone.ups.parameters())
    both = model.reg_parameters(["embedding", "injected", "injected"])
    assert len(both) == len(ids(both)) and ids(both) == ids(model.embedding.parameters()) | inj  # each once
    assert [id(p) for p in both] == [id(p) for p in model.reg_parameters(["embedding", "injected"])]  # fixed order
    with pytest.raises(ValueError, match="unknown group"):
        model.reg_parameters(["head"])
    assert build_model(ModelConfig(conditioning=ConditioningConfig(enabled=False))).reg_parameters(["embedding"]) == []


def test_hooks_only_live_during_forward() -> None:
    model = build_model(tiny())
    model(torch.rand(1, 3, 8, 8), 3.0)
    assert all(not m._forward_hooks for m in model.backbone.modules())


def test_deepcopy_is_independent() -> None:
    torch.manual_seed(0)
    model = build_model(tiny())
    perturb(model)
    twin = copy.deepcopy(model)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(twin(x, 2.0), model(x, 2.0))
    with torch.no_grad():
        for p in twin.embedding.parameters():
            p.add_(1.0)
    assert not torch.equal(twin(x, 2.0), model(x, 2.0))


def test_unknown_injection_point() -> None:
    with pytest.raises(ValueError, match="no submodule 'neck'.*known injection points: bottleneck"):
        build_model(tiny(injection=("neck",)))


class TinyBackbone(nn.Module):
    """A third backbone: nothing but a class whose injection module is named in the config."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.mid = nn.Conv2d(6, 6, 3, padding=1)  # channels inferred from out_channels
        self.act = nn.GELU()
        self.out = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.act(self.mid(self.stem(x))))


class TinyBackboneWithTable(TinyBackbone):
    """A backbone whose injection point is not a conv: it states its channels."""

    injection_channels: ClassVar[dict[str, int]] = {"act": 6}


@pytest.mark.parametrize(("cls", "point"), [(TinyBackbone, "mid"), (TinyBackboneWithTable, "act")])
@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_custom_backbone_plug_and_play(cls: type[nn.Module], point: str, embedding: str) -> None:
    torch.manual_seed(0)
    backbone = cls()
    model = ScoreConditioned(backbone, ConditioningConfig(embedding=embedding, hidden=8, injection=(point,)))
    x = torch.rand(2, 3, 7, 9)
    assert torch.equal(model(x, torch.tensor([1.0, 6.0])), backbone(x))
    assert model.channels == {point: 6}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x, torch.tensor([1.0, 6.0])).square().mean().backward()
    opt.step()
    assert not torch.equal(model(x, 1.0), model(x, 6.0))


def test_injection_point_off_the_forward_path() -> None:
    backbone = TinyBackbone()
    backbone.unused = nn.Conv2d(6, 6, 1)
    model = ScoreConditioned(backbone, ConditioningConfig(injection=("mid", "unused")))
    with pytest.raises(RuntimeError, match="injection: unused never ran in TinyBackbone.forward"):
        model(torch.rand(1, 3, 5, 5))


def test_custom_backbone_uninferable_channels() -> None:
    with pytest.raises(ValueError, match="cannot infer the channels of 'act'.*injection_channels"):
        ScoreConditioned(TinyBackbone(), ConditioningConfig(injection=("act",)))


def test_conditioning_disabled_gives_bare_backbone() -> None:
    cfg = tiny()
    cfg = ModelConfig(backbone="unet", unet=cfg.unet, conditioning=ConditioningConfig(enabled=False))
    model = build_model(cfg)
    assert type(model) is type(build_backbone(cfg))
