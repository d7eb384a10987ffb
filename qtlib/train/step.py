"""One training step of the QualiTeacher student, eq. (11): :func:`train_step`.

1. all student passes in ONE forward: the batch at its conditions (for L_rec
   and L_per), the inputs whose condition is below the top level again at the
   top level (y_h; samples already at the top reuse their first output), the
   batch at the drawn low levels (y_l), and the cropped inputs at the top
   level (for L_cropped) -- the first three stacked along the batch, the crops
   (a smaller size) as a second tensor of the same call;
2. rewards (the frozen, differentiable IQA ensemble, 0..10 scale) of y_h and
   y_l in one call, and of crop(y_h) and f(crop(x)) in another;
3. ``w_rec L_rec + w_per L_per + w_pref (L1 + a L2 + b L_reg) + w_crop L_cropped``,
   each term on only from its ``start`` step (counted over all rounds);
4. backward and the AdamW step (the EMA update is the round's).

Table 2's switches (``train.score_condition``, ``preference``, ``cropped``;
``gate.enabled`` is the drop strategy and acts in the gate) and the baselines
``plain_mt`` / ``filter_mt`` are resolved into :class:`Switches` once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from qtlib.config.types import IQAConfig, Losses, TrainConfig
from qtlib.models import Restorer
from qtlib.train.samples import Batch
from qtlib.train.losses import (
    crop_batch,
    cropped_consistency,
    injection_reg,
    preference_terms,
    weighted_l1,
)
from qtlib.train.perceptual import build_perceptual, resolve_perceptual
from qtlib.train.compute import autocast
from qtlib.train.guard import step_if_finite

_log = logging.getLogger(__name__)

RewardFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, H, W) images in [0, 1] -> (B,) differentiable quality on the 0..10 scale."""

TERMS = ("loss", "rec", "per", "pref_first", "pref_second", "pref_reg", "cropped", "reward_high", "reward_low",
         "sup")
"""Names of the logged terms of a step (unweighted batch means; NaN when off)."""


@dataclass(frozen=True)
class Switches:
    """The effective method after resolving ``train.method`` and Table 2's switches.

    Attributes:
        method: qualiteacher, plain_mt or filter_mt.
        score_condition: condition the student on each PL's score (else a fixed top-level condition).
        block_weighting: weight L_rec by the PL's block-score map.
        perceptual: the resolved perceptual loss (``vgg``, ``nlpd``, ``ms_ssim``) or ``none``.
        preference: L_pref (eq. 8) on; cropped: L_cropped (eq. 9) on.
    """

    method: str
    score_condition: bool
    block_weighting: bool
    perceptual: str
    preference: bool
    cropped: bool
    supervised: bool = False
    """The supervised anchor on labeled pairs (``train.losses.sup``), for every method."""
    input_labels: bool = False
    """Each image's degraded input is also a target, at its own score (``train.input_labels``)."""

    @property
    def needs_reward(self) -> bool:
        return self.preference or self.cropped


