"""Stage 1: supervised pretraining of the backbone on prepared paired data.

Random aligned crops of ``degraded.zarr`` / ``clean.zarr``, L1 (+ an optional
perceptual term), AdamW. When the model is score-conditioned only the backbone
is trained (``model.backbone(x)``): the zero-initialized score embedding stays
exactly zero, so the pretrained model behaves the same at every score and is
both student_0 and teacher_0 of the rounds.

Every random choice of step ``t`` (rows and crop positions) is drawn from
(seed, t) alone, so a run resumed from a step checkpoint (``<out>.partial``,
written every ``pretrain.checkpoint_every`` steps) continues exactly as an
uninterrupted run would. ``train.deterministic`` and ``train.bf16`` apply here
too; AdamW uses betas (0.9, 0.999), the paper's values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm
import pyarrow as pa
import torch
from torch import nn

from qtlib.config.loader import to_dict
from qtlib.config.types import Config
from qtlib.models import (
    Checkpoint,
    ScoreConditioned,
    build_model,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from qtlib.train.data import PairedReader
from qtlib.train.losses import weighted_l1
from qtlib.train.perceptual import build_perceptual, resolve_perceptual
from qtlib.runtime import resolve_device
from qtlib.train.runtime import autocast, seed_everything
from qtlib.train.runtime import determinism as determinism_switch

_log = logging.getLogger(__name__)

PRETRAIN_LOG_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("l1", pa.float64()),
        pa.field("per", pa.float64()),
        pa.field("seconds", pa.float64()),
    ],
    metadata={"qtlib.table": "pretrain_log"},
)


@dataclass(frozen=True)
class PretrainResult:
    """What pretraining wrote and did."""

    model: Path | None
    """The final checkpoint (None when stopped early)."""
    partial: Path | None
    log: Path | None
    steps: int
    total_steps: int
    resumed_from: int
    perceptual: str
    determinism: dict[str, bool]
    final_loss: float
    seconds: float


def trainable(model: nn.Module) -> nn.Module:
    """The part pretraining updates: the backbone of a conditioned model, else the whole model."""
    return model.backbone if isinstance(model, ScoreConditioned) else model


def _fingerprint(cfg: Config, paired_dir: Path) -> str:
    payload = {"pretrain": to_dict(cfg.pretrain), "model": to_dict(cfg.model), "seed": cfg.seed,
               "bf16": cfg.train.bf16, "paired": str(paired_dir.resolve())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _resume(path: Path, fp: str, resume: bool | Path) -> Checkpoint | None:
    if resume is False:
        return None
    if resume is not True and not path.is_file():
        raise FileNotFoundError(f"resume: {path}: no step checkpoint there")
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path, kinds=("train-state",))
    if ckpt.extra.get("fingerprint") == fp and ckpt.extra.get("stage") == "pretrain":
        return ckpt
    if resume is not True:
        raise ValueError(f"resume: {path} was written for other data or another config")
    _log.warning("%s: config or data changed since this step checkpoint; starting afresh", path)
    return None


def pretrain(
    paired_dir: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    log: str | Path | None = None,
    resume: bool | str | Path = True,
    device: str | None = None,
    stop_after: int | None = None,
) -> PretrainResult:
    """Pretrain ``cfg.model`` on a prepared paired folder and write a ``pretrain`` checkpoint.

    Args:
        paired_dir: folder with ``degraded.zarr`` and ``clean.zarr`` (from ``qt prepare``).
        out: the checkpoint to write (complete: model, optimizer, step, RNG, config).
        cfg: the whole config (``pretrain``, ``model``, ``seed``, ``device`` and ``train.deterministic/bf16``).
        log: optional per-step loss log (Parquet).
        resume: True = continue from ``<out>.partial`` when it matches the config and data;
            False = start afresh; a path = that step checkpoint.
        device: cpu, cuda or auto (default: ``cfg.device``).
        stop_after: stop after this many steps of this call, leaving the step checkpoint.

    Returns:
        :class:`PretrainResult`.
    """
    with determinism_switch(cfg.train.deterministic) as state:
        return _pretrain(Path(paired_dir), Path(out), cfg, log, resume, device, stop_after, state)


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
    opt.step()
    return {"loss": loss.item(), "l1": l1.item(), "per": per}


def _pretrain(paired_dir: Path, out: Path, cfg: Config, log: str | Path | None, resume: bool | str | Path,
              device: str | None, stop_after: int | None, determinism: dict) -> PretrainResult:
    t0 = time.perf_counter()
    pc = cfg.pretrain
    dev = resolve_device(device or cfg.device)
    seed_everything(cfg.seed)
    reader = PairedReader(paired_dir, pc.patch_size)
    per_kind = resolve_perceptual(pc.perceptual, pc.patch_size) if pc.perceptual_weight > 0 else "none"
    perceptual = build_perceptual(per_kind, dev)
    model = build_model(cfg.model).to(dev)
    net = trainable(model)
    opt = torch.optim.AdamW(net.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    partial = out.with_name(out.name + ".partial")
    fp = _fingerprint(cfg, paired_dir)
    step, rows = 0, []
    resume = resume if isinstance(resume, bool) else Path(resume)
    resumed = _resume(partial if isinstance(resume, bool) else resume, fp, resume)
    if resumed is not None:
        model.load_state_dict(resumed.model_state)
        opt.load_state_dict(resumed.optimizer_state)
        restore_rng_state(resumed.rng)
        step, rows = resumed.step, list(resumed.extra.get("log", []))
        _log.info("pretrain: resuming at step %d of %d", step, pc.steps)
    resumed_from = step
    extra = {"stage": "pretrain", "fingerprint": fp, "perceptual": per_kind, "determinism": determinism}
    _log.info("pretrain: %d paired images, %d steps, perceptual %s", len(reader), pc.steps, per_kind)
    stop = pc.steps if stop_after is None else min(pc.steps, step + stop_after)
    model.train()
    bar = tqdm(total=stop, initial=step, desc="pretrain", unit="step", mininterval=2.0)
    while step < stop:
        bar.update(1)
        t = time.perf_counter()
        x, y = (v.to(dev) for v in reader.read(cfg.seed, step, pc.batch_size))
        terms = pretrain_step(net, opt, x, y, perceptual, pc.perceptual_weight, cfg.train.bf16)
        rows.append({"step": step, **terms, "seconds": time.perf_counter() - t})
        step += 1
        if step < pc.steps and step % pc.checkpoint_every == 0:
            _save(partial, "train-state", cfg, model, opt, step, {**extra, "log": rows})
    bar.close()
    final_loss = rows[-1]["loss"] if rows else math.nan
    if step < pc.steps:
        _save(partial, "train-state", cfg, model, opt, step, {**extra, "log": rows})
        return PretrainResult(None, partial, None, step, pc.steps, resumed_from, per_kind, determinism,
                              final_loss, time.perf_counter() - t0)
    if log is not None:
        from qtlib.ledger import write_table

        write_table(pd.DataFrame(rows, columns=PRETRAIN_LOG_SCHEMA.names), log, PRETRAIN_LOG_SCHEMA)
    _save(out, "pretrain", cfg, model, opt, step, {**extra, "final_loss": final_loss, "global_step": 0})
    partial.unlink(missing_ok=True)
    return PretrainResult(out, None, Path(log) if log else None, step, pc.steps, resumed_from, per_kind,
                          determinism, final_loss, time.perf_counter() - t0)


def _save(path: Path, kind: str, cfg: Config, model: nn.Module, opt: torch.optim.Optimizer, step: int,
          extra: dict) -> None:
    save_checkpoint(path, Checkpoint(kind, cfg.model, model.state_dict(), None, opt.state_dict(), step=step,
                                     round=0, rng=capture_rng_state(), extra=extra))
