"""Stage 1: supervised pretraining of the backbone on prepared paired data.

Random aligned crops of ``degraded.zarr`` / ``clean.zarr``, each pair turned by a
random flip / quarter turn (``pretrain.geometric``: the views the teacher labels
with), L1 (+ an optional perceptual term), AdamW. When the model is score-conditioned only the backbone
is trained (``model.backbone(x)``): the zero-initialized score embedding stays
exactly zero, so the pretrained model behaves the same at every score and is
both student_0 and teacher_0 of the rounds.

Every random choice of step ``t`` (rows and crop positions) is drawn from
(seed, t) alone, so a run resumed from a step checkpoint (``<out>.partial``,
written every ``pretrain.checkpoint_every`` steps) continues exactly as an
uninterrupted run would (the learning rate of ``pretrain.lr_schedule`` is a function
of the step too). ``compute.deterministic`` and ``compute.bf16`` apply here
too; AdamW uses betas (0.9, 0.999), the paper's values.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from tqdm import tqdm

from qtlib.config.loader import to_dict
from qtlib.config.types import ComputeConfig, ModelConfig, PretrainConfig
from qtlib.layout import portable, step_checkpoint
from qtlib.ledger import write_table
from qtlib.models import Checkpoint, build_model, capture_rng_state, save_checkpoint
from qtlib.runtime import resolve_device
from qtlib.train.compute import autocast, seed_everything
from qtlib.train.compute import determinism as determinism_switch
from qtlib.train.guard import NonFiniteGuard, step_if_finite
from qtlib.train.losses import weighted_l1
from qtlib.train.perceptual import build_perceptual, resolve_perceptual
from qtlib.train.samples import PairedReader
from qtlib.train.schedule import scheduled_lr, set_lr
from qtlib.train.state import (
    TrainState,
    find_resume,
    fingerprint,
    resume_into,
    save_step,
)

_log = logging.getLogger(__name__)

PRETRAIN_LOG_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("l1", pa.float64()),
        pa.field("per", pa.float64()),
    ],
    metadata={"qtlib.table": "pretrain_log"},
)


@dataclass(frozen=True)
class PretrainResult:
    """What pretraining wrote and did."""

    model: Path | None
    """The final checkpoint (None when stopped early)."""
    partial: Path | None
    losses: Path | None
    steps: int
    total_steps: int
    resumed_from: int
    perceptual: str
    determinism: dict[str, bool]
    final_loss: float
    seconds: float


def trainable(model: nn.Module) -> nn.Module:
    """The part pretraining updates: the backbone of a conditioned model, else the whole model."""
    return model.unconditioned()


def pretrain(
    paired_dir: str | Path,
    out: str | Path,
    model_cfg: ModelConfig,
    cfg: PretrainConfig,
    compute: ComputeConfig,
    seed: int,
    *,
    losses: str | Path | None = None,
    resume: bool | str | Path = True,
    device: str = "auto",
    stop_after: int | None = None,
) -> PretrainResult:
    """Pretrain a ``model_cfg`` model on a prepared paired folder and write a ``pretrain`` checkpoint.

    Args:
        paired_dir: folder with ``degraded.zarr`` and ``clean.zarr`` (from ``qt prepare``).
        out: the checkpoint to write (complete: model, optimizer, step, RNG, config).
        model_cfg, cfg, compute, seed: the ``model``, ``pretrain`` and ``compute`` sections and the seed
            (what the workflow's pretrain rule hashes in its params).
        losses: optional per-step loss log (Parquet).
        resume: True = continue from ``<out>.partial`` when it matches the config and data;
            False = start afresh; a path = that step checkpoint.
        device: cpu, cuda or auto.
        stop_after: stop after this many steps of this call, leaving the step checkpoint.

    Returns:
        :class:`PretrainResult`.
    """
    run = _PretrainRun(Path(paired_dir), Path(out), model_cfg, cfg, compute, seed)
    with determinism_switch(compute.deterministic) as state:
        return _pretrain(run, losses, resume if isinstance(resume, bool) else Path(resume), device, stop_after, state)


@dataclass(frozen=True)
class _PretrainRun:
    paired_dir: Path
    out: Path
    model_cfg: ModelConfig
    cfg: PretrainConfig
    compute: ComputeConfig
    seed: int

    def fingerprint(self) -> str:
        return fingerprint({"pretrain": to_dict(self.cfg), "model": to_dict(self.model_cfg), "seed": self.seed,
                            "bf16": self.compute.bf16, "paired": portable(self.paired_dir, self.out.parent)})


def pretrain_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  perceptual: nn.Module | None, perceptual_weight: float, bf16: bool = False) -> dict[str, float]:
    """One supervised step: ``L1(net(x), y) + w * L_per``, backward, optimizer step; returns the terms."""
    with autocast(x.device, bf16):
        pred = net(x)
    pred = pred.float()
    l1 = weighted_l1(pred, y)
    loss, per = l1, math.nan
    if perceptual is not None:
        p = perceptual(pred.clamp(0, 1), y).mean()
        loss, per = loss + perceptual_weight * p, p.item()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    stepped = step_if_finite(opt, loss)  # a NaN/inf loss or gradient leaves the weights as they were
    return {"loss": loss.item(), "l1": l1.item(), "per": per, "stepped": stepped}


def _pretrain(run: _PretrainRun, losses: str | Path | None, resume: bool | Path, device: str,
              stop_after: int | None, determinism: dict) -> PretrainResult:
    t0 = time.perf_counter()
    pc, dev = run.cfg, resolve_device(device)
    seed_everything(run.seed)
    reader = PairedReader(run.paired_dir, pc.patch_size, geometric=pc.geometric)
    per_kind = resolve_perceptual(pc.perceptual, pc.patch_size) if pc.perceptual_weight > 0 else "none"
    perceptual = build_perceptual(per_kind, dev)
    model = build_model(run.model_cfg).to(dev)
    net = trainable(model)
    opt = torch.optim.AdamW(net.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    st = TrainState("pretrain", run.fingerprint(), determinism=determinism, perceptual=per_kind)
    resumed = find_resume(run.out, resume, "pretrain", st.fingerprint)
    if resumed is not None:
        st = resume_into(resumed, model, opt, None)
        st.determinism = determinism
        _log.info("pretrain: resuming at step %d of %d", st.step, pc.steps)
    resumed_from = st.step
    _log.info("pretrain: %d paired images, %d steps, perceptual %s", len(reader), pc.steps, per_kind)
    stop = pc.steps if stop_after is None else min(pc.steps, st.step + stop_after)
    model.train()
    guard = NonFiniteGuard(pc.max_nonfinite_steps, "pretrain")
    for _ in tqdm(range(st.step, stop), initial=st.step, total=stop, desc="pretrain", unit="step", mininterval=2.0):
        x, y = (v.to(dev) for v in reader.read(run.seed, st.step, pc.batch_size))
        set_lr(opt, scheduled_lr(pc.lr, st.step, pc.steps, pc.lr_schedule))
        terms = pretrain_step(net, opt, x, y, perceptual, pc.perceptual_weight, run.compute.bf16)
        guard.record(bool(terms.pop("stepped")), st.step, terms["loss"])
        st.log.append({"step": st.step, **terms})
        st.step += 1
        if st.step < pc.steps and st.step % pc.checkpoint_every == 0:
            save_step(run.out, run.model_cfg, model, opt, st, 0)
    st.final_loss = st.log[-1]["loss"] if st.log else math.nan
    if st.step < pc.steps:
        partial = save_step(run.out, run.model_cfg, model, opt, st, 0)
        return PretrainResult(None, partial, None, st.step, pc.steps, resumed_from, per_kind, determinism,
                              st.final_loss, time.perf_counter() - t0)
    if losses is not None:
        write_table(pd.DataFrame(st.log, columns=PRETRAIN_LOG_SCHEMA.names), losses, PRETRAIN_LOG_SCHEMA)
    save_checkpoint(run.out, Checkpoint("pretrain", run.model_cfg, model.state_dict(), None, opt.state_dict(),
                                        step=st.step, round=0, rng=capture_rng_state(),
                                        extra=st.to_extra(with_log=False)))
    step_checkpoint(run.out).unlink(missing_ok=True)
    return PretrainResult(run.out, None, Path(losses) if losses else None, st.step, pc.steps, resumed_from, per_kind,
                          determinism, st.final_loss, time.perf_counter() - t0)
