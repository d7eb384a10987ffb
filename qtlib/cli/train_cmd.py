"""``qt pretrain`` and ``qt train``: the training stages, with explicit paths in and out."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qtlib.cli.errors import UserError, user_config


def _add_resume(parser: argparse.ArgumentParser, out_flag: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", type=Path, default=None, metavar="PARTIAL",
                       help=f"resume from this step checkpoint (default: {out_flag}.partial when it exists "
                            "and matches the inputs and config)")
    group.add_argument("--no-resume", action="store_true", help="ignore any step checkpoint and start afresh")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N steps, leaving the step checkpoint (for time-limited jobs)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: config device")
    parser.add_argument("--config", default="config/config.yaml", help="YAML config (default: %(default)s)")


def register(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser("pretrain", help="supervised pretraining on prepared paired data (random crops, L1 + per)")
    pre.add_argument("--paired", required=True, type=Path, help="folder with degraded.zarr and clean.zarr")
    pre.add_argument("--out", required=True, type=Path, help="checkpoint to write (model.pt)")
    pre.add_argument("--log", type=Path, default=None, help="per-step loss log (Parquet), optional")
    _add_resume(pre, "OUT")
    pre.set_defaults(func=run_pretrain)

    tr = sub.add_parser("train", help="one QualiTeacher round: a student epoch over the bank, EMA teacher")
    tr.add_argument("--round", dest="round_", type=int, required=True, metavar="R", help="round number r")
    tr.add_argument("--teacher", required=True, type=Path, help="teacher of round r-1 (or the pretrained model)")
    tr.add_argument("--student", required=True, type=Path, help="student of round r-1 (or the pretrained model)")
    tr.add_argument("--bank", required=True, type=Path, help="bank.parquet of round r")
    tr.add_argument("--images", required=True, type=Path, help="the unlabeled images.zarr")
    tr.add_argument("--results-dir", required=True, type=Path, help="folder the bank's label-store paths start in")
    tr.add_argument("--out-student", required=True, type=Path, help="student checkpoint to write")
    tr.add_argument("--out-teacher", required=True, type=Path, help="teacher (EMA) checkpoint to write")
    tr.add_argument("--log", required=True, type=Path, help="per-step loss log to write (Parquet)")
    tr.add_argument("--paired", type=Path, default=None,
                    help="prepared paired folder, for the supervised anchor (train.losses.sup.weight > 0)")
    tr.add_argument("--initial", type=Path, default=None,
                    help="the initial (pretrained) model, for train.losses.pref.reg_anchor: initial")
    _add_resume(tr, "OUT_STUDENT")
    tr.set_defaults(func=run_train)


def _setup(args: argparse.Namespace):
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = user_config(args.config)
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after: expected N >= 1, got {args.stop_after}")
    resume = False if args.no_resume else (args.resume if args.resume is not None else True)
    return cfg, resume


def _user_errors():
    from qtlib.models import CheckpointError
    from qtlib.train.guard import NonFiniteLossError

    return (FileNotFoundError, ValueError, CheckpointError, NonFiniteLossError)


def run_pretrain(args: argparse.Namespace) -> int:
    from qtlib.train import pretrain

    cfg, resume = _setup(args)
    try:
        r = pretrain(args.paired, args.out, cfg.model, cfg.pretrain, cfg.compute, cfg.seed, losses=args.log,
                     resume=resume, device=args.device or cfg.device, stop_after=args.stop_after)
    except _user_errors() as exc:
        raise UserError(str(exc)) from exc
    where = r.model if r.model else f"{r.partial} (stopped, resume with the same command)"
    print(f"pretrain: {r.steps}/{r.total_steps} steps (from {r.resumed_from}), loss {r.final_loss:.4g}, "
          f"perceptual {r.perceptual} -> {where}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from qtlib.train import RoundPaths, train_one_round

    cfg, resume = _setup(args)
    try:
        paths = RoundPaths(args.teacher, args.student, args.bank, args.images, args.results_dir,
                           args.out_student, args.out_teacher, args.log, args.paired,
                           args.initial)
        r = train_one_round(paths, args.round_, cfg.train, cfg.iqa, cfg.compute, cfg.seed, resume=resume,
                            device=args.device or cfg.device, stop_after=args.stop_after, rounds=cfg.rounds)
    except _user_errors() as exc:
        raise UserError(str(exc)) from exc
    where = f"{r.student}, {r.teacher}, {r.losses}" if r.student else f"{r.partial} (stopped, resume with the same command)"
    print(f"train round {args.round_}: {r.steps}/{r.total_steps} steps over {r.n_samples} samples, "
          f"method {r.switches.method}, perceptual {r.switches.perceptual} -> {where}")
    return 0
