"""``qt restore``: restore an image file or a folder with a checkpoint, at a chosen quality score."""

from __future__ import annotations

import argparse

from qtlib.cli.errors import UserError
from qtlib.models import CheckpointError, load_model
from qtlib.restore import restore_path
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
        "relative names. Images larger than --tile are restored in overlapping tiles with blended seams.",
    )
    parser.add_argument("input", metavar="IN", help="image file or folder")
    parser.add_argument("output", metavar="OUT", help="output folder (or a .png file when IN is a file)")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a qtlib checkpoint (.pt)")
    parser.add_argument("--score", type=_score, default=7.0,
                        help="quality score 0..10 to condition on (default: %(default)s, the top level)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default: %(default)s)")
    parser.add_argument("--tile", type=_positive, default=None, metavar="T",
                        help="tile side in pixels for larger images (default: whole images)")
    parser.add_argument("--overlap", type=_non_negative, default=32, metavar="O",
                        help="tile overlap in pixels, blended (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive, default=1, help="tiles per forward pass (default: 1)")
    parser.add_argument("--no-ema", action="store_true", help="use the student weights, not the EMA teacher's")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tile is not None and args.overlap >= args.tile:
        raise UserError(f"--overlap ({args.overlap}) must be smaller than --tile ({args.tile})")
    try:
        device = resolve_device(args.device)
        model = load_model(args.checkpoint, use_ema=not args.no_ema, device=device)
        result = restore_path(model, args.input, args.output, score=args.score, device=device, tile=args.tile,
                              overlap=args.overlap, batch_size=args.batch_size, progress=not args.quiet)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    print(f"restored {len(result.outputs)} image(s) into {args.output} in {result.seconds:.1f} s")
    return 0
