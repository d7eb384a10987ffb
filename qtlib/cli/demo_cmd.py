"""``qt demo-data OUT_DIR``: the offline demo data set from photos shipped inside installed packages."""

from __future__ import annotations

import argparse

from qtlib.cli.errors import UserError
from qtlib.config import ConfigError, load_config
from qtlib.data.degradations import UnknownRecipeError
from qtlib.data.demo import make_demo_data


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo-data",
        help="build the offline demo data (paired, unlabeled, test) from package sample photos",
        description=(
            "Write OUT_DIR/paired/{degraded,clean} (demo.source_recipe), OUT_DIR/unlabeled (demo.target_recipe) "
            "and OUT_DIR/test/{degraded,clean} (demo.target_recipe, clean kept aside): PNG crops of demo.size "
            "from scikit-image and matplotlib sample photos, disjoint source photos across the three sets, "
            "deterministic from the config seed. OUT_DIR/demo.json records each file's source and parameters."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (replaced if it holds an earlier demo)")
    parser.add_argument("--config", default="config/config.yaml", help="YAML file (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        result = make_demo_data(args.out_dir, config.demo, config.degrade.recipes, config.seed)
    except (ConfigError, UnknownRecipeError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    sizes = ", ".join(f"{name} {n}" for name, n in result.counts.items())
    print(f"demo data ({sizes}) -> {result.out_dir}; record: {result.record}")
    return 0
