"""``qt degrade --recipe NAME --seed S IN OUT``: apply a named, seeded degradation to a file or folder."""

from __future__ import annotations

import argparse
import sys

from qtlib.cli.errors import UserError
from qtlib.config import ConfigError, load_config
from qtlib.data.degradations import UnknownRecipeError, degrade_path, get_recipe
from qtlib.data.intake import exit_code


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "degrade",
        help="apply a named synthetic degradation (rain, snow, haze, low_light, underwater) to images",
        description=(
            "Degrade an image file or every image under a folder (recursive) with a recipe from "
            "degrade.recipes of the config. Outputs are PNG with the same relative names. The recipe, the "
            "seed and every image's drawn parameters are recorded in OUT/degrade.json (or OUT.json next to "
            "a single .png output). Each image's seed derives from --seed and its relative name. Unusable inputs "
            "(empty, not_image, truncated, too_small, too_large, ...) are skipped with one line each naming the "
            "file, and a summary closes the run. Exit status: 0 when at least one image was degraded, 1 when "
            "none was usable (or on a bad option, recipe or config)."
        ),
    )
    parser.add_argument("src", metavar="IN", help="an image file or a folder")
    parser.add_argument("dst", metavar="OUT", help="output folder, or a .png path when IN is a file")
    parser.add_argument("--recipe", required=True, help="recipe name, e.g. rain_source (see qt config show)")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: the config's seed)")
    parser.add_argument("--config", default="config/config.yaml", help="YAML file (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="skip images with more pixels as too_large, before decoding (default: 178956970, "
                        "Pillow's decompression-bomb limit)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        recipe = get_recipe(config.degrade, args.recipe)
        seed = config.seed if args.seed is None else args.seed
        if args.max_pixels is not None and args.max_pixels < 1:
            raise ValueError(f"--max-pixels: must be >= 1, got {args.max_pixels}")
        limits = {"max_pixels": args.max_pixels} if args.max_pixels else {}
        result = degrade_path(args.src, args.dst, args.recipe, recipe, seed, **limits)
    except (ConfigError, UnknownRecipeError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    for failure in result.failed:
        print(f"qt degrade: skipped {failure}", file=sys.stderr)
    print(f"{len(result.outputs)} images degraded with {args.recipe} (seed {seed}); record: {result.record}")
    n = len(result.outputs) + len(result.failed)
    print(f"qt degrade: {n} file{'s' * (n != 1)}: {len(result.outputs)} degraded, {len(result.failed)} skipped",
          file=sys.stderr)
    return exit_code(len(result.outputs))
