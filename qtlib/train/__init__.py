"""The training stages: supervised pretraining and the QualiTeacher student round.

Public API::

    pretrain(paired_dir, out, model_cfg, pretrain_cfg, compute, seed, *, log, resume, device,
             stop_after) -> PretrainResult
    pretrain_step(net, opt, x, y, perceptual, perceptual_weight, bf16) -> dict of terms
    train_one_round(paths: RoundPaths, round_, train, iqa, compute, seed, *, resume, device, reward,
                    stop_after) -> TrainResult
    build_step_context(student, optimizer, train, iqa, device, *, top_score, ...) -> StepContext
    train_step(ctx, batch, step) -> StepOutput          # one step of eq. (11)
    resolve_switches(train_cfg, conditioned) -> Switches # method + Table 2 switches

Loss terms are pure functions in :mod:`qtlib.train.losses`; one step of eq. (11)
in :mod:`qtlib.train.step`; the round (EMA, step checkpoints, DDP ranks)
in :mod:`qtlib.train.loop`; the typed training state and resume (both stages) in
:mod:`qtlib.train.state`; data sampling and epoch plans in :mod:`qtlib.train.samples`;
the input labels (``train.input_labels``) in :mod:`qtlib.train.inputs`;
process groups in :mod:`qtlib.train.ddp`; the perceptual loss in
:mod:`qtlib.train.perceptual`.
"""

from qtlib.train.loop import LOG_SCHEMA, RoundPaths, TrainResult, train_one_round
from qtlib.train.pretrain import PretrainResult, pretrain, pretrain_step
from qtlib.train.step import (
    RewardFn,
    StepContext,
    StepOutput,
    StudentPasses,
    Switches,
    active_terms,
    build_step_context,
    resolve_switches,
    train_step,
)

__all__ = [
    "LOG_SCHEMA",
    "PretrainResult",
    "RewardFn",
    "RoundPaths",
    "StepContext",
    "StepOutput",
    "StudentPasses",
    "Switches",
    "TrainResult",
    "active_terms",
    "build_step_context",
    "pretrain",
    "pretrain_step",
    "resolve_switches",
    "train_one_round",
    "train_step",
]
