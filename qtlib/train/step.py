"""One training step of the QualiTeacher student, eq. (11): :func:`train_step`.

1. all student passes in ONE forward (:class:`StudentPasses`): the batch's patches at
   their conditions (for L_rec and L_per); each input's reward window (``train.reward_window``)
   at the top level (y_h) and at the drawn low level (y_l); the crops of the windows at the
   top level (for L_cropped); the labeled pairs at the top level (the supervised anchor).
   Passes of one image size are stacked, and the passes of one input share its encoder;
2. rewards (the frozen, differentiable IQA ensemble, 0..10 scale) of y_h and y_l in one
   call, of the reference pseudo-label's window of L2 in another (no gradient: the same
   reward on the same window, so L2 compares like with like), and of crop(y_h) and
   f(crop(x)) in a third;
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

from qtlib.config.types import IQAConfig, Losses, TrainConfig, start_step
from qtlib.models import Restorer
from qtlib.train.samples import Batch, reward_side
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
         "sup", "reward_ref")
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


def crop_side(window: int, fraction: float) -> int:
    """Side of the cropped-consistency crop: ``round(fraction * window)``, at least 1."""
    return max(1, round(fraction * window))





def pass_chunk(batch_size: int, device: torch.device, fast: bool = True) -> int | None:
    """Images per student call inside :class:`StudentPasses`: the batch size on a CPU, no limit elsewhere
    (and none when ``fast`` is False: ``train.fast_passes``)."""
    return batch_size if device.type == "cpu" and fast else None


def build_passes(student: nn.Module, batch_size: int, device: torch.device, fast: bool = True) -> StudentPasses:
    """The :class:`StudentPasses` of a round: chunked and encoder-sharing when ``fast`` (``train.fast_passes``)."""
    return StudentPasses(student, chunk=pass_chunk(batch_size, device, fast), share_encoder=fast)


Group = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One stack of student passes: (distinct inputs (N, 3, H, W), rows (M,) into them, scores (M,))."""


