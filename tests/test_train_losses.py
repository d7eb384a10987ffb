"""Loss terms of eq. (11) on hand-checkable cases, and the switches that turn each term off."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from qtlib.config import ModelConfig, UNetConfig
from qtlib.config.types import CroppedLoss, Losses, PerLoss, PrefLoss, RecLoss, SupLoss, TrainConfig
from qtlib.models import build_model
from qtlib.train import (
    StepContext,
    StudentPasses,
    Switches,
    active_terms,
    resolve_switches,
    train_step,
)
from qtlib.train.step import resolve_starts
from qtlib.train.samples import Batch
from qtlib.train.losses import (
    block_weight_map,
    crop_batch,
    cropped_consistency,
    injection_reg,
    preference_terms,
    weighted_l1,
)

TINY = ModelConfig(unet=UNetConfig(width=4, depth=2))


# ----------------------------------------------------------------- L_rec


def test_block_weight_map_mean_one_and_layout() -> None:
    w = block_weight_map(torch.tensor([[[1.0, 3.0], [2.0, 2.0]]]), (4, 6))
    assert w.shape == (1, 1, 4, 6)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[0, 0, 0, 0].item() == pytest.approx(0.5) and w[0, 0, 0, 5].item() == pytest.approx(1.5)
    assert w[0, 0, 3, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [[[0.0, 0.0], [0.0, 0.0]], [[1.0, math.nan], [1.0, 1.0]]])
def test_block_weight_map_falls_back_to_uniform(bad: list) -> None:
    w = block_weight_map(torch.tensor([bad]), (4, 4))
    assert torch.equal(w, torch.ones(1, 1, 4, 4))


def test_weighted_l1_value_and_exception() -> None:
    pred, target = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    w = torch.tensor([[[[0.5, 1.5], [1.0, 1.0]]]])
    assert weighted_l1(pred, target, w).item() == pytest.approx(1.0)  # mean(w * 1)
    assert weighted_l1(pred, target).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weight"):
        weighted_l1(pred, target, torch.ones(1, 3, 2, 2))


def test_block_weights_change_the_gradient() -> None:
    """d/dpred of mean(w |pred - target|) is -w / N where pred < target: the weights scale each block."""
    pred = torch.zeros(1, 1, 2, 2, requires_grad=True)
    w = block_weight_map(torch.tensor([[[1.0, 3.0]]]), (2, 2))  # left column 0.5, right 1.5
    weighted_l1(pred, torch.ones(1, 1, 2, 2), w).backward()
    expected = -torch.tensor([[[[0.5, 1.5], [0.5, 1.5]]]]) / 4
    assert torch.allclose(pred.grad, expected)
    plain = torch.zeros(1, 1, 2, 2, requires_grad=True)
    weighted_l1(plain, torch.ones(1, 1, 2, 2)).backward()
    assert torch.allclose(plain.grad, torch.full_like(plain, -0.25))


# ----------------------------------------------------------------- L_pref, L_reg


def test_preference_terms_hand_values() -> None:
    t = preference_terms(torch.tensor([5.1]), torch.tensor([5.0]), torch.tensor([5.1]), beta=1.0, delta=0.1)
    assert t.first.item() == pytest.approx(math.log(2))  # gap == delta
    assert t.second.item() == pytest.approx(math.log(2))  # high output == teacher's poorest PL


def test_preference_decreases_when_high_reward_rises() -> None:
    r_low, s_poor = torch.tensor([4.0, 5.0]), torch.tensor([4.5, 4.5])
    prev = None
    for r in (3.0, 4.0, 5.0, 6.0, 8.0):
        t = preference_terms(torch.tensor([r, r]), r_low, s_poor, beta=1.0, delta=0.1)
        if prev is not None:
            assert t.first < prev.first and t.second < prev.second
        prev = t
    r_high = torch.tensor([5.0, 5.0], requires_grad=True)
    t = preference_terms(r_high, r_low, s_poor, beta=1.0, delta=0.1)
    (t.first + t.second).backward()
    assert (r_high.grad < 0).all()  # gradient descent raises the high-score reward


def test_injection_reg_zero_at_init_and_hand_value() -> None:
    model = build_model(TINY)
    params = model.injection_parameters()
    init = [p.detach().clone() for p in params]
    assert injection_reg(params, init).item() == 0.0
    with torch.no_grad():
        params[0].add_(0.1)
    n = params[0].numel()
    assert injection_reg(params, init).item() == pytest.approx(0.5 * n * 0.01, rel=1e-5)
    with pytest.raises(ValueError, match="init"):
        injection_reg(params, init[:-1])


# ----------------------------------------------------------------- L_cropped


def test_crop_batch_per_sample_offsets() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    c = crop_batch(x, torch.tensor([[0, 0], [2, 1]]), 2)
    assert torch.equal(c[0, 0], x[0, 0, :2, :2]) and torch.equal(c[1, 0], x[1, 0, 2:4, 1:3])
    with pytest.raises(ValueError, match="does not fit"):
        crop_batch(x, torch.tensor([[0, 0], [3, 0]]), 2)


def test_cropped_zero_for_crop_equivariant_model() -> None:
    """A pointwise model commutes with cropping; a crop-invariant reward then scores both orders alike."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1)  # crop(f(x)) == f(crop(x)) exactly
    colors = torch.rand(4, 3, 1, 1)
    x = colors.expand(4, 3, 32, 32)  # spatially uniform images: the mean is crop-invariant

    def reward(y: torch.Tensor) -> torch.Tensor:
        return 10 * y.mean(dim=(1, 2, 3))

    offsets = torch.tensor([[0, 0], [8, 3], [16, 16], [5, 11]])
    s1 = reward(crop_batch(model(x), offsets, 16))
    s2 = reward(model(crop_batch(x, offsets, 16)))
    assert cropped_consistency(s1, s2).item() == pytest.approx(0.0, abs=1e-6)
    # and on natural images too, for any reward, since the model is pointwise
    z = torch.rand(4, 3, 32, 32)
    assert torch.allclose(crop_batch(model(z), offsets, 16), model(crop_batch(z, offsets, 16)))
    # a zero-padded 3x3 convolution is not crop-equivariant at the crop border: the loss sees it
    conv = nn.Conv2d(3, 3, 3, padding=1)

    def contrast(y: torch.Tensor) -> torch.Tensor:
        return y.std(dim=(1, 2, 3))

    assert cropped_consistency(contrast(crop_batch(conv(z), offsets, 16)),
                               contrast(conv(crop_batch(z, offsets, 16)))).item() > 0


