"""One QualiTeacher round of student training: :func:`train_one_round`.

A round is ``train.epochs`` epochs (default one) over the samples of the
memory bank (:mod:`qtlib.train.data`); each step is :func:`qtlib.train.step.train_step`
followed by the EMA teacher update (eq. 10, rank 0). Step checkpoints
(``<out-student>.partial``, every ``train.checkpoint_every`` steps) hold the
student, AdamW, the EMA teacher, the step (= the sampler position: the epoch
plan is redrawn from the seed), the global step, RNG states and the log so far;
a matching one is resumed automatically. ``train.gpus > 1`` runs the same
function on spawned DDP ranks (:mod:`qtlib.train.ddp`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
from tqdm import tqdm
import pyarrow as pa
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qtlib.config.loader import to_dict
from qtlib.config.types import Config, ModelConfig, TrainConfig
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
    EpochPlan,
    build_samples,
    draw_epoch_plan,
    rank_slots,
    steps_per_epoch,
)
from qtlib.train.perceptual import build_perceptual
from qtlib.train.runtime import determinism as determinism_switch
from qtlib.runtime import file_hash, resolve_device
from qtlib.train.runtime import process_seed, seed_everything
from qtlib.train.step import (
    TERMS,
    RewardFn,
    StepContext,
    StudentPasses,
    Switches,
    build_reward,
    crop_side,
    resolve_switches,
    train_step,
)

_log = logging.getLogger(__name__)

#: Columns of the per-step loss log; term values are unweighted batch means averaged over ranks (NaN = off).
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
    values = torch.tensor([out.terms[k] for k in TERMS], dtype=torch.float64, device=r.world.device)
    values = ddp.all_reduce_mean(values, r.world)
    st.rows.append({"round": r.inp.round, "epoch": epoch, "step": st.step, "global_step": st.global_step,
                    **dict(zip(TERMS, values.tolist(), strict=True)), "lr": r.opt.param_groups[0]["lr"],
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
    bar = tqdm(total=stop, initial=st.step, desc=f"train round {inp.round}", unit="step", mininterval=2.0,
               disable=not world.is_main)
    while st.step < stop:
        bar.update(1)
        epoch, in_epoch = divmod(st.step, r.per_epoch)
        if plan is None or plan.epoch != epoch:
            plan = draw_epoch_plan(r.samples_n, r.global_batch, r.reader.image_size, tc.patch_size, r.crop,
                                   tc.losses.pref.low_levels, inp.cfg.seed, inp.round, epoch)
        _one_step(r, st, plan, epoch, in_epoch)
        if world.is_main and st.step < r.total and st.step % tc.checkpoint_every == 0:
            _save_partial(partial, r.mc, r.student, r.ema, r.opt, st, inp, r.extra)
    bar.close()
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
