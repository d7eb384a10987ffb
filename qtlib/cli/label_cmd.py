"""``qt label``: the pseudo-labeling stage of one round (one shard)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qtlib.cli.errors import UserError, user_config
from qtlib.layout import ledger_in, label_store_in


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected k/K (e.g. 0/2), got {text!r}") from exc
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"shard k/K needs 0 <= k < K, got {text!r}")
    return k, n


def register(sub: argparse._SubParsersAction) -> None:
    label = sub.add_parser("label", help="restore a shard of unlabeled images under 3 augmentations and score them")
    label.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint (.pt)")
    label.add_argument("--images", required=True, type=Path, help="prepared images.zarr (from qt prepare)")
    label.add_argument("--shard", type=_shard, default=(0, 1), help="k/K: this job's shard (default 0/1)")
    label.add_argument("--round", dest="round_", type=int, default=0, help="round number r (default 0)")
    label.add_argument("--out", required=True, type=Path, help="round folder: writes labels/ and ledger/")
    label.add_argument("--config", default="config/config.yaml", help="YAML config (default: %(default)s)")
    label.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: config device")
    label.set_defaults(func=run_label)


def run_label(args: argparse.Namespace) -> int:
    from qtlib.label import label_shard

    cfg = user_config(args.config)
    for p in (args.teacher, args.images):
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
    k, n = args.shard
    result = label_shard(args.teacher, args.images, k, n, label_store_in(args.out, k), ledger_in(args.out, k),
                         args.round_, cfg.iqa, cfg.label,
                         device=args.device or cfg.device)
    print(f"labeled {result.n_images} images ({result.n_rows} labels, {result.n_nan} with NaN scores) -> "
          f"{result.store}, {result.ledger}")
    return 0
