"""``qt restore``: restore an image file or a folder with a checkpoint, at a chosen quality score."""

from __future__ import annotations

import argparse
import sys

from qtlib.cli.errors import UserError
from qtlib.data.intake import Intake, exit_code, summary
from qtlib.models import CheckpointError
from qtlib.restore import DEFAULT_TILE, DEFAULT_TILE_ABOVE, load_restorer, restore_path
from qtlib.runtime import resolve_device


def _score(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 10.0:
        raise argparse.ArgumentTypeError(f"expected a score in [0, 10], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "restore",
        help="restore an image or a folder of images with a checkpoint",
        description="Restore IN (an image or a folder, searched recursively) into OUT as PNGs with the same "
        "relative names. Images with a side above --tile-above (default 2048) are restored in overlapping "
        f"{DEFAULT_TILE} px tiles with blended seams, streamed into an 8-bit buffer, so memory stays near 7 bytes "
        "per pixel; --tile T tiles every image with a side above T. Unusable inputs (empty, not_image, truncated, "
        "too_large, ...) are skipped with one line each naming the file; a summary closes the run. Exit status: 0 "
        "when at least one image was restored, 1 when none was (or on a bad checkpoint or option). "
        "With a student checkpoint (round_R/student.pt) the STUDENT weights are used by default: they are the "
        "ones the score conditioning was trained on, so --score changes the output. The EMA teacher weights in "
        "the same file trail the student (train.ema_decay, 0.998 by default): their score embedding, which starts "
        "at zero, is a damped copy of the student's, so after short rounds their output barely changes with "
        "--score. --ema selects them. A teacher.pt holds only EMA weights and "
        "a pretrain model.pt only its model weights.",
    )
    parser.add_argument("input", metavar="IN", help="image file or folder")
    parser.add_argument("output", metavar="OUT", help="output folder (or a .png file when IN is a file)")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a qtlib checkpoint (.pt)")
    parser.add_argument("--score", type=_score, default=7.0,
                        help="quality score 0..10 to condition on (default: %(default)s, the top level)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default: %(default)s)")
    parser.add_argument("--tile", type=_positive, default=None, metavar="T",
                        help="tile side: tile every image with a side above T (default: tile only images "
                        f"with a side above --tile-above, at {DEFAULT_TILE} px)")
    parser.add_argument("--tile-above", type=_non_negative, default=DEFAULT_TILE_ABOVE, metavar="S",
                        help="without --tile, tile images with a side above S; 0 = never tile "
                        "(whole images need ~60 bytes per pixel) (default: %(default)s)")
    parser.add_argument("--max-pixels", type=_positive, default=None, metavar="N",
                        help="skip images with more pixels as too_large, before decoding (default: 178956970, "
                        "Pillow's decompression-bomb limit)")
    parser.add_argument("--overlap", type=_non_negative, default=32, metavar="O",
                        help="tile overlap in pixels, blended (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive, default=1, help="tiles per forward pass (default: 1)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", action="store_true",
                         help="use the EMA teacher weights of a student checkpoint instead of its student weights "
                         "(whose score conditioning was trained; the EMA copy may barely react to --score)")
    weights.add_argument("--no-ema", dest="ema", action="store_false",
                         help="use the student weights: the default, kept for old scripts")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tile is not None and args.overlap >= args.tile:
        raise UserError(f"--overlap ({args.overlap}) must be smaller than --tile ({args.tile})")
    try:
        device = resolve_device(args.device)
        restorer = load_restorer(args.checkpoint, ema=args.ema, device=device)
        limits = {"max_pixels": args.max_pixels} if args.max_pixels else {}
        result = restore_path(restorer.model, args.input, args.output, score=args.score, device=device, tile=args.tile,
                              overlap=args.overlap, batch_size=args.batch_size, progress=not args.quiet,
                              tile_above=args.tile_above or None, report=_report, **limits)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    score = f"score {args.score:g}" if restorer.conditioned else "not score-conditioned: --score has no effect"
    print(f"restored {len(result.outputs)} image(s) into {args.output} in {result.seconds:.1f} s "
          f"({restorer.weights} weights, {score})")
    files = [Intake(p, "ok") for p in result.outputs] + result.skipped
    print(f"qt restore: {summary(files, 'restored')}", file=sys.stderr)
    return exit_code(len(result.outputs))


def _report(item: Intake) -> None:
    print(f"qt restore: skipped {item.line}", file=sys.stderr)