def resolve_switches(cfg: TrainConfig, conditioned: bool, perceptual: str | None = None) -> Switches:
    """Resolve ``cfg`` into :class:`Switches`.

    ``plain_mt`` and ``filter_mt`` turn off the score condition, block weighting,
    preference and cropped consistency (plain L1 on the PL, plus L_per as
    configured so that the comparison isolates the method). For ``qualiteacher``
    the switches are taken as configured; a term with weight 0 is off.

    Args:
        cfg: the train section.
        conditioned: the student is score-conditioned (``model.conditioned``).
        perceptual: the resolved perceptual kind (default: resolve ``cfg.losses.per.kind`` now).

    Raises:
        ValueError: a combination that cannot run (preference without a score condition, a
            score condition on an unconditioned model, or input labels without either).
    """
    losses = cfg.losses
    per = perceptual if perceptual is not None else resolve_perceptual(losses.per.kind, cfg.patch_size)
    per = per if losses.per.weight > 0 or losses.sup.per_weight > 0 else "none"
    sup = losses.sup.weight > 0
    if cfg.input_labels and (cfg.method != "qualiteacher" or not cfg.score_condition):
        got = f"method {cfg.method}" if cfg.method != "qualiteacher" else "score_condition: false"
        raise ValueError(f"train.input_labels needs train.method: qualiteacher with train.score_condition: true "
                         f"(got {got}): an input label is a target at its own score, which only a "
                         "score-conditioned student can tell apart; set input_labels: false")
    if cfg.relative_margin > 0 and (cfg.condition != "relative" or not sup or cfg.method != "qualiteacher"
                                    or not cfg.score_condition):
        raise ValueError(f"train.relative_margin {cfg.relative_margin} needs train.method: qualiteacher, "
                         "score_condition: true, condition: relative and the supervised anchor "
                         "(train.losses.sup.weight > 0): it reserves the top level for the labeled pairs' "
                         "ground truth; set relative_margin: 0")
    if cfg.method != "qualiteacher":
        return Switches(cfg.method, False, False, per, False, False, sup)
    pref = cfg.preference and losses.pref.weight > 0
    if cfg.score_condition and not conditioned:
        raise ValueError("train.score_condition: the student has no score conditioning "
                         "(model.conditioning.enabled was false when it was built); set score_condition: false")
    if pref and not cfg.score_condition:
        raise ValueError("train.preference needs train.score_condition: y_h and y_l are the student at two "
                         "score conditions")
    return Switches("qualiteacher", cfg.score_condition, losses.rec.block_weighting, per, pref,
                    cfg.cropped and losses.cropped.weight > 0, sup, cfg.input_labels)


def crop_side(patch: int, fraction: float) -> int:
    """Side of the cropped-consistency window: ``round(fraction * patch)``, at least 1."""
    return max(1, round(fraction * patch))


def pass_chunk(batch_size: int, device: torch.device, fast: bool = True) -> int | None:
    """Images per student call inside :class:`StudentPasses`: the batch size on a CPU, no limit elsewhere
    (and none when ``fast`` is False: ``train.fast_passes``)."""
    return batch_size if device.type == "cpu" and fast else None


def build_passes(student: nn.Module, batch_size: int, device: torch.device, fast: bool = True) -> StudentPasses:
    """The :class:`StudentPasses` of a round: chunked and encoder-sharing when ``fast`` (``train.fast_passes``)."""
    return StudentPasses(student, chunk=pass_chunk(batch_size, device, fast), share_encoder=fast)


