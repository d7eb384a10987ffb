"""One QualiTeacher round of student training: :func:`train_step` and :func:`train_one_round`.

A round is ``train.epochs`` epochs (default one) over the samples of the
memory bank (:mod:`qtlib.train.data`). Each step:

1. all student passes in ONE forward: the batch at its conditions (for L_rec
   and L_per), the inputs whose condition is below the top level again at the
   top level (y_h; samples already at the top reuse their first output), the
   batch at the drawn low levels (y_l), and the cropped inputs at the top
   level (for L_cropped) -- the first three stacked along the batch, the crops
   (a smaller size) as a second tensor of the same call;
2. rewards (the frozen, differentiable IQA ensemble, 0..10 scale) of y_h and
   y_l in one call, and of crop(y_h) and f(crop(x)) in another;
3. eq. (11): ``w_rec L_rec + w_per L_per + w_pref (L1 + a L2 + b L_reg) + w_crop L_cropped``,
   each term on only from its ``start`` step (counted over all rounds);
4. AdamW step, EMA teacher update (eq. 10).

Table 2's switches (``train.score_condition``, ``preference``, ``cropped``;
``gate.enabled`` is the drop strategy and acts in the gate) and the baselines
``plain_mt`` / ``filter_mt`` are resolved into :class:`Switches` once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qtlib.config.loader import to_dict
from qtlib.config.types import Config, IQAConfig, Losses, ModelConfig, TrainConfig
from qtlib.models import (
    EMA,
    Checkpoint,
    ScoreConditioned,
    build_model,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from qtlib.train import ddp
from qtlib.train.data import (
    BankReader,
    Batch,
    EpochPlan,
    build_samples,
    draw_epoch_plan,
    rank_slots,
    steps_per_epoch,
)
from qtlib.train.losses import (
    crop_batch,
    cropped_consistency,
    injection_reg,
    preference_terms,
    weighted_l1,
)
from qtlib.train.perceptual import build_perceptual, resolve_perceptual
from qtlib.train.runtime import autocast, process_seed, resolve_device, seed_everything
from qtlib.train.runtime import determinism as determinism_switch

_log = logging.getLogger(__name__)

RewardFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, H, W) images in [0, 1] -> (B,) differentiable quality on the 0..10 scale."""