def test_cropped_consistency_hand_value() -> None:
    assert cropped_consistency(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 2.0])).item() == pytest.approx(1.5)


# ----------------------------------------------------------------- switches in a step


def _toy_reward(y: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for the IQA reward: contrast on the 0..10 scale."""
    return 10 * y.std(dim=(1, 2, 3))


class _Recorder:
    """Records, for every call of the student passes, each group's (image side, passes, distinct inputs)."""

    def __init__(self, passes: nn.Module) -> None:
        self.calls: list[list[tuple[int, int, int]]] = []
        passes.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls.append([(x.shape[-1], rows.shape[0], x.shape[0]) for x, rows, _ in args[0]])


def _ctx(sw: Switches, losses: Losses | None = None, top: float = 7.0) -> tuple[StepContext, _Recorder]:
    losses = resolve_starts(losses or Losses(), budget=1)  # the 20% starts of a 1-step run: step 0
    torch.manual_seed(0)
    student = build_model(TINY)
    passes = StudentPasses(student)
    rec = _Recorder(passes)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    init = [p.detach().clone() for p in student.reg_parameters(losses.pref.reg_params)]
    per = None
    if sw.perceptual != "none":
        from qtlib.train.perceptual import build_perceptual

        per = build_perceptual(sw.perceptual)
    ctx = StepContext(passes, student, opt, sw, losses, top, 16, _toy_reward, _toy_reward, per, init,
                      torch.device("cpu"))
    return ctx, rec


def _batch(b: int = 3, p: int = 32, w: int = 32) -> Batch:
    """A batch with P px patches and W px reward windows (the crops of the ctx are 16 px)."""
    g = torch.Generator().manual_seed(1)
    return Batch(
        x=torch.rand(b, 3, p, p, generator=g), target=torch.rand(b, 3, p, p, generator=g),
        weight=torch.ones(b, 1, p, p), cond=torch.tensor([3.0, 7.5, 5.0][:b]),
        low=torch.full((b,), 4.0), crop_yx=torch.zeros(b, 2, dtype=torch.long),
        window=torch.rand(b, 3, w, w, generator=g), ref=torch.rand(b, 3, w, w, generator=g),
    )


FULL = Switches("qualiteacher", True, True, "none", True, True)


def test_full_step_batches_all_passes_in_one_call() -> None:
    ctx, rec = _ctx(FULL)
    out = train_step(ctx, _batch(), step=0)
    # one call: the 3 patches at their conditions, the 3 windows at the top and at the low levels (2 passes of
    # 3 inputs: the encoder shared), the 3 crops (16 px) at the top
    assert rec.calls == [[(32, 3 + 6, 6), (16, 3, 3)]]
    # windows of another size are a group of their own
    ctx, rec = _ctx(FULL)
    train_step(ctx, _batch(w=48), step=0)
    assert rec.calls == [[(32, 3, 3), (48, 6, 3), (16, 3, 3)]]
    for k in ("loss", "rec", "pref_first", "pref_second", "pref_reg", "cropped", "reward_high", "reward_low"):
        assert math.isfinite(out.terms[k]), k
    assert math.isnan(out.terms["per"])
    assert out.terms["pref_reg"] == 0.0  # first step: the injection weights are still W_init


@pytest.mark.parametrize(
    ("sw", "off", "calls"),
    [
        (replace(FULL, preference=False), {"pref_first", "pref_second", "pref_reg", "reward_high", "reward_ref"},
         [[(32, 6, 6), (16, 3, 3)]]),
        (replace(FULL, cropped=False), {"cropped"}, [[(32, 9, 6)]]),
        (replace(FULL, preference=False, cropped=False), {"pref_first", "cropped"}, [[(32, 3, 3)]]),
        (replace(FULL, score_condition=False, preference=False), {"pref_first"}, [[(32, 6, 6), (16, 3, 3)]]),
    ],
)
def test_switches_turn_terms_off(sw: Switches, off: set[str], calls: list) -> None:
    ctx, rec = _ctx(sw)
    out = train_step(ctx, _batch(), step=0)
    assert rec.calls == calls
    for k in off:
        assert math.isnan(out.terms[k]), k
    assert math.isfinite(out.terms["rec"])


def test_block_weighting_switch_changes_rec() -> None:
    b = _batch()
    b = replace(b, weight=torch.linspace(0.2, 1.8, 32).view(1, 1, 1, 32).expand(3, 1, 32, 32).contiguous())
    on = train_step(_ctx(replace(FULL, preference=False, cropped=False))[0], b, 0).terms["rec"]
    off = train_step(_ctx(replace(FULL, block_weighting=False, preference=False, cropped=False))[0], b, 0)
    assert on != pytest.approx(off.terms["rec"])


def test_start_steps_and_zero_weights() -> None:
    losses = Losses(pref=PrefLoss(start=5), per=PerLoss(weight=0.0))
    sw = replace(FULL, perceptual="nlpd")
    assert active_terms(sw, losses, 4) == {"rec": True, "per": False, "pref": False, "cropped": True,
                                                "sup": False}
    assert active_terms(sw, losses, 5)["pref"]
    ctx, _ = _ctx(FULL, losses)
    assert math.isnan(train_step(ctx, _batch(), step=4).terms["pref_first"])
    assert math.isfinite(train_step(ctx, _batch(), step=5).terms["pref_first"])


def test_perceptual_term_runs_with_nlpd() -> None:
    ctx, _ = _ctx(replace(FULL, perceptual="nlpd", preference=False, cropped=False))
    assert math.isfinite(train_step(ctx, _batch(), 0).terms["per"])


def test_reward_config_keeps_members_that_score_the_size() -> None:
    from qtlib.config import IQAConfig, Member
    from qtlib.train.step import reward_config

    iqa = IQAConfig(ensemble=(Member("brisque", 0.5), Member("niqe", 0.5)))
    assert reward_config(iqa, 192) == iqa
    # NIQE accepts 96 px, but one 96 px block gives its block features no covariance: 2x2 blocks needed
    assert [m.metric for m in reward_config(iqa, 191).ensemble] == ["brisque"]
    assert [m.metric for m in reward_config(iqa, 48).ensemble] == ["brisque"]
    with pytest.raises(ValueError, match="no member"):
        reward_config(IQAConfig(ensemble=(Member("niqe", 1.0),)), 96)


def test_resolve_switches_methods_and_exceptions() -> None:
    tc = TrainConfig(losses=Losses(per=PerLoss(kind="none")))
    assert resolve_switches(tc, conditioned=True) == Switches("qualiteacher", True, True, "none", True, True)
    for method in ("plain_mt", "filter_mt"):
        sw = resolve_switches(replace(tc, method=method), conditioned=False)
        assert (sw.score_condition, sw.block_weighting, sw.preference, sw.cropped) == (False,) * 4
    with pytest.raises(ValueError, match="preference needs train.score_condition"):
        resolve_switches(replace(tc, score_condition=False), conditioned=True)
    with pytest.raises(ValueError, match="no score conditioning"):
        resolve_switches(tc, conditioned=False)
    assert not resolve_switches(replace(tc, losses=replace(tc.losses, pref=PrefLoss(weight=0))), True).preference
    assert resolve_switches(replace(tc, input_labels=True), conditioned=True).input_labels
    rejected = (({"method": "plain_mt"}, "got method plain_mt"), ({"method": "filter_mt"}, "got method filter_mt"),
                ({"score_condition": False, "preference": False}, "got score_condition: false"))
    for bad, why in rejected:
        with pytest.raises(ValueError, match=f"train.input_labels needs train.method: qualiteacher .*{why}"):
            resolve_switches(replace(tc, input_labels=True, **bad), conditioned=True)


def test_relative_margin_needs_relative_levels_and_the_supervised_anchor() -> None:
    """train.relative_margin keeps the top level for ground truth: only with relative levels and the anchor."""
    tc = TrainConfig(losses=Losses(per=PerLoss(kind="none"), sup=SupLoss(weight=1.0)), condition="relative",
                     relative_margin=1.0)
    assert resolve_switches(tc, conditioned=True).supervised
    no_sup = replace(tc.losses, sup=SupLoss(weight=0.0, per_weight=0.0))
    for bad in ({"condition": "absolute"}, {"losses": no_sup}, {"method": "filter_mt"},
                {"score_condition": False, "preference": False}):
        with pytest.raises(ValueError, match="train.relative_margin 1.0 needs .*condition: relative"):
            resolve_switches(replace(tc, **bad), conditioned=True)
    assert not resolve_switches(replace(tc, relative_margin=0.0, condition="absolute"), True).input_labels


def test_determinism_switch_is_scoped() -> None:
    from qtlib.train.compute import determinism

    before = torch.are_deterministic_algorithms_enabled()
    with determinism(not before) as state:
        assert state["deterministic_algorithms"] is (not before)
        assert torch.are_deterministic_algorithms_enabled() is (not before)
    assert torch.are_deterministic_algorithms_enabled() is before


def test_supervised_anchor_runs_in_the_same_forward() -> None:
    """train.losses.sup: the labeled pairs ride in the stacked call at the top level and add w * L1."""
    from qtlib.config.types import SupLoss

    losses = Losses(sup=SupLoss(weight=2.0))
    sw = replace(FULL, supervised=True, preference=False, cropped=False)
    ctx, rec = _ctx(sw, losses)
    g = torch.Generator().manual_seed(3)
    batch = replace(_batch(), sup_x=torch.rand(2, 3, 32, 32, generator=g), sup_y=torch.rand(2, 3, 32, 32, generator=g))
    out = train_step(ctx, batch, step=0)
    assert math.isfinite(out.terms["sup"]) and out.terms["sup"] > 0
    assert rec.calls == [[(32, 5, 5)]]  # one forward for the batch and the pairs
    assert out.terms["loss"] == pytest.approx(out.terms["rec"] + 2.0 * out.terms["sup"], rel=1e-5)
    off = train_step(_ctx(replace(sw, supervised=False), losses)[0], batch, step=0)
    assert math.isnan(off.terms["sup"])


def test_l2_scores_the_reference_label_window_as_y_h_is_scored() -> None:
    """L2 of eq. (8) compares R(y_h) with the reward of the reference label's window, on one scale:
    y_h equal to the label gives L2 = -log sigmoid(0) = log 2 exactly, with the real BRISQUE + NIQE reward
    on 192 px windows (where NIQE has its 2x2 blocks)."""
    from qtlib.config import IQAConfig
    from qtlib.train.step import build_reward

    losses = Losses(pref=PrefLoss(weight=1.0, reg_weight=0.0), cropped=CroppedLoss(weight=0.0))
    ctx = _ctx(replace(FULL, cropped=False), losses)[0]
    ctx = replace(ctx, reward=build_reward(IQAConfig(), 192, torch.device("cpu")))
    batch = _batch(b=2, w=192)
    with torch.no_grad():  # the reference label: exactly what the student restores at the top level
        ref = ctx.student(batch.window, ctx.top_score).clamp(0, 1)
    terms = train_step(ctx, replace(batch, ref=ref), step=0).terms
    assert terms["pref_second"] == pytest.approx(math.log(2), abs=1e-5)
    assert terms["reward_ref"] == pytest.approx(terms["reward_high"], abs=1e-5)
    # a photo as the reference scores far above the student's restoration of noise: L2 rises above log 2
    from skimage import data

    photo = torch.from_numpy(data.astronaut()[:192, 100:292].copy()).permute(2, 0, 1).float().div(255)
    fresh = replace(_ctx(replace(FULL, cropped=False), losses)[0], reward=ctx.reward)
    harder = train_step(fresh, replace(batch, ref=photo.expand(2, -1, -1, -1)), step=0).terms
    assert harder["reward_ref"] > harder["reward_high"] + 1.0 and harder["pref_second"] > math.log(2) + 0.3


def test_unit_rewards_shrink_the_second_term_toward_log2() -> None:
    """unit_rewards divides rewards and the reference by 10, so L2 moves toward -log sigmoid(0)."""
    base = Losses(pref=PrefLoss(weight=1.0, reg_weight=0.0), cropped=CroppedLoss(weight=0.0))
    sw = replace(FULL, cropped=False)
    batch = replace(_batch(), ref=torch.full((3, 3, 32, 32), 0.5))  # contrast 0: the toy reward's floor
    plain = train_step(_ctx(sw, base)[0], batch, step=0).terms
    unit = train_step(_ctx(sw, replace(base, pref=replace(base.pref, unit_rewards=True)))[0], batch, step=0).terms
    assert abs(unit["pref_second"] - math.log(2)) < abs(plain["pref_second"] - math.log(2))


def test_pref_low_grad_false_sends_no_gradient_into_y_l() -> None:
    """pref.low_grad false: the reward's input gets no gradient on the y_l half, the y_h half still does;
    the logged terms (the forward) are unchanged."""
    base = Losses(pref=PrefLoss(weight=1.0, reg_weight=0.0), cropped=CroppedLoss(weight=0.0))
    sw = replace(FULL, cropped=False)

    def reward_input_grad(losses: Losses) -> tuple[torch.Tensor, dict[str, float]]:
        ctx = _ctx(sw, losses)[0]
        seen: list[torch.Tensor] = []

        def reward(y: torch.Tensor) -> torch.Tensor:
            if y.requires_grad:  # not the reference label's call (no gradient)
                y.register_hook(seen.append)
            return _toy_reward(y)

        terms = train_step(replace(ctx, reward=reward), _batch(), step=0).terms
        return seen[0], terms

    g_on, t_on = reward_input_grad(base)
    g_off, t_off = reward_input_grad(replace(base, pref=replace(base.pref, low_grad=False)))
    b = g_on.shape[0] // 2
    assert g_on[b:].abs().sum() > 0 and g_off[b:].abs().sum() == 0  # y_l: pushed down only by default
    assert g_off[:b].abs().sum() > 0
    for k in ("pref_first", "pref_second", "reward_high", "reward_low"):
        assert t_off[k] == pytest.approx(t_on[k]), k


def test_pref_params_injection_keeps_the_preference_out_of_the_backbone() -> None:
    """pref.params: injection -- the backbone gets exactly the gradient of the step without L_pref, the
    injection weights exactly that of the full step; the logged loss still includes L_pref."""
    base = Losses(pref=PrefLoss(weight=1.0), cropped=CroppedLoss(weight=0.0))
    sw = replace(FULL, cropped=False)
    batch = _batch()

    def grads(losses: Losses) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        ctx = _ctx(sw, losses)[0]
        terms = train_step(ctx, batch, step=0).terms
        inj = {id(p) for p in ctx.student.injection_parameters()}
        return {("inj." if id(p) in inj else "bb.") + n: p.grad.clone()
                for n, p in ctx.student.named_parameters() if p.grad is not None}, terms

    full, t_full = grads(base)
    only, t_only = grads(replace(base, pref=replace(base.pref, params="injection")))
    without, _ = grads(replace(base, pref=replace(base.pref, weight=0.0)))
    bb = [k for k in full if k.startswith("bb.")]
    inj = [k for k in full if k.startswith("inj.")]
    assert bb and inj
    # L_pref does reach the backbone by default (by far more than the rounding of a differently stacked pass)
    assert any(not torch.allclose(full[k], without[k], rtol=1e-3, atol=1e-4) for k in bb)
    for k in bb:
        torch.testing.assert_close(only[k], without[k], rtol=1e-4, atol=1e-5)
    for k in inj:
        torch.testing.assert_close(only[k], full[k], rtol=1e-5, atol=1e-7)
    assert t_only["loss"] == pytest.approx(t_full["loss"], rel=1e-6)


def test_l_reg_reaches_its_anchored_weights_with_pref_params_injection() -> None:
    """pref.params injection confines L1 and L2 of eq. (8) to the score embedding, but L_reg still pulls the
    weights it anchors (reg_params: the backbone modules at the injection points too) toward W_init."""
    losses = Losses(rec=RecLoss(weight=0.0), pref=PrefLoss(weight=1.0, params="injection", second_weight=0.0,
                                                          reg_params=("embedding", "injected")),
                    cropped=CroppedLoss(weight=0.0))
    ctx = _ctx(replace(FULL, cropped=False), losses)[0]
    block = ctx.student.backbone.get_submodule("bottleneck")
    with torch.no_grad():  # moved away from its anchor by other terms, as training does
        for p in block.parameters():
            p.add_(0.5)
    train_step(replace(ctx, optimizer=torch.optim.SGD(ctx.student.parameters(), lr=0.0)), _batch(), step=0)
    grads = [p.grad for p in block.parameters()]
    assert all(g is not None for g in grads)
    # d/dW of 1/2 ||W - W_init||^2 = W - W_init = 0.5 everywhere (the preference itself adds nothing here)
    assert all(torch.allclose(g, torch.full_like(g, 0.5), atol=1e-6) for g in grads)
