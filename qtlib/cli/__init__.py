"""The ``qt`` command line: one thin subcommand per stage or tool.

Each module in this package defines ``register(subparsers)``, which adds its
parser and sets ``func`` to a function taking the parsed arguments and returning
an exit code. The list below is explicit: no registry filled by imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qtlib import __version__
from qtlib.cli import audit_cmd, config_cmd
from qtlib.cli import degrade_cmd, demo_cmd, gate_cmd, label_cmd, prepare_cmd
from qtlib.cli import restore_cmd
from qtlib.cli import score_cmd, weights_cmd
from qtlib.cli import train_cmd
from qtlib.cli.errors import UserError


def _command_modules() -> list:
    """The subcommand modules, imported here so ``qt --help`` lists them all."""
    return [config_cmd, weights_cmd, score_cmd, prepare_cmd, degrade_cmd, demo_cmd, restore_cmd, label_cmd, gate_cmd, train_cmd,
            audit_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qt",
        description="qtlib: QualiTeacher quality-conditioned pseudo-labeling for real-world image restoration.",
    )
    parser.add_argument("--version", action="version", version=f"qtlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qt`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"qt {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
