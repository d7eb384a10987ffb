"""The training stages: supervised pretraining and the QualiTeacher student round.

Public API::

    pretrain(paired_dir, out, cfg, *, log, resume, device, stop_after) -> PretrainResult
    pretrain_step(net, opt, x, y, perceptual, perceptual_weight, bf16) -> dict of terms
    train_one_round(cfg, round_, teacher, student, bank, images, results_dir,
                    out_student, out_teacher, log, *, resume, device, reward, stop_after) -> TrainResult
    train_step(ctx, batch, step) -> StepOutput          # one step of eq. (11)
    resolve_switches(train_cfg, conditioned) -> Switches # method + Table 2 switches

Loss terms are pure functions in :mod:`qtlib.train.losses`; one step of eq. (11)
in :mod:`qtlib.train.step`; the round (EMA, step checkpoints, resume, DDP ranks)
in :mod:`qtlib.train.loop`; data sampling and epoch plans in :mod:`qtlib.train.data`;
process groups in :mod:`qtlib.train.ddp`; the perceptual loss in
:mod:`qtlib.train.perceptual`.
"""

from qtlib.train.loop import LOG_SCHEMA, TrainResult, partial_path, train_one_round
from qtlib.train.pretrain import PretrainResult, pretrain, pretrain_step
from qtlib.train.step import (
    RewardFn,
    StepContext,
    StepOutput,
    StudentPasses,
    Switches,
    active_terms,
    resolve_switches,
    train_step,
)

__all__ = [
    "LOG_SCHEMA",
    "PretrainResult",
    "RewardFn",
    "StepContext",
    "StepOutput",
    "StudentPasses",
    "Switches",
    "TrainResult",
    "active_terms",
    "partial_path",
    "pretrain",
    "pretrain_step",
    "resolve_switches",
    "train_one_round",
    "train_step",
]