class StudentPasses(nn.Module):
    """Every student forward of a step in one call, so DDP sees one forward per backward.

    The passes come as groups of one image size; a group's output is ``student(x[rows], score)``,
    with the score-independent encoder run once per input where the student allows
    (:meth:`~qtlib.models.Restorer.forward_rows`). A group may run as several student calls of at
    most ``chunk`` rows (still one forward of this module): on a CPU a large stack is slower than
    the same images in pieces (caches), on a GPU one big call is faster. Chunking changes no
    arithmetic per image (each sample's output depends only on its own input and score).

    Args:
        student: the student (any built model: ``student(x, score)``).
        chunk: at most this many rows per student call (None: one call).
        share_encoder: run the score-independent encoder once per input (``forward_rows``); False =
            every pass of an input is a full forward (``train.fast_passes: false``).

    Shape:
        - groups: a sequence of :data:`Group`.
        - Output: one (M, 3, H, W) tensor per group.
    """

    def __init__(self, student: nn.Module, chunk: int | None = None, share_encoder: bool = True) -> None:
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk: expected None or >= 1, got {chunk}")
        self.student = student
        self.chunk = chunk
        self.share_encoder = share_encoder

    def _run(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        if self.chunk is None or x.shape[0] <= self.chunk:
            return self.student(x, score)
        return torch.cat([self.student(xc, sc) for xc, sc in zip(x.split(self.chunk), score.split(self.chunk),
                                                                  strict=True)])

    def _run_rows(self, x: torch.Tensor, rows: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        if not self.share_encoder:
            return self._run(x.index_select(0, rows), score)
        return self.student.forward_rows(x, rows, score, self.chunk)

    def forward(self, groups: list[Group]) -> list[torch.Tensor]:
        return [self._run_rows(x, rows, score) for x, rows, score in groups]


def plan_groups(requests: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[list[Group], dict[str, tuple[int, int, int]]]:
    """Stack the passes of a step into :data:`Group` s of one image size.

    Args:
        requests: ``(name, inputs, scores)`` per pass; passes that name the same ``inputs`` tensor
            (the same object) share its rows, hence its encoder.

    Returns:
        The groups, and per name ``(group, start, length)``: where its output lies.
    """
    by_size: dict[tuple[int, int], dict] = {}
    where: dict[str, tuple[int, int, int]] = {}
    for name, x, score in requests:
        g = by_size.setdefault(tuple(x.shape[-2:]), {"inputs": [], "offset": {}, "rows": [], "scores": [], "n": 0})
        if id(x) not in g["offset"]:
            g["offset"][id(x)] = sum(t.shape[0] for t in g["inputs"])
            g["inputs"].append(x)
        g["rows"].append(g["offset"][id(x)] + torch.arange(x.shape[0], device=x.device))
        g["scores"].append(score)
        where[name] = (list(by_size).index(tuple(x.shape[-2:])), g["n"], x.shape[0])
        g["n"] += x.shape[0]
    groups = [(torch.cat(g["inputs"]), torch.cat(g["rows"]), torch.cat(g["scores"])) for g in by_size.values()]
    return groups, where


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
    """Reward of y_h, y_l and the reference label (window-sized images)."""
    crop_reward: RewardFn | None
    """Reward of the cropped-consistency pair (crop-sized images)."""
    perceptual: nn.Module | None
    init_params: list[torch.Tensor]
    """W_init of L_reg, one tensor per parameter of :meth:`~qtlib.models.Restorer.reg_parameters`."""
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


@dataclass(frozen=True)
class _Outputs:
    """The student's outputs of a step (None where not needed)."""

    y: torch.Tensor
    y_h: torch.Tensor | None
    y_l: torch.Tensor | None
    y_crop: torch.Tensor | None
    y_sup: torch.Tensor | None


def _student_outputs(ctx: StepContext, batch: Batch, on: dict[str, bool]) -> _Outputs:
    """Run every pass of the step in one call of ``ctx.passes`` (see the module docstring)."""
    x, b = batch.x, batch.x.shape[0]
    top = torch.full((b,), ctx.top_score, device=ctx.device)
    requests = [("y", x, batch.cond if ctx.switches.score_condition else top)]
    if on["pref"] or on["cropped"]:
        if batch.window is None:
            raise ValueError("batch: the reward terms are on but the batch has no reward window")
        requests.append(("y_h", batch.window, top))
    if on["pref"]:
        requests.append(("y_l", batch.window, batch.low))
    if on["cropped"]:
        requests.append(("crop", crop_batch(batch.window, batch.crop_yx, ctx.crop), top))
    if on["sup"] and batch.sup_x is not None:  # the labeled pairs, at the top level (what inference uses)
        requests.append(("sup", batch.sup_x, torch.full((batch.sup_x.shape[0],), ctx.top_score, device=ctx.device)))
    groups, where = plan_groups(requests)
    with autocast(ctx.device, ctx.bf16):
        outs = ctx.passes(groups)

    def get(name: str) -> torch.Tensor | None:
        if name not in where:
            return None
        g, start, n = where[name]
        return outs[g][start:start + n].float()

    return _Outputs(get("y"), get("y_h"), get("y_l"), get("crop"), get("sup"))


def train_step(ctx: StepContext, batch: Batch, step: int) -> StepOutput:
    """Forward, eq. (11), backward and optimizer step for one batch (the EMA update is the caller's).

    Args:
        ctx: the round's context.
        batch: this rank's batch (moved to ``ctx.device`` here).
        step: the global step (over all rounds), which decides the terms that are on.
    """
    batch = Batch(**{k: (v.to(ctx.device) if v is not None else None) for k, v in vars(batch).items()})
    # (a start below 1, a share of the budget, was resolved to a step by the caller: resolve_starts)
    on = active_terms(ctx.switches, ctx.losses, step)
    lc = ctx.losses
    o = _student_outputs(ctx, batch, on)
    y, y_h, y_l = o.y, o.y_h, o.y_l
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
        if batch.ref is None:
            raise ValueError("batch: the preference is on but the batch has no reference label window (ref)")
        with torch.no_grad():  # S_tea of L2: the reference label's window, scored exactly as y_h is
            s_tea = ctx.reward(batch.ref).float()
        unit = 0.1 if lc.pref.unit_rewards else 1.0  # [0, 1] rewards: delta is a fraction of the range
        pt = preference_terms(r_h * unit, r_l * unit, s_tea * unit, lc.pref.beta, lc.pref.delta)
        reg = injection_reg(ctx.student.reg_parameters(lc.pref.reg_params), ctx.init_params)
        pref = lc.pref.weight * (pt.first + lc.pref.second_weight * pt.second)
        # L_reg acts on the weights it anchors whatever pref.params says: with params "injection" only the
        # preference proper (L1, L2) is confined to the score embedding
        total = total + lc.pref.weight * lc.pref.reg_weight * reg
        if lc.pref.params == "all":
            total = total + pref
        else:
            injection_only = pref
        terms.update(pref_first=pt.first.item(), pref_second=pt.second.item(), pref_reg=reg.item(),
                     reward_high=r_h.mean().item(), reward_low=r_l.mean().item(), reward_ref=s_tea.mean().item())
    if on["cropped"]:
        r = ctx.crop_reward(torch.cat([crop_batch(y_h, batch.crop_yx, ctx.crop), o.y_crop]).clamp(0, 1)).float()
        cc = cropped_consistency(*r.chunk(2))
        total = total + lc.cropped.weight * cc
        terms["cropped"] = cc.item()
    if o.y_sup is not None:
        total, terms["sup"] = _supervised(ctx, o.y_sup, batch.sup_y, total)
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
    window: int | None = None,
    budget: int | None = None,
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
        window: the reward window side (:func:`reward_side`; default ``train.reward_window`` or the patch).
        budget: the run's steps (rounds x steps per round), for a ``start`` given as a share (None: a share
            is an error).
        bf16: autocast the student passes (``compute.bf16``).
        passes: :class:`StudentPasses` of ``student``, possibly wrapped in DDP (default: a new one, chunked
            to ``train.batch_size`` images per call on a CPU, one call elsewhere; :func:`build_passes`).
        reward: one reward function for both reward terms (default: ``train.reward_ensemble``, or the IQA
            ensemble, built only when a reward term is on: one for window-sized, one for crop-sized images).
        perceptual: the resolved perceptual kind (default: resolve ``train.losses.per.kind`` now).
        init_params: W_init of L_reg (default: the student's ``train.losses.pref.reg_params`` weights now).
    """
    sw = resolve_switches(train, student.conditioned, perceptual)
    iqa = reward_iqa(train, iqa)
    window = window if window is not None else reward_side(train.reward_window, train.patch_size)
    crop = crop_side(window, train.losses.cropped.fraction)
    full_reward = reward if reward is not None else (build_reward(iqa, window, device) if sw.preference else None)
    crop_reward = reward if reward is not None else (build_reward(iqa, crop, device) if sw.cropped else None)
    # W_init of L_reg: the anchored weights when the context is built (empty when unconditioned)
    if init_params is None:
        init_params = [p.detach().clone() for p in student.reg_parameters(train.losses.pref.reg_params)]
    if passes is None:
        passes = build_passes(student, train.batch_size, device, train.fast_passes)
    return StepContext(passes, student, optimizer, sw,
                       resolve_starts(train.losses, budget), top_score, crop, full_reward, crop_reward,
                       build_perceptual(sw.perceptual, device), init_params, device, bf16)


def resolve_starts(losses: Losses, budget: int | None) -> Losses:
    """``losses`` with every term's ``start`` as a global step (a start below 1 is a share of ``budget``)."""
    return replace(losses, **{name: replace(getattr(losses, name), start=start_step(getattr(losses, name).start,
                                                                                    budget))
                              for name in ("rec", "per", "pref", "cropped", "sup")})


def _supervised(ctx: StepContext, y: torch.Tensor, gt: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The supervised anchor on labeled pairs: ``w (L1 + per_weight L_per)``; returns (total, unweighted term)."""
    sc = ctx.losses.sup
    term = weighted_l1(y, gt)
    if sc.per_weight > 0 and ctx.perceptual is not None:
        term = term + sc.per_weight * ctx.perceptual(y.clamp(0, 1), gt).mean()
    return total + sc.weight * term, term.item()


def reward_iqa(train: TrainConfig, iqa: IQAConfig) -> IQAConfig:
    """The ``iqa`` section the training reward is built from: ``train.reward_ensemble`` when it names members,
    else ``iqa.ensemble`` (the rest of ``iqa``, the learned member's file included, is shared)."""
    return replace(iqa, ensemble=train.reward_ensemble) if train.reward_ensemble else iqa


def reward_config(iqa: IQAConfig, side: int) -> IQAConfig:
    """The ensemble restricted to the members well defined on ``side`` px images (catalog ``reward_size``).

    A reward scores windows (``train.reward_window``) and crops (``fraction * window``), which may
    be below what a member scores meaningfully: NIQE accepts 96 px, but on one 96 px block the
    covariance of its block features is 0 and the score is on another scale. Every score a term
    compares is of an image of the same size, so the term uses the members well defined at that
    size; the weights are renormalized by the Reward.

    Raises:
        ValueError: no member is well defined at ``side`` px.
    """
    from qtlib.iqa import get_info

    kept = tuple(m for m in iqa.ensemble if get_info(m.metric).reward_size <= side)
    if not kept:
        need = min(get_info(m.metric).reward_size for m in iqa.ensemble)
        raise ValueError(f"reward: no member of iqa.ensemble scores {side} px images (the smallest needs {need} "
                         "px); raise train.reward_window or train.losses.cropped.fraction")
    if len(kept) < len(iqa.ensemble):
        left = [m.metric for m in iqa.ensemble if m not in kept]
        _log.warning("reward on %d px images: leaving out %s (not well defined below its reward size); using %s",
                     side, ", ".join(left), ", ".join(m.metric for m in kept))
    return replace(iqa, ensemble=kept)


def build_reward(iqa: IQAConfig, side: int, device: torch.device) -> RewardFn:
    """The differentiable IQA ensemble (frozen, eval) for ``side`` px images, on the 0..10 scale."""
    from qtlib.iqa import Reward  # the stage needs it only when a reward term is on

    return Reward(reward_config(iqa, side), device=device)
