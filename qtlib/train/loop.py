"""One QualiTeacher round of student training: :func:`train_one_round`.

A round is ``train.steps`` steps when that iteration budget is set, else
``train.epochs`` epochs (default one) over the samples of the memory bank (:mod:`qtlib.train.samples`); each step is :func:`qtlib.train.step.train_step`
followed by the EMA teacher update (eq. 10, rank 0). Step checkpoints
(``<out-student>.partial``, every ``train.checkpoint_every`` steps) hold the
student, AdamW, the EMA teacher, RNG states and the typed
:class:`~qtlib.train.state.TrainState` (step = the sampler position: the epoch
plan is redrawn from the seed; global step; the log so far); a matching one is
resumed automatically (:mod:`qtlib.train.state`). ``train.gpus > 1`` runs the same
function on spawned DDP ranks (:mod:`qtlib.train.ddp`). With ``train.input_labels`` the
samples also hold each image's degraded input, scored when the round starts
(:mod:`qtlib.train.inputs`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from qtlib.config.loader import to_dict
from qtlib.config.types import ComputeConfig, IQAConfig, ModelConfig, TrainConfig
from qtlib.layout import input_labels_beside, portable, step_checkpoint
from qtlib.ledger import write_table
from qtlib.models import (
    EMA,
    Checkpoint,
    Restorer,
    build_model,
    capture_rng_state,
    load_checkpoint,
    save_checkpoint,
)
from qtlib.runtime import file_hash, resolve_device
from qtlib.train import ddp
from qtlib.train.compute import determinism as determinism_switch
from qtlib.train.compute import process_seed, seed_everything
from qtlib.train.guard import NonFiniteGuard
from qtlib.train.inputs import describe, score_sample_inputs, with_input_labels, write_input_labels
from qtlib.train.samples import (
    BankReader,
    EpochPlan,
    PairedReader,
    TrainSamples,
    best_pl_level,
    build_samples,
    draw_epoch_plan,
    rank_slots,
    reward_side,
    seed_for,
    steps_per_epoch,
)
from qtlib.train.schedule import ema_decay, scheduled_lr, set_lr
from qtlib.train.views import apply_view, draw_view
from qtlib.train.state import (
    Resume,
    TrainState,
    find_resume,
    fingerprint,
    resume_into,
    save_step,
)
from qtlib.train.step import (
    TERMS,
    RewardFn,
    StepContext,
    Switches,
    build_step_context,
    build_passes,
    resolve_switches,
    train_step,
)

_log = logging.getLogger(__name__)

#: Columns of the per-step loss log; term values are unweighted batch means averaged over ranks (NaN = off).
#: No wall time: the log is a pure function of seed, config and inputs, so reruns and resumes give equal bytes.
LOG_SCHEMA = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("global_step", pa.int64(), nullable=False),
        *[pa.field(term, pa.float64()) for term in TERMS],
        pa.field("lr", pa.float64()),
    ],
    metadata={"qtlib.table": "train_log"},
)


# --------------------------------------------------------------------------- the round


@dataclass(frozen=True)
class RoundPaths:
    """The files a round reads and writes.

    Attributes:
        teacher: teacher checkpoint of round r-1 (or the pretrained model); its EMA weights when it has them.
        student: student checkpoint of round r-1 (or the pretrained model); a ``student`` checkpoint also
            carries the AdamW moments and the global step (start steps count over all rounds).
        bank: this round's ``bank.parquet``; images: the unlabeled ``images.zarr``.
        results_dir: the folder the bank's label-store paths are relative to.
        out_student, out_teacher: the checkpoints to write; losses: the per-step loss log (Parquet).
        paired: the prepared paired folder (``degraded.zarr`` + ``clean.zarr``), read only when the
            supervised anchor (``train.losses.sup``) is on.
        initial: the initial (pretrained) model, read only when ``train.losses.pref.reg_anchor`` is
            ``initial`` (its injection weights are W_init of L_reg).
    """

    teacher: Path
    student: Path
    bank: Path
    images: Path
    results_dir: Path
    out_student: Path
    out_teacher: Path
    losses: Path
    paired: Path | None = None
    initial: Path | None = None

    @classmethod
    def of(cls, **paths: str | Path | None) -> RoundPaths:
        return cls(**{k: Path(v) if v is not None else None for k, v in paths.items()})


@dataclass(frozen=True)
class RoundSpec:
    """A round's paths, config slices and run options (picklable, for spawned DDP ranks)."""

    paths: RoundPaths
    round: int
    train: TrainConfig
    iqa: IQAConfig
    compute: ComputeConfig
    seed: int
    resume: Resume = True
    device: str = "auto"
    stop_after: int | None = None
    rounds: int = 1
    """The run's number of rounds: a ``start`` below 1 is a share of rounds x this round's steps."""


