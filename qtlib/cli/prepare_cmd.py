"""``qt prepare IN_DIR OUT_DIR``: a folder of images -> ``images.zarr`` + ``manifest.parquet``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from qtlib.cli.errors import UserError
from qtlib.config import ConfigError, load_config
from qtlib.data import prepare_images, prepare_paired


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prepare",
        help="turn a folder of images into a Zarr store + Parquet manifest",
        description=(
            "Read every jpg/jpeg/png/bmp/tif/tiff/webp under IN_DIR (recursive), keep each at its own size "
            "(data.geometry native; downscaled to data.max_side when larger) or resize the shorter side to "
            "data.size and center-crop (square), and write OUT_DIR/images.zarr (one uint8 array per image, or "
            "N x 3 x size x size) and "
            "OUT_DIR/manifest.parquet (one row per file: id, path, sha256, size, mode, transform, index, "
            "status, message). Unusable files (empty, not_image, truncated, too_small, too_large, unreadable, ...) are "
            "skipped with a status and a one-line message naming the file; a summary closes the run. Exit status: "
            "0 when at least one image was usable, 1 when none was (or on a bad option or config)."
        ),
    )
    parser.add_argument("in_dir", metavar="IN_DIR", help="folder of images (searched recursively)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created)")
    parser.add_argument("--config", default="config/config.yaml", help="YAML file (default: %(default)s)")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="IN_DIR holds degraded/ and clean/ (or input/ + target/, or lq/ + gt/; matched by relative path "
        "without extension): "
        "write degraded.zarr and clean.zarr in the same row order",
    )
    parser.add_argument(
        "--clean-optional",
        action="store_true",
        help="with --paired: clean/ may be absent (a test set without ground truth)",
    )
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="reject images with more pixels as too_large, before decoding "
                        "(default: data.max_pixels, Pillow's limit of 178956970)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.clean_optional and not args.paired:
        raise UserError("--clean-optional applies to --paired only")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UserError(f"--max-pixels: must be >= 1, got {args.max_pixels}")
    try:
        cfg = load_config(args.config).data
        if args.max_pixels is not None:
            cfg = dataclasses.replace(cfg, max_pixels=args.max_pixels)
        if args.paired:
            result = prepare_paired(args.in_dir, args.out_dir, cfg, require_clean=not args.clean_optional)
            outputs = [result.degraded, *([result.clean] if result.clean else []), result.manifest]
        else:
            result = prepare_images(args.in_dir, args.out_dir, cfg)
            outputs = [result.store, result.manifest]
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    _print_skipped(Path(args.in_dir), result.manifest)
    skipped = {k: v for k, v in result.status_counts.items() if k != "ok"}
    detail = f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
    print(f"{result.n_ok} images ok, {result.n_skipped} skipped{detail} -> {', '.join(map(str, outputs))}")
    return 0


def _print_skipped(in_dir: Path, manifest: Path) -> None:
    """One line per unusable file (from the manifest just written), on stderr."""
    import pandas as pd

    rows = pd.read_parquet(manifest)
    for row in rows[rows["status"] != "ok"].itertuples():
        shown = row.path or getattr(row, "clean_path", "")
        if shown:
            print(f"qt prepare: skipped {in_dir / shown}: {row.status}: {' '.join(row.message.split())}",
                  file=sys.stderr)
