"""``qt audit IMAGE_ID``: the audit trail of one unlabeled image, and its pseudo-labels as PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from qtlib.cli.errors import UserError

#: The trail columns printed (every column is in OUT/trace.parquet).
SHOWN = ["round", "augmentation", "S", "status", "gate_decision", "gate_reason", "gate_var_metrics_max",
         "gate_var_aug_max", "gate_tau1", "gate_tau2", "banked_in", "bank_rank", "teacher_hash"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "audit",
        help="print an image's trail through the rounds (scores, gate, bank, teacher) and write its labels",
        description=(
            "Print every ledger row of IMAGE_ID (an unlabeled image id, or its path in the unlabeled manifest) "
            "in every round, with the gate decision and its numbers, the banks that held each label and the "
            "teacher checkpoint hash. Write OUT/trace.parquet (every column), OUT/input.png and "
            "OUT/round_<r>_<augmentation>.png for each stored pseudo-label (only round r with --round)."
        ),
    )
    parser.add_argument("image_id", metavar="IMAGE_ID", help="unlabeled image id or manifest path")
    parser.add_argument("--round", dest="round_", type=int, default=None, help="only this round's labels")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/audit/IMAGE_ID)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="default: %(default)s")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from qtlib import audit
    from qtlib.data import ImageStore
    from qtlib.layout import Layout

    try:
        image_id = audit.resolve_image_id(args.results_dir, args.image_id)
        trail = audit.trace(args.results_dir, image_id)
    except (KeyError, FileNotFoundError) as exc:
        raise UserError(str(exc).strip("'\"")) from exc
    if args.round_ is not None:
        trail = trail[trail["round"] == args.round_]
        if trail.empty:
            raise UserError(f"{image_id}: no ledger row in round {args.round_}")
    out = args.out or Path(args.results_dir) / "audit" / image_id
    out.mkdir(parents=True, exist_ok=True)
    trail.to_parquet(out / "trace.parquet")
    source = ImageStore(Layout(args.results_dir).unlabeled_images)
    Image.fromarray(source.read(source.index_of(image_id)).transpose(1, 2, 0)).save(out / "input.png")
    for row in trail.itertuples():
        pixels = audit.pseudo_label(args.results_dir, int(row.round), image_id, str(row.augmentation))
        Image.fromarray(pixels).save(out / f"round_{row.round}_{row.augmentation}.png")
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 4):
        print(f"image {image_id}: {len(trail)} labels")
        print(trail[[c for c in SHOWN if c in trail.columns]].to_string(index=False))
    print(f"-> {out}")
    return 0