@dataclass(frozen=True)
class TrainResult:
    """What a round wrote and did."""

    student: Path | None
    teacher: Path | None
    losses: Path | None
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


def round_fingerprint(spec: RoundSpec, world: int) -> str:
    """What a step checkpoint must match to be resumed: config slices, input hashes, global batch.

    The learned member's file counts by its content (a refit at the same path is another reward), not by
    its path (a moved results folder still resumes).
    """
    p = spec.paths
    iqa = to_dict(spec.iqa)
    if spec.iqa.learned.path:
        iqa["learned"]["path"] = file_hash(spec.iqa.learned.path)
    return fingerprint({
        "round": spec.round, "rounds": spec.rounds, "seed": spec.seed,
        "train": to_dict(replace(spec.train, checkpoint_every=1, gpus=1)),
        "iqa": iqa, "bf16": spec.compute.bf16, "global_batch": spec.train.batch_size * world,
        "inputs": {k: file_hash(getattr(p, k)) for k in ("teacher", "student", "bank")},
        "images": portable(p.images, p.results_dir),
        "paired": portable(p.paired, p.results_dir) if p.paired is not None and spec.train.losses.sup.weight > 0
        else None,
        "initial": file_hash(p.initial) if p.initial is not None and spec.train.losses.pref.reg_anchor == "initial"
        and spec.train.preference else None,
    })