class StudentPasses(nn.Module):
    """Every student forward of a step in one call, so DDP sees one forward per backward.

    The stacked images may run as several student calls of at most ``chunk``
    images (still one forward of this module): on a CPU a large stack is slower
    than the same images in pieces (caches), on a GPU one big call is faster.
    Chunking changes no arithmetic per image (each sample's output depends only on
    its own input and score), only which batch oneDNN computes it in.

    Args:
        student: the student (any built model: ``student(x, score)``).
        chunk: at most this many images per student call (None: one call).
        share_encoder: run the score-independent encoder once per input (``forward_rows``); False =
            every pass of an input is a full forward (``train.fast_passes: false``).

    Shape:
        - x: (N, 3, P, P), score: (N,) or None; crops: (B, 3, c, c), crop_score: (B,) or None.
        - Output: (student(x, score), student(crops, crop_score) or None).
    """

    def __init__(self, student: nn.Module, chunk: int | None = None, share_encoder: bool = True) -> None:
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk: expected None or >= 1, got {chunk}")
        self.student = student
        self.chunk = chunk
        self.share_encoder = share_encoder

    def _run(self, x: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor:
        if self.chunk is None or x.shape[0] <= self.chunk:
            return self.student(x, score)
        scores = score.split(self.chunk) if score is not None else [None] * math.ceil(x.shape[0] / self.chunk)
        return torch.cat([self.student(xc, sc) for xc, sc in zip(x.split(self.chunk), scores, strict=True)])

    def _run_rows(self, x: torch.Tensor, rows: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        if not self.share_encoder:
            return self._run(x.index_select(0, rows), score)
        return self.student.forward_rows(x, rows, score, self.chunk)

    def forward(
        self, x: torch.Tensor, score: torch.Tensor | None, crops: torch.Tensor | None = None,
        crop_score: torch.Tensor | None = None, rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With ``rows``: the first output is ``student(x[rows], score)`` (the encoder shared where the
        student allows, :meth:`~qtlib.models.Restorer.forward_rows`); without: ``student(x, score)``."""
        main = self._run(x, score) if rows is None else self._run_rows(x, rows, score)
        return main, (self._run(crops, crop_score) if crops is not None else None)


@dataclass
class StepContext:
    """What a training step needs besides the batch (built once per round)."""

    passes: nn.Module
    """:class:`StudentPasses`, possibly wrapped in DDP."""
    student: nn.Module
    optimizer: torch.optim.Optimizer
    switches: Switches
    losses: Losses
    top_score: float
    crop: int
    reward: RewardFn | None
    """Reward of y_h and y_l (patch-sized images)."""
    crop_reward: RewardFn | None
    """Reward of the cropped-consistency pair (crop-sized images)."""
    perceptual: nn.Module | None
    init_params: list[torch.Tensor]
    device: torch.device
    bf16: bool = False


@dataclass(frozen=True)
class StepOutput:
    """The loss of one step and its unweighted terms (floats, NaN = off)."""

    loss: torch.Tensor
    terms: dict[str, float]
    stepped: bool = True
    """False when a non-finite loss or gradient skipped the optimizer step (:mod:`qtlib.train.guard`)."""


def _on(switch: bool, weight: float, start: int, step: int) -> bool:
    return switch and weight > 0 and step >= start


def active_terms(sw: Switches, losses: Losses, step: int) -> dict[str, bool]:
    """Which terms of eq. (11) contribute at global step ``step``."""
    return {
        "rec": _on(True, losses.rec.weight, losses.rec.start, step),
        "per": _on(sw.perceptual != "none", losses.per.weight, losses.per.start, step),
        "sup": _on(sw.supervised, losses.sup.weight, losses.sup.start, step),
        "pref": _on(sw.preference, losses.pref.weight, losses.pref.start, step),
        "cropped": _on(sw.cropped, losses.cropped.weight, losses.cropped.start, step),
    }


def _student_outputs(ctx: StepContext, batch: Batch, on: dict[str, bool]):
    """Run the stacked passes; return y, y_h, y_l, f(crop(x)), y_sup (None where not needed)."""
    x, b = batch.x, batch.x.shape[0]
    top = torch.full((b,), ctx.top_score, device=ctx.device)
    cond = batch.cond if ctx.switches.score_condition else top
    need_top = on["pref"] or on["cropped"]
    redo = torch.nonzero(cond < ctx.top_score).flatten() if need_top else cond.new_zeros(0, dtype=torch.long)
    every = torch.arange(b, device=ctx.device)
    rows, scores = [every, redo], [cond, top[redo]]
    if on["pref"]:
        rows.append(every)
        scores.append(batch.low)
    n_sup = batch.sup_x.shape[0] if on["sup"] and batch.sup_x is not None else 0
    inputs = x
    if n_sup:  # the labeled pairs, at the top level (what inference uses)
        inputs = torch.cat([x, batch.sup_x])
        rows.append(torch.arange(b, b + n_sup, device=ctx.device))
        scores.append(torch.full((n_sup,), ctx.top_score, device=ctx.device))
    crops = crop_batch(x, batch.crop_yx, ctx.crop) if on["cropped"] else None
    with autocast(ctx.device, ctx.bf16):
        # every pass of x is a row of x: the score-independent encoder runs once per input
        out, out_crop = ctx.passes(inputs, torch.cat(scores), crops, top if crops is not None else None,
                                   torch.cat(rows))
    out = out.float()
    y = out[:b]
    y_h = y.index_copy(0, redo, out[b:b + len(redo)]) if need_top else None
    y_l = out[b + len(redo):b + len(redo) + b] if on["pref"] else None
    y_sup = out[out.shape[0] - n_sup:] if n_sup else None
    return y, y_h, y_l, (out_crop.float() if out_crop is not None else None), y_sup


def train_step(ctx: StepContext, batch: Batch, step: int) -> StepOutput:
    """Forward, eq. (11), backward and optimizer step for one batch (the EMA update is the caller's).

    Args:
        ctx: the round's context.
        batch: this rank's batch (moved to ``ctx.device`` here).
        step: the global step (over all rounds), which decides the terms that are on.
    """
    batch = Batch(**{k: (v.to(ctx.device) if v is not None else None) for k, v in vars(batch).items()})
    on = active_terms(ctx.switches, ctx.losses, step)
    lc = ctx.losses
    y, y_h, y_l, y_crop, y_sup = _student_outputs(ctx, batch, on)
    terms = dict.fromkeys(TERMS, math.nan)
    injection_only: torch.Tensor | None = None  # L_pref with train.losses.pref.params: injection
    total = y.sum() * 0.0  # keeps the graph (and DDP's hooks) when no term is on yet
    if on["rec"]:
        rec = weighted_l1(y, batch.target, batch.weight if ctx.switches.block_weighting else None)
        total = total + lc.rec.weight * rec
        terms["rec"] = rec.item()
    if on["per"]:
        per = ctx.perceptual(y.clamp(0, 1), batch.target).mean()
        total = total + lc.per.weight * per
        terms["per"] = per.item()
    if on["pref"]:
        r = ctx.reward(torch.cat([y_h, y_l]).clamp(0, 1)).float()
        r_h, r_l = r.chunk(2)
        if not lc.pref.low_grad:  # y_l a fixed reference: L1 can only be met by raising y_h
            r_l = r_l.detach()
        s_tea = batch.s_best if lc.pref.l2_target == "best" else batch.s_poor
        unit = 0.1 if lc.pref.unit_rewards else 1.0  # [0, 1] rewards: delta is a fraction of the range
        pt = preference_terms(r_h * unit, r_l * unit, s_tea * unit, lc.pref.beta, lc.pref.delta)
        reg = injection_reg(ctx.student.injection_parameters(), ctx.init_params)
        pref = lc.pref.weight * (pt.first + lc.pref.second_weight * pt.second + lc.pref.reg_weight * reg)
        if lc.pref.params == "all":
            total = total + pref
        else:
            injection_only = pref
        terms.update(pref_first=pt.first.item(), pref_second=pt.second.item(), pref_reg=reg.item(),
                     reward_high=r_h.mean().item(), reward_low=r_l.mean().item())
    if on["cropped"]:
        r = ctx.crop_reward(torch.cat([crop_batch(y_h, batch.crop_yx, ctx.crop), y_crop]).clamp(0, 1)).float()
        cc = cropped_consistency(*r.chunk(2))
        total = total + lc.cropped.weight * cc
        terms["cropped"] = cc.item()
    if y_sup is not None:
        total, terms["sup"] = _supervised(ctx, y_sup, batch.sup_y, total)
    ctx.optimizer.zero_grad(set_to_none=True)
    if injection_only is None:
        total.backward()
    else:
        total = _backward_injection_only(ctx, total, injection_only)
    stepped = step_if_finite(ctx.optimizer, total)
    terms["loss"] = total.item()
    return StepOutput(total.detach(), terms, stepped)


def _backward_injection_only(ctx: StepContext, total: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """Backward of ``total + pref`` in which ``pref`` reaches only the score-injection weights.

    ``pref``'s gradient with respect to the injection weights is taken first (keeping the graph),
    then ``total`` is backpropagated as usual and that gradient added to theirs. Under DDP the added
    part is averaged over the ranks here (DDP's own hooks average only what ``backward`` accumulates).
    Returns ``total + pref`` (detached), the loss the step logs and checks.
    """
    params = ctx.student.injection_parameters()
    grads = torch.autograd.grad(pref, params, retain_graph=True, allow_unused=True)
    total.backward()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if world > 1:
            torch.distributed.all_reduce(g)
            g = g / world
        p.grad = g if p.grad is None else p.grad + g
    return (total + pref).detach()


def build_step_context(
    student: Restorer,
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    iqa: IQAConfig,
    device: torch.device,
    *,
    top_score: float,
    bf16: bool = False,
    passes: nn.Module | None = None,
    reward: RewardFn | None = None,
    perceptual: str | None = None,
    init_params: list[torch.Tensor] | None = None,
) -> StepContext:
    """The :class:`StepContext` of a round (or a benchmark): switches, rewards, perceptual loss, W_init.

    Args:
        student: the student (``student(x, score)``; ``student.conditioned`` decides what may be on).
        optimizer: its optimizer.
        train, iqa: the ``train`` and ``iqa`` sections.
        device: where the step runs.
        top_score: the merged top condition level (``model.conditioning.top_score``).
        bf16: autocast the student passes (``compute.bf16``).
        passes: :class:`StudentPasses` of ``student``, possibly wrapped in DDP (default: a new one, chunked
            to ``train.batch_size`` images per call on a CPU, one call elsewhere; :func:`build_passes`).
        reward: one reward function for both reward terms (default: the IQA ensemble, built only when
            a reward term is on: one for patch-sized, one for crop-sized images).
        perceptual: the resolved perceptual kind (default: resolve ``train.losses.per.kind`` now).
        init_params: W_init of L_reg (default: the student's injection weights now).
    """
    sw = resolve_switches(train, student.conditioned, perceptual)
    crop = crop_side(train.patch_size, train.losses.cropped.fraction)
    full_reward = reward if reward is not None else (
        build_reward(iqa, train.patch_size, device) if sw.preference else None)
    crop_reward = reward if reward is not None else (build_reward(iqa, crop, device) if sw.cropped else None)
    # W_init of L_reg: the injection weights when the context is built (empty when unconditioned)
    if init_params is None:
        init_params = [p.detach().clone() for p in student.injection_parameters()]
    if passes is None:
        passes = build_passes(student, train.batch_size, device, train.fast_passes)
    return StepContext(passes, student, optimizer, sw,
                       train.losses, top_score, crop, full_reward, crop_reward,
                       build_perceptual(sw.perceptual, device), init_params, device, bf16)


def _supervised(ctx: StepContext, y: torch.Tensor, gt: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The supervised anchor on labeled pairs: ``w (L1 + per_weight L_per)``; returns (total, unweighted term)."""
    sc = ctx.losses.sup
    term = weighted_l1(y, gt)
    if sc.per_weight > 0 and ctx.perceptual is not None:
        term = term + sc.per_weight * ctx.perceptual(y.clamp(0, 1), gt).mean()
    return total + sc.weight * term, term.item()


def reward_config(iqa: IQAConfig, side: int) -> IQAConfig:
    """The ensemble restricted to the members that accept ``side`` px images (catalog ``min_size``).

    The cropped-consistency term scores crops (``fraction * patch_size``), which
    may be below what a member accepts (NIQE needs 96 px). Both of its scores
    are of crops of the same size, so the term compares them with the members
    that can score that size; the weights are renormalized by the Reward.

    Raises:
        ValueError: no member accepts ``side`` px.
    """
    from qtlib.iqa import get_info

    kept = tuple(m for m in iqa.ensemble if get_info(m.metric).min_size <= side)
    if not kept:
        need = min(get_info(m.metric).min_size for m in iqa.ensemble)
        raise ValueError(f"reward: no member of iqa.ensemble scores {side} px images (the smallest needs {need} "
                         "px); raise train.patch_size or train.losses.cropped.fraction")
    if len(kept) < len(iqa.ensemble):
        left = [m.metric for m in iqa.ensemble if m not in kept]
        _log.warning("reward on %d px images: leaving out %s (minimum size); using %s", side, ", ".join(left),
                     ", ".join(m.metric for m in kept))
    return replace(iqa, ensemble=kept)


def build_reward(iqa: IQAConfig, side: int, device: torch.device) -> RewardFn:
    """The differentiable IQA ensemble (frozen, eval) for ``side`` px images, on the 0..10 scale."""
    from qtlib.iqa import Reward  # the stage needs it only when a reward term is on

    return Reward(reward_config(iqa, side), device=device)
