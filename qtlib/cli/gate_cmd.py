"""``qt gate``: the dual-drop test and memory-bank update of one round."""

from __future__ import annotations

import argparse
from pathlib import Path

from qtlib.cli.errors import UserError, user_config


def register(sub: argparse._SubParsersAction) -> None:
    gate = sub.add_parser("gate", help="dual-drop a round's ledger and update the top-k memory bank")
    gate.add_argument("--round", dest="round_", type=int, required=True, help="round number r")
    gate.add_argument("--ledger", nargs="+", required=True, type=Path, help="ledger shard files of round r")
    gate.add_argument("--bank-prev", type=Path, default=None, help="bank.parquet of round r-1 (none for r=0)")
    gate.add_argument("--out", required=True, type=Path, help="folder for gate.parquet and bank.parquet")
    gate.add_argument("--config", default="config/config.yaml", help="YAML config (default: %(default)s)")
    gate.set_defaults(func=run_gate_cmd)


def run_gate_cmd(args: argparse.Namespace) -> int:
    from qtlib.gate import run_gate

    cfg = user_config(args.config)
    for p in [*args.ledger, *([args.bank_prev] if args.bank_prev else [])]:
        if not p.is_file():
            raise UserError(f"{p}: no such file")
    try:
        result = run_gate(args.ledger, args.bank_prev, cfg.gate, len(cfg.label.label_names),
                          args.out / "gate.parquet", args.out / "bank.parquet")
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(f"round {args.round_}: tau1={result.tau1:.4g} tau2={result.tau2:.4g} {result.counts}")
    return 0
