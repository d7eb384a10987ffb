"""``qt config show``: print the resolved configuration."""

from __future__ import annotations

import argparse

import yaml

from qtlib.cli.errors import UserError, user_config
from qtlib.config import to_dict


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect the configuration")
    inner = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = inner.add_parser("show", help="print the resolved config (defaults filled, validated, data folders and cross-field rules checked)")
    show.add_argument("--config", default="config/config.yaml", help="YAML file (default: %(default)s)")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from qtlib.config import ConfigError
    from qtlib.preflight import check_config

    config = user_config(args.config)
    try:  # what the Snakefile checks before the first job: metric names, data folders, cross-field rules
        check_config(config, str(args.config))
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