def _load_student(path: Path, device: torch.device) -> tuple[Restorer, Checkpoint]:
    ckpt = load_checkpoint(path, kinds=("pretrain", "student", "teacher"))
    model = build_model(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    return model.to(device), ckpt


def _teacher_ema(student: nn.Module, teacher: Path, decay: float) -> EMA:
    """The EMA teacher: the student's architecture with the teacher checkpoint's weights."""
    ckpt = load_checkpoint(teacher, kinds=("pretrain", "student", "teacher"))
    ema = EMA(student, decay)
    try:
        ema.module.load_state_dict(ckpt.ema_state["module"] if ckpt.ema_state else ckpt.model_state)
    except RuntimeError as exc:
        raise ValueError(f"teacher {teacher}: its weights do not fit the student's model: "
                         f"{str(exc).splitlines()[0]}") from exc
    return ema


def _optimizer(model: nn.Module, cfg: TrainConfig, start: Checkpoint) -> torch.optim.AdamW:
    """AdamW; a ``student`` start checkpoint's moments carry over (training continues across rounds).

    Loaded state keeps its moments; lr, betas and weight decay always come from the config.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if start.kind == "student" and start.optimizer_state:
        opt.load_state_dict(start.optimizer_state)
    for group in opt.param_groups:
        group.update(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return opt


@dataclass
class _Round:
    """What one rank holds during a round (built by :func:`_build_round`)."""

    spec: RoundSpec
    world: ddp.World
    mc: ModelConfig
    student: Restorer
    opt: torch.optim.Optimizer
    ema: EMA | None
    ctx: StepContext
    reader: BankReader
    paired: PairedReader | None
    per_epoch: int
    total: int
    window: int
    """The reward window's side (the training patch when no reward term is on)."""
    guard: NonFiniteGuard | None = None


def _build_round(world: ddp.World, spec: RoundSpec, reward: RewardFn | None,
                 determinism: dict) -> tuple[_Round, TrainState]:
    tc, dev = spec.train, world.device
    seed_everything(process_seed(spec.seed, spec.round, world.rank))
    student, start = _load_student(spec.paths.student, dev)
    mc = start.model_config
    passes: nn.Module = build_passes(student, tc.batch_size, dev, tc.fast_passes)
    if world.distributed:
        passes = DistributedDataParallel(passes, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = _optimizer(student, tc, start)
    sw = resolve_switches(tc, student.conditioned)
    label_top = best_pl_level(float(mc.conditioning.top_score), tc.relative_margin)
    samples = build_samples(pd.read_parquet(spec.paths.bank), tc.method, label_top, sw.score_condition,
                            tc.condition, tc.losses.pref.l2_target)
    if sw.input_labels:
        samples = _input_labels(world, spec, samples, label_top)
    reader = BankReader(samples, spec.paths.images, spec.paths.results_dir, tc.patch_size,
                        window=reward_side(tc.reward_window, tc.patch_size) if sw.needs_reward else 0,
                        ref=sw.preference, geometric=tc.geometric)
    global_batch = tc.batch_size * world.size
    per_epoch = steps_per_epoch(len(samples), global_batch)
    total = tc.steps if tc.steps > 0 else per_epoch * tc.epochs
    # the budget of the shares: round 0's, carried by the students (with epochs, round lengths differ)
    budget = int(start.extra.get("budget", 0)) if start.kind == "student" else 0
    budget = budget or spec.rounds * total
    window = reader.window or tc.patch_size
    ctx = build_step_context(student, opt, tc, spec.iqa, dev, top_score=float(mc.conditioning.top_score),
                             window=window, budget=budget, bf16=spec.compute.bf16,
                             passes=passes, reward=reward, perceptual=sw.perceptual,
                             init_params=_w_init(spec, dev, start.kind))
    decay = ema_decay(tc.ema_decay, tc.ema_half_life, total)
    ema = _teacher_ema(student, spec.paths.teacher, decay) if world.is_main else None
    st = TrainState("round", round_fingerprint(spec, world.size),
                    global_step=int(start.extra.get("global_step", 0)) if start.kind == "student" else 0,
                    determinism=determinism, perceptual=ctx.switches.perceptual, switches=asdict(ctx.switches),
                    n_samples=len(samples), world=world.size, global_batch=global_batch, budget=budget)
    resumed = find_resume(spec.paths.out_student, spec.resume, "round", st.fingerprint)
    if resumed is not None:
        st = resume_into(resumed, student, opt, ema, restore_rng=world.is_main)
        _log.info("round %d: resuming at step %d", spec.round, st.step)
    if world.is_main:
        _log.info("round %d: EMA decay %.6f (half-life %.0f steps), reward window %s px", spec.round, decay,
                  math.log(0.5) / math.log(decay) if 0 < decay < 1 else math.inf, reader.window or "off")
    guard = NonFiniteGuard(tc.max_nonfinite_steps, f"train round {spec.round}")
    return _Round(spec, world, mc, student, opt, ema, ctx, reader, _paired_reader(spec), per_epoch, total, window,
                  guard), st


def _input_labels(world: ddp.World, spec: RoundSpec, samples: TrainSamples, top_score: float) -> TrainSamples:
    """The samples plus their input samples (``train.input_labels``); rank 0 writes the scores beside the student.

    Rank 0 scores the inputs and sends the scores to the other ranks, so that every rank holds the
    same samples; a resumed round recomputes them (and rewrites equal scores).
    """
    scores = score_sample_inputs(samples, spec.paths.images, spec.iqa, world.device) if world.is_main else None
    labels = with_input_labels(samples, ddp.broadcast_object(scores, world), top_score, spec.paths.images,
                               spec.train.condition)
    if world.is_main:
        write_input_labels(labels.scores, input_labels_beside(spec.paths.out_student))
        _log.info("round %d: %s", spec.round, describe(labels))
    return labels.samples


def _w_init(spec: RoundSpec, device: torch.device, start_kind: str = "student") -> list[torch.Tensor] | None:
    """W_init of L_reg: the initial model's ``reg_params`` weights (``reg_anchor: initial``: one anchor for the
    whole run), else None (the student's at the start of this round). A round that starts from the
    pretrained model itself (``start_kind`` pretrain: round 0) needs no ``initial`` path: the student is it."""
    pref = spec.train.losses.pref
    if pref.reg_anchor != "initial" or not spec.train.preference:
        return None
    if spec.paths.initial is None:
        if start_kind == "pretrain":
            return None
        raise ValueError("train.losses.pref.reg_anchor: initial needs the initial (pretrained) model (initial=, "
                         "qt train --initial) when the round starts from a later student")
    model, _ = _load_student(spec.paths.initial, device)
    return [p.detach().clone() for p in model.reg_parameters(pref.reg_params)]


def _paired_reader(spec: RoundSpec) -> PairedReader | None:
    """The labeled pairs of the supervised anchor, when it is on."""
    if spec.train.losses.sup.weight <= 0:
        return None
    if spec.paths.paired is None:
        raise ValueError("train.losses.sup: the supervised anchor is on but no paired folder was given (paired=)")
    return PairedReader(spec.paths.paired, spec.train.patch_size, geometric=spec.train.losses.sup.geometric)


def _one_step(r: _Round, st: TrainState, plan: EpochPlan, epoch: int, in_epoch: int) -> None:
    """Read this rank's batch, train, update the EMA teacher, log the rank-averaged terms."""
    tc = r.spec.train
    batch = r.reader.read(plan, rank_slots(in_epoch, r.world.rank, r.world.size, tc.batch_size))
    seed = process_seed(r.spec.seed, r.spec.round, r.world.rank)
    if tc.strong_view.enabled:  # the student's input of PL samples only, never the target
        draw = draw_view(tc.strong_view, batch.x.shape[0], seed_for(seed, st.global_step, 17))
        batch = replace(batch, x=apply_view(batch.x, draw, batch.pl),
                        window=apply_view(batch.window, draw, batch.pl) if batch.window is not None else None)
    if r.paired is not None:  # drawn from (seed, round, rank, global step) alone, so resume stays exact
        sup_x, sup_y = r.paired.read(seed, st.global_step, tc.losses.sup.batch_size or tc.batch_size)
        if tc.losses.sup.strong_view:
            sup_x = apply_view(sup_x, draw_view(tc.strong_view, sup_x.shape[0], seed_for(seed, st.global_step, 19)))
        batch = replace(batch, sup_x=sup_x, sup_y=sup_y)
    set_lr(r.opt, scheduled_lr(tc.lr, st.step, r.total, tc.lr_schedule))
    out = train_step(r.ctx, batch, st.global_step)
    if r.guard is not None:
        r.guard.record(out.stepped, st.step, out.terms["loss"])  # raises past train.max_nonfinite_steps
    if r.ema is not None:
        r.ema.update(r.student)
    values = torch.tensor([out.terms[k] for k in TERMS], dtype=torch.float64, device=r.world.device)
    values = ddp.all_reduce_mean(values, r.world)
    st.log.append({"round": r.spec.round, "epoch": epoch, "step": st.step, "global_step": st.global_step,
                   **dict(zip(TERMS, values.tolist(), strict=True)), "lr": r.opt.param_groups[0]["lr"]})
    st.step += 1
    st.global_step += 1


def _finish(r: _Round, st: TrainState) -> None:
    """Write the loss log, the teacher (EMA weights) and the complete student checkpoint."""
    p = r.spec.paths
    write_table(pd.DataFrame(st.log, columns=LOG_SCHEMA.names), p.losses, LOG_SCHEMA)
    meta = st.to_extra(with_log=False)
    save_checkpoint(p.out_teacher, Checkpoint("teacher", r.mc, r.ema.module.state_dict(), step=st.step,
                                              round=r.spec.round, extra=meta))
    save_checkpoint(p.out_student, Checkpoint("student", r.mc, r.student.state_dict(), r.ema.state_dict(),
                                              r.opt.state_dict(), step=st.step, round=r.spec.round,
                                              rng=capture_rng_state(), extra=meta))
    step_checkpoint(p.out_student).unlink(missing_ok=True)


def run_round(world: ddp.World, spec: RoundSpec, reward: RewardFn | None = None) -> TrainResult:
    """The body of a round on one rank (see :func:`train_one_round`), under the determinism switch."""
    with determinism_switch(spec.compute.deterministic) as state:
        return _run_round(world, spec, reward, state)


def _run_round(world: ddp.World, spec: RoundSpec, reward: RewardFn | None, determinism: dict) -> TrainResult:
    t0 = time.perf_counter()
    r, st = _build_round(world, spec, reward, determinism)
    tc, resumed_from, out = spec.train, st.step, spec.paths.out_student
    if world.is_main:
        _log.info("round %d: %d samples, %d steps from step %d, switches %s", spec.round, st.n_samples, r.total,
                  st.step, st.switches)
    r.student.train()
    plan: EpochPlan | None = None
    stop = r.total if spec.stop_after is None else min(r.total, st.step + spec.stop_after)
    for _ in tqdm(range(st.step, stop), initial=st.step, total=stop, desc=f"train round {spec.round}", unit="step",
                  mininterval=2.0, disable=not world.is_main):
        epoch, in_epoch = divmod(st.step, r.per_epoch)
        if plan is None or plan.epoch != epoch:
            plan = draw_epoch_plan(st.n_samples, st.global_batch, r.reader.image_size, tc.patch_size, r.ctx.crop,
                                   tc.losses.pref.low_levels, spec.seed, spec.round, epoch,
                                   window=r.window)
        _one_step(r, st, plan, epoch, in_epoch)
        if world.is_main and st.step < r.total and st.step % tc.checkpoint_every == 0:
            save_step(out, r.mc, r.student, r.opt, st, spec.round, r.ema)
    done = st.step == r.total
    if world.is_main:
        _finish(r, st) if done else save_step(out, r.mc, r.student, r.opt, st, spec.round, r.ema)
    ddp.barrier(world)
    return TrainResult(out if done else None, spec.paths.out_teacher if done else None,
                       spec.paths.losses if done else None, None if done else step_checkpoint(out), st.step, r.total,
                       st.global_step, st.n_samples, resumed_from, r.ctx.switches, determinism,
                       time.perf_counter() - t0)


def _run_rank(world: ddp.World, spec: RoundSpec, reward: RewardFn | None = None) -> None:
    run_round(world, spec, reward)


def train_one_round(
    paths: RoundPaths,
    round_: int,
    train: TrainConfig,
    iqa: IQAConfig,
    compute: ComputeConfig,
    seed: int,
    *,
    resume: bool | str | Path = True,
    device: str = "auto",
    reward: RewardFn | None = None,
    stop_after: int | None = None,
    rounds: int = 1,
) -> TrainResult:
    """Train the student for one round (``train.epochs`` epochs over the bank), EMA teacher every step.

    Args:
        paths: the files read and written (:class:`RoundPaths`).
        round_: the round r.
        train, iqa, compute, seed: the config slices the round reads (what the workflow's train rule hashes).
        resume: True = continue from ``<out_student>.partial`` if it exists and matches the inputs and
            config (else start afresh); False = always start afresh; a path = that step checkpoint.
        device: cpu, cuda or auto.
        reward: the reward function (default: ``qtlib.iqa.Reward(iqa)`` when a reward term is on);
            with ``train.gpus > 1`` it must be picklable.
        stop_after: stop after this many steps of this call, leaving the step checkpoint (tests, time limits).
        rounds: the run's number of rounds (a loss term's ``start`` below 1 is a share of rounds x steps).

    Returns:
        :class:`TrainResult`; ``student``/``teacher``/``losses`` are None when stopped before the end.
    """
    spec = RoundSpec(paths, round_, train, iqa, compute, seed, resume if isinstance(resume, bool) else Path(resume),
                     device, stop_after, rounds)
    for name in ("teacher", "student", "bank"):
        if not getattr(paths, name).is_file():
            raise FileNotFoundError(f"{name}: {getattr(paths, name)}: no such file")
    dev = resolve_device(device)
    if train.gpus <= 1:
        return run_round(ddp.World(0, 1, dev), spec, reward)
    if dev.type == "cuda" and torch.cuda.device_count() < train.gpus:
        raise ValueError(f"train.gpus: {train.gpus} processes need as many visible GPUs, "
                         f"{torch.cuda.device_count()} are visible")
    ddp.launch(_run_rank, train.gpus, device, spec, reward)
    return _result_from_files(spec)


def _result_from_files(spec: RoundSpec) -> TrainResult:
    """The parent's view of a spawned round: read back what rank 0 wrote."""
    out = spec.paths.out_student
    done = out.is_file() and not step_checkpoint(out).is_file()
    ckpt = load_checkpoint(out if done else step_checkpoint(out))
    st = TrainState.from_extra(ckpt.extra)
    total = spec.train.steps or steps_per_epoch(st.n_samples, st.global_batch) * spec.train.epochs
    return TrainResult(out if done else None, spec.paths.out_teacher if done else None,
                       spec.paths.losses if done else None, None if done else step_checkpoint(out), ckpt.step, total,
                       st.global_step, st.n_samples, -1, Switches(**st.switches), st.determinism, math.nan)
