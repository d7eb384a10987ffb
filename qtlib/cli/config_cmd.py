"""``qt config show``: print the resolved configuration."""

from __future__ import annotations

import argparse

import yaml

from qtlib.cli.errors import user_config
from qtlib.config import to_dict


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect the configuration")
    inner = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = inner.add_parser("show", help="print the resolved config (defaults filled, validated)")
    show.add_argument("--config", default="config/config.yaml", help="YAML file (default: %(default)s)")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    config = user_config(args.config)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