#: Columns of the per-step loss log; term values are unweighted batch means (NaN when the term is off).
LOG_SCHEMA = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("global_step", pa.int64(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("rec", pa.float64()),
        pa.field("per", pa.float64()),
        pa.field("pref_first", pa.float64()),
        pa.field("pref_second", pa.float64()),
        pa.field("pref_reg", pa.float64()),
        pa.field("cropped", pa.float64()),
        pa.field("reward_high", pa.float64()),
        pa.field("reward_low", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("seconds", pa.float64()),
    ],
    metadata={"qtlib.table": "train_log"},
)
_TERMS = ("loss", "rec", "per", "pref_first", "pref_second", "pref_reg", "cropped", "reward_high", "reward_low")


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
        conditioned: the student is a :class:`~qtlib.models.ScoreConditioned` model.
        perceptual: the resolved perceptual kind (default: resolve ``cfg.losses.per.kind`` now).

    Raises:
        ValueError: a combination that cannot run (preference without a score condition, or a
            score condition on an unconditioned model).
    """
    losses = cfg.losses
    per = perceptual if perceptual is not None else resolve_perceptual(losses.per.kind, cfg.patch_size)
    per = per if losses.per.weight > 0 else "none"
    if cfg.method != "qualiteacher":
        return Switches(cfg.method, False, False, per, False, False)
    pref = cfg.preference and losses.pref.weight > 0
    if cfg.score_condition and not conditioned:
        raise ValueError("train.score_condition: the student has no score conditioning "
                         "(model.conditioning.enabled was false when it was built); set score_condition: false")
    if pref and not cfg.score_condition:
        raise ValueError("train.preference needs train.score_condition: y_h and y_l are the student at two "
                         "score conditions")
    return Switches("qualiteacher", cfg.score_condition, losses.rec.block_weighting, per, pref,
                    cfg.cropped and losses.cropped.weight > 0)


def crop_side(patch: int, fraction: float) -> int:
    """Side of the cropped-consistency window: ``round(fraction * patch)``, at least 1."""
    return max(1, round(fraction * patch))


class StudentPasses(nn.Module):
    """Every student forward of a step in one call, so DDP sees one forward per backward.

    Args:
        student: the student (a :class:`~qtlib.models.ScoreConditioned` model or a bare backbone).

    Shape:
        - x: (N, 3, P, P), score: (N,) or None; crops: (B, 3, c, c), crop_score: (B,) or None.
        - Output: (student(x, score), student(crops, crop_score) or None).
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def run(self, x: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.student, ScoreConditioned):
            return self.student(x, score)
        return self.student(x)

    def forward(
        self, x: torch.Tensor, score: torch.Tensor | None, crops: torch.Tensor | None = None,
        crop_score: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.run(x, score), (self.run(crops, crop_score) if crops is not None else None)


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


def _on(switch: bool, weight: float, start: int, step: int) -> bool:
    return switch and weight > 0 and step >= start


def active_terms(sw: Switches, losses: Losses, step: int) -> dict[str, bool]:
    """Which terms of eq. (11) contribute at global step ``step``."""
    return {
        "rec": _on(True, losses.rec.weight, losses.rec.start, step),
        "per": _on(sw.perceptual != "none", losses.per.weight, losses.per.start, step),
        "pref": _on(sw.preference, losses.pref.weight, losses.pref.start, step),
        "cropped": _on(sw.cropped, losses.cropped.weight, losses.cropped.start, step),
    }


def _student_outputs(ctx: StepContext, batch: Batch, on: dict[str, bool]):
    """Run the stacked passes; return y, y_h, y_l, f(crop(x)) (None where not needed)."""
    x, b = batch.x, batch.x.shape[0]
    conditioned = isinstance(ctx.student, ScoreConditioned)
    top = torch.full((b,), ctx.top_score, device=ctx.device)
    cond = batch.cond if ctx.switches.score_condition else top
    need_top = on["pref"] or on["cropped"]
    redo = torch.nonzero(cond < ctx.top_score).flatten() if need_top else cond.new_zeros(0, dtype=torch.long)
    xs, scores = [x, x[redo]], [cond, top[redo]]
    if on["pref"]:
        xs.append(x)
        scores.append(batch.low)
    crops = crop_batch(x, batch.crop_yx, ctx.crop) if on["cropped"] else None
    with autocast(ctx.device, ctx.bf16):
        out, out_crop = ctx.passes(torch.cat(xs), torch.cat(scores) if conditioned else None, crops,
                                   top if conditioned and crops is not None else None)
    out = out.float()
    y = out[:b]
    y_h = y.index_copy(0, redo, out[b:b + len(redo)]) if need_top else None
    y_l = out[b + len(redo):] if on["pref"] else None
    return y, y_h, y_l, (out_crop.float() if out_crop is not None else None)


def train_step(ctx: StepContext, batch: Batch, step: int) -> StepOutput:
    """Forward, eq. (11), backward and optimizer step for one batch (the EMA update is the caller's).

    Args:
        ctx: the round's context.
        batch: this rank's batch (moved to ``ctx.device`` here).
        step: the global step (over all rounds), which decides the terms that are on.
    """
    batch = Batch(**{k: v.to(ctx.device) for k, v in vars(batch).items()})
    on = active_terms(ctx.switches, ctx.losses, step)
    lc = ctx.losses
    y, y_h, y_l, y_crop = _student_outputs(ctx, batch, on)
    terms = dict.fromkeys(_TERMS, math.nan)
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
        pt = preference_terms(r_h, r_l, batch.s_poor, lc.pref.beta, lc.pref.delta)
        reg = injection_reg(ctx.student.injection_parameters(), ctx.init_params)
        total = total + lc.pref.weight * (pt.first + lc.pref.second_weight * pt.second + lc.pref.reg_weight * reg)
        terms.update(pref_first=pt.first.item(), pref_second=pt.second.item(), pref_reg=reg.item(),
                     reward_high=r_h.mean().item(), reward_low=r_l.mean().item())
    if on["cropped"]:
        r = ctx.crop_reward(torch.cat([crop_batch(y_h, batch.crop_yx, ctx.crop), y_crop]).clamp(0, 1)).float()
        cc = cropped_consistency(*r.chunk(2))
        total = total + lc.cropped.weight * cc
        terms["cropped"] = cc.item()
    ctx.optimizer.zero_grad(set_to_none=True)
    total.backward()
    ctx.optimizer.step()
    terms["loss"] = total.item()
    return StepOutput(total.detach(), terms)


# --------------------------------------------------------------------------- the round


@dataclass(frozen=True)
class RoundInputs:
    """The explicit inputs and outputs of one round (paths; picklable for spawned ranks)."""

    cfg: Config
    round: int
    teacher: Path
    student: Path
    bank: Path
    images: Path
    results_dir: Path
    out_student: Path
    out_teacher: Path
    log: Path
    resume: bool | Path = True
    device: str = "auto"
    stop_after: int | None = None


@dataclass(frozen=True)
class TrainResult:
    """What a round wrote and did."""

    student: Path | None
    teacher: Path | None
    log: Path | None
    partial: Path | None
    steps: int
    """Steps of this round completed so far (all of them unless stopped early)."""
    total_steps: int
    global_step: int
    n_samples: int
    resumed_from: int
    switches: Switches
    determinism: dict[str, bool]
    seconds: float


def partial_path(out_student: Path) -> Path:
    """The step checkpoint of an unfinished round: ``<out-student>.partial``."""
    return out_student.with_name(out_student.name + ".partial")


def file_hash(path: Path) -> str:
    """First 16 hex digits of a file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def fingerprint(inp: RoundInputs, world: int) -> str:
    """What a step checkpoint must match to be resumed: config slices, input hashes, global batch."""
    cfg = inp.cfg
    payload = {
        "round": inp.round, "seed": cfg.seed, "train": to_dict(replace(cfg.train, checkpoint_every=1, gpus=1)),
        "iqa": to_dict(cfg.iqa), "global_batch": cfg.train.batch_size * world,
        "inputs": {k: file_hash(getattr(inp, k)) for k in ("teacher", "student", "bank")},
        "images": str(Path(inp.images).resolve()),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _load_student(path: Path, device: torch.device) -> tuple[nn.Module, Checkpoint]:
    ckpt = load_checkpoint(path, kinds=("pretrain", "student", "teacher"))
    model = build_model(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    return model.to(device), ckpt


def _teacher_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path, kinds=("pretrain", "student", "teacher"))
    return ckpt.ema_state["module"] if ckpt.ema_state else ckpt.model_state


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _set_hparams(opt: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Loaded optimizer state keeps its moments; lr, betas and weight decay always come from the config."""
    for group in opt.param_groups:
        group.update(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@dataclass
class _State:
    """Mutable progress of a round (what a step checkpoint saves)."""

    step: int
    global_step: int
    rows: list[dict]


def _save_partial(path: Path, mc: ModelConfig, student: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                  st: _State, inp: RoundInputs, extra: dict) -> None:
    save_checkpoint(path, Checkpoint(
        "train-state", mc, student.state_dict(), ema.state_dict(), opt.state_dict(),
        step=st.step, round=inp.round, rng=capture_rng_state(),
        extra={**extra, "global_step": st.global_step, "log": st.rows},
    ))


def _write_log(path: Path, rows: list[dict]) -> None:
    from qtlib.ledger import write_table

    frame = pd.DataFrame(rows, columns=LOG_SCHEMA.names)
    write_table(frame, path, LOG_SCHEMA)


def _finish(inp: RoundInputs, mc: ModelConfig, student: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
            st: _State, extra: dict) -> None:
    _write_log(inp.log, st.rows)
    meta = {**extra, "global_step": st.global_step}
    save_checkpoint(inp.out_teacher, Checkpoint("teacher", mc, ema.module.state_dict(),
                                                step=st.step, round=inp.round, extra=meta))
    save_checkpoint(inp.out_student, Checkpoint("student", mc, student.state_dict(), ema.state_dict(),
                                                opt.state_dict(), step=st.step, round=inp.round,
                                                rng=capture_rng_state(), extra=meta))


def _try_resume(inp: RoundInputs, fp: str) -> Checkpoint | None:
    path = partial_path(inp.out_student) if inp.resume is True else (Path(inp.resume) if inp.resume else None)
    if path is None or not path.is_file():
        if inp.resume not in (True, False, None):
            raise FileNotFoundError(f"resume: {path}: no step checkpoint there")
        return None
    ckpt = load_checkpoint(path, kinds=("train-state",))
    if ckpt.extra.get("fingerprint") != fp or ckpt.round != inp.round:
        if inp.resume is True:
            _log.warning("%s: inputs or config changed since this step checkpoint; starting the round afresh", path)
            return None
        raise ValueError(f"resume: {path} was written for other inputs or another config")
    return ckpt


@dataclass
class _Round:
    """What one rank holds during a round (built by :func:`_prepare`)."""

    inp: RoundInputs
    world: ddp.World
    mc: ModelConfig
    student: nn.Module
    opt: torch.optim.Optimizer
    ema: EMA | None
    ctx: StepContext
    samples_n: int
    reader: BankReader
    crop: int
    global_batch: int
    per_epoch: int
    total: int
    extra: dict


def _start_state(inp: RoundInputs, r_student: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                 start_ckpt: Checkpoint, fp: str, world: ddp.World) -> _State:
    """The state to start from: the step checkpoint when one applies, else step 0 of the round."""
    st = _State(0, int(start_ckpt.extra.get("global_step", 0)) if start_ckpt.kind == "student" else 0, [])
    resumed = _try_resume(inp, fp)
    if resumed is None:
        return st
    r_student.load_state_dict(resumed.model_state)
    opt.load_state_dict(resumed.optimizer_state)
    if ema is not None:
        ema.load_state_dict(resumed.ema_state)
    if resumed.rng and world.is_main:
        restore_rng_state(resumed.rng)
    _log.info("round %d: resuming at step %d", inp.round, resumed.step)
    return _State(resumed.step, int(resumed.extra["global_step"]), list(resumed.extra.get("log", [])))


def _prepare(world: ddp.World, inp: RoundInputs, reward: RewardFn | None, determinism: dict) -> tuple[_Round, _State]:
    cfg, tc, dev = inp.cfg, inp.cfg.train, world.device
    seed_everything(process_seed(cfg.seed, inp.round, world.rank))
    student, start_ckpt = _load_student(inp.student, dev)
    mc = start_ckpt.model_config
    conditioned = isinstance(student, ScoreConditioned)
    top = float(mc.conditioning.top_score)
    sw = resolve_switches(tc, conditioned)
    samples = build_samples(pd.read_parquet(inp.bank), tc.method, top, sw.score_condition)
    reader = BankReader(samples, inp.images, inp.results_dir, tc.patch_size)
    crop = crop_side(tc.patch_size, tc.losses.cropped.fraction)
    global_batch = tc.batch_size * world.size
    per_epoch = steps_per_epoch(len(samples), global_batch)
    fp = fingerprint(inp, world.size)
    opt = _optimizer(student, tc)
    if start_ckpt.kind == "student" and start_ckpt.optimizer_state:
        opt.load_state_dict(start_ckpt.optimizer_state)  # training continues across rounds
    _set_hparams(opt, tc)
    # W_init of L_reg: the injection weights at the start of the round (the input student's, also on resume)
    init_params = [p.detach().clone() for p in student.injection_parameters()] if conditioned else []
    ema = _teacher_ema(student, inp.teacher, tc.ema_decay) if world.is_main else None
    st = _start_state(inp, student, opt, ema, start_ckpt, fp, world)
    passes: nn.Module = StudentPasses(student)
    if world.distributed:
        passes = DistributedDataParallel(passes, device_ids=[dev.index] if dev.type == "cuda" else None)
    full_reward = reward if reward is not None else (
        build_reward(cfg.iqa, tc.patch_size, dev) if sw.preference else None)
    crop_reward = reward if reward is not None else (build_reward(cfg.iqa, crop, dev) if sw.cropped else None)
    ctx = StepContext(passes, student, opt, sw, tc.losses, top, crop, full_reward, crop_reward,
                      build_perceptual(sw.perceptual, dev), init_params, dev, tc.bf16)
    extra = {"fingerprint": fp, "switches": asdict(sw), "determinism": determinism, "n_samples": len(samples),
             "world": world.size, "global_batch": global_batch}
    r = _Round(inp, world, mc, student, opt, ema, ctx, len(samples), reader, crop, global_batch, per_epoch,
               per_epoch * tc.epochs, extra)
    return r, st


def _teacher_ema(student: nn.Module, teacher: Path, decay: float) -> EMA:
    """The EMA teacher: the student's architecture with the teacher checkpoint's weights."""
    ema = EMA(student, decay)
    try:
        ema.module.load_state_dict(_teacher_state(teacher))
    except RuntimeError as exc:
        raise ValueError(f"teacher {teacher}: its weights do not fit the student's model: "
                         f"{str(exc).splitlines()[0]}") from exc
    return ema


def _one_step(r: _Round, st: _State, plan: EpochPlan, epoch: int, in_epoch: int) -> None:
    """Read this rank's batch, train, update the EMA teacher, log the rank-averaged terms."""
    tc, t = r.inp.cfg.train, time.perf_counter()
    batch = r.reader.read(plan, rank_slots(in_epoch, r.world.rank, r.world.size, tc.batch_size))
    out = train_step(r.ctx, batch, st.global_step)
    if r.ema is not None:
        r.ema.update(r.student)
    values = torch.tensor([out.terms[k] for k in _TERMS], dtype=torch.float64, device=r.world.device)
    values = ddp.all_reduce_mean(values, r.world)
    st.rows.append({"round": r.inp.round, "epoch": epoch, "step": st.step, "global_step": st.global_step,
                    **dict(zip(_TERMS, values.tolist(), strict=True)), "lr": r.opt.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - t})
    st.step += 1
    st.global_step += 1


def run_round(world: ddp.World, inp: RoundInputs, reward: RewardFn | None = None) -> TrainResult:
    """The body of a round on one rank (see :func:`train_one_round`), under the determinism switch."""
    with determinism_switch(inp.cfg.train.deterministic) as state:
        return _run_round(world, inp, reward, state)


def _run_round(world: ddp.World, inp: RoundInputs, reward: RewardFn | None, determinism: dict) -> TrainResult:
    t0 = time.perf_counter()
    r, st = _prepare(world, inp, reward, determinism)
    tc, resumed_from, partial = inp.cfg.train, st.step, partial_path(inp.out_student)
    if world.is_main:
        _log.info("round %d: %d samples, %d steps from step %d, switches %s", inp.round, r.samples_n, r.total,
                  st.step, r.extra["switches"])
    r.student.train()
    plan: EpochPlan | None = None
    stop = r.total if inp.stop_after is None else min(r.total, st.step + inp.stop_after)
    while st.step < stop:
        epoch, in_epoch = divmod(st.step, r.per_epoch)
        if plan is None or plan.epoch != epoch:
            plan = draw_epoch_plan(r.samples_n, r.global_batch, r.reader.image_size, tc.patch_size, r.crop,
                                   tc.losses.pref.low_levels, inp.cfg.seed, inp.round, epoch)
        _one_step(r, st, plan, epoch, in_epoch)
        if world.is_main and st.step < r.total and st.step % tc.checkpoint_every == 0:
            _save_partial(partial, r.mc, r.student, r.ema, r.opt, st, inp, r.extra)
    done = st.step == r.total
    if world.is_main and done:
        _finish(inp, r.mc, r.student, r.ema, r.opt, st, r.extra)
        partial.unlink(missing_ok=True)
    elif world.is_main:
        _save_partial(partial, r.mc, r.student, r.ema, r.opt, st, inp, r.extra)
    ddp.barrier(world)
    return TrainResult(inp.out_student if done else None, inp.out_teacher if done else None,
                       inp.log if done else None, None if done else partial, st.step, r.total, st.global_step,
                       r.samples_n, resumed_from, r.ctx.switches, determinism, time.perf_counter() - t0)


def _run_rank(world: ddp.World, inp: RoundInputs) -> None:
    run_round(world, inp)


def train_one_round(
    cfg: Config,
    round_: int,
    teacher: str | Path,
    student: str | Path,
    bank: str | Path,
    images: str | Path,
    results_dir: str | Path,
    out_student: str | Path,
    out_teacher: str | Path,
    log: str | Path,
    *,
    resume: bool | str | Path = True,
    device: str | None = None,
    reward: RewardFn | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the student for one round (``cfg.train.epochs`` epochs over the bank), EMA teacher every step.

    Args:
        cfg: the whole config (train, iqa, seed, device are read).
        round_: the round r.
        teacher: teacher checkpoint of round r-1 (or the pretrained model); its EMA weights when it has them.
        student: student checkpoint of round r-1 (or the pretrained model); a ``student`` checkpoint also
            carries the AdamW moments and the global step (start steps count over all rounds).
        bank: this round's ``bank.parquet``; images: the unlabeled ``images.zarr``;
        results_dir: the folder the bank's label-store paths are relative to.
        out_student, out_teacher: the checkpoints to write; log: the per-step loss log (Parquet).
        resume: True = continue from ``<out_student>.partial`` if it exists and matches the inputs and
            config (else start afresh); False = always start afresh; a path = that step checkpoint.
        device: cpu, cuda or auto (default: ``cfg.device``).
        reward: the reward function (default: ``qtlib.iqa.Reward(cfg.iqa)`` when a reward term is on);
            with ``train.gpus > 1`` it must be picklable.
        stop_after: stop after this many steps of this call, leaving the step checkpoint (tests, time limits).

    Returns:
        :class:`TrainResult`; ``student``/``teacher``/``log`` are None when stopped before the end.
    """
    inp = RoundInputs(cfg, round_, Path(teacher), Path(student), Path(bank), Path(images), Path(results_dir),
                      Path(out_student), Path(out_teacher), Path(log), resume if isinstance(resume, bool)
                      else Path(resume), device or cfg.device, stop_after)
    for name in ("teacher", "student", "bank"):
        if not getattr(inp, name).is_file():
            raise FileNotFoundError(f"{name}: {getattr(inp, name)}: no such file")
    device = resolve_device(inp.device)
    if cfg.train.gpus <= 1:
        return run_round(ddp.World(0, 1, device), inp, reward)
    if device.type == "cuda" and torch.cuda.device_count() < cfg.train.gpus:
        raise ValueError(f"train.gpus: {cfg.train.gpus} processes need as many visible GPUs, "
                         f"{torch.cuda.device_count()} are visible")
    if reward is not None:
        ddp.launch(_run_rank_with_reward, cfg.train.gpus, inp.device, inp, reward)
    else:
        ddp.launch(_run_rank, cfg.train.gpus, inp.device, inp)
    return _result_from_files(inp)


def _run_rank_with_reward(world: ddp.World, inp: RoundInputs, reward: RewardFn) -> None:
    run_round(world, inp, reward)


def _result_from_files(inp: RoundInputs) -> TrainResult:
    """The parent's view of a spawned round: read back what rank 0 wrote."""
    partial = partial_path(inp.out_student)
    done = inp.out_student.is_file() and not partial.is_file()
    ckpt = load_checkpoint(inp.out_student if done else partial)
    extra = ckpt.extra
    total = steps_per_epoch(int(extra["n_samples"]), int(extra["global_batch"])) * inp.cfg.train.epochs
    return TrainResult(inp.out_student if done else None, inp.out_teacher if done else None,
                       inp.log if done else None, None if done else partial, ckpt.step, total,
                       int(extra["global_step"]), int(extra["n_samples"]), -1, Switches(**extra["switches"]),
                       extra["determinism"], math.nan)
