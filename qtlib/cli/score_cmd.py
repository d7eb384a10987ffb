"""``qt score``: score an image file or folder with IQA metrics; print a table, optionally write Parquet.

Parquet columns: ``path``; per metric ``<metric>`` (raw pyiqa score, named
exactly as the metric) and ``<metric>_norm`` (in [0, 1], higher = better);
``S`` (ensemble, 0..10). With ``--blocks GHxGW`` also ``<metric>_r<i>c<j>`` (raw)
and ``S_r<i>c<j>`` for every block (row i, column j).

Files go through :func:`qtlib.data.intake.read_file`: an unusable file (empty,
not an image, truncated, smaller than the metrics' minimum side, above
``--max-pixels``) gets one line on stderr naming it and is left out of the table;
the run goes on and ends with a summary. Constant images (and constant blocks)
cannot be scored by BRISQUE/NIQE-style statistics: their scores are NaN.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from qtlib.cli.errors import UserError, user_config
from qtlib.util.atomic import atomic_path

if TYPE_CHECKING:  # heavy imports stay inside the functions: `qt --help` must be quick
    import pandas
    import torch

    from qtlib.config.types import IQAConfig
    from qtlib.data.intake import Intake


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "score", help="score images with IQA metrics (table, optional Parquet)",
        description="Score an image or every image under a folder with the IQA ensemble. Unusable files are "
        "skipped with one line each naming the file and the problem, and a summary closes the run. Exit status: "
        "0 when at least one image was scored, 1 when none was usable (or on a bad option, metric or config).",
    )
    parser.add_argument("input", metavar="IN", help="an image file or a folder (searched recursively)")
    parser.add_argument(
        "--metrics", default=None, metavar="A,B",
        help="comma-separated catalog metrics, equal weights in S (default: the config's ensemble and weights)",
    )
    parser.add_argument("--blocks", default=None, metavar="GHxGW", help="also score a block grid, e.g. 2x2")
    parser.add_argument("--out", default=None, metavar="F.parquet", help="write the scores to this Parquet file")
    parser.add_argument("--config", default=None, help="config YAML for iqa settings (default: built-in defaults)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per metric call (default: iqa.batch_size)")
    parser.add_argument("--allow-download", action="store_true", help="let pyiqa download missing weights")
    parser.add_argument("--reward", default=None, metavar="PATH",
                        help="the fitted model file of the learned member liteiqa (results/reward/model.pt)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="skip images with more pixels as too_large, before decoding (default: 178956970, "
                        "Pillow's decompression-bomb limit)")
    parser.set_defaults(func=run)


def parse_grid(text: str) -> tuple[int, int]:
    """``"2x2"`` -> ``(2, 2)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise UserError(f"--blocks: expected ROWSxCOLS such as 2x2, got {text!r}")
    return int(match[1]), int(match[2])


def _iqa_config(args: argparse.Namespace) -> IQAConfig:
    from qtlib.config.types import IQAConfig, Member

    cfg = user_config(args.config).iqa if args.config else IQAConfig()
    if args.metrics:
        names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        cfg = dataclasses.replace(cfg, ensemble=tuple(Member(m, 1.0) for m in names))
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UserError(f"--batch-size: must be >= 1, got {args.batch_size}")
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    if args.allow_download:
        cfg = dataclasses.replace(cfg, allow_download=True)
    if args.reward:
        from qtlib.iqa import get_info

        if not any(get_info(m.metric).source == "qtlib" for m in cfg.ensemble):
            raise UserError(f"--reward: no metric of {', '.join(m.metric for m in cfg.ensemble)} uses a fitted file "
                            "(add liteiqa to --metrics or to the config's iqa.ensemble)")
        if not Path(args.reward).is_file():
            raise UserError(f"--reward: {args.reward}: no such file (a fitted liteiqa model, e.g. "
                            "results/reward/model.pt)")
        cfg = dataclasses.replace(cfg, learned=dataclasses.replace(cfg.learned, path=args.reward))
    return cfg


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _batches(files: Iterator[Intake], batch_size: int, seen: list[Intake]) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Consecutive usable images of the same size, at most ``batch_size`` at a time.

    Every file's outcome (without its pixels) is appended to ``seen``; unusable ones
    are reported on stderr as they come.
    """
    import torch

    group: list[Path] = []
    images: list[torch.Tensor] = []
    for item in files:
        seen.append(dataclasses.replace(item, image=None))
        if not item.ok:
            print(f"qt score: skipped {item.line}", file=sys.stderr)
            continue
        image = item.tensor()
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield group, torch.stack(images)
            group, images = [], []
        group.append(item.path)
        images.append(image)
    if images:
        yield group, torch.stack(images)


def min_side(cfg: IQAConfig, grid: tuple[int, int] | None) -> int:
    """The shortest image side every member can score (whole image, and each block of ``grid``)."""
    from qtlib.iqa import get_info

    need = max(get_info(m.metric).min_size for m in cfg.ensemble)
    return need * (max(grid) if grid else 1)


@dataclasses.dataclass(frozen=True)
class ScoreRun:
    """Scores of the usable files (one row each) and every file's intake outcome (pixels dropped)."""

    frame: pandas.DataFrame
    files: list[Intake]


def score_paths(paths: list[Path], cfg: IQAConfig, device: str, grid: tuple[int, int] | None,
                max_pixels: int | None = None) -> ScoreRun:
    """Score ``paths`` with the ensemble of ``cfg``; one row per usable image (see module doc for columns)."""
    import pandas as pd

    from qtlib.data.decode import DEFAULT_MAX_PIXELS
    from qtlib.data.intake import read_file
    from qtlib.iqa import Ensemble

    ensemble = Ensemble(cfg, device)
    need, limit = min_side(cfg, grid), max_pixels or DEFAULT_MAX_PIXELS
    files = (read_file(p, need, limit, digest=False) for p in paths)
    rows: list[dict] = []
    seen: list[Intake] = []
    for group, batch in _batches(files, cfg.batch_size, seen):
        scores = ensemble.score(batch)
        blocks = ensemble.score_blocks(batch, grid) if grid else None
        for k, path in enumerate(group):
            row: dict = {"path": str(path)}
            for m in ensemble.members:
                row[m] = float(scores.raw[m][k])
            for m in ensemble.members:
                row[f"{m}_norm"] = float(scores.normalized[m][k])
            row["S"] = float(scores.S[k])
            if blocks is not None:
                for name, values in [*blocks.raw.items(), ("S", blocks.S)]:
                    for i in range(grid[0]):
                        for j in range(grid[1]):
                            row[f"{name}_r{i}c{j}"] = float(values[k, i, j])
            rows.append(row)
    return ScoreRun(pd.DataFrame(rows), seen)


def _print_table(frame: pandas.DataFrame, root: Path, members: list[str], grid: tuple[int, int] | None) -> None:
    width = max(8, *(len(m) for m in members))
    print(f"{'image':<40} " + " ".join(f"{m:>{width}}" for m in members) + f" {'S':>6}" + ("  S blocks" if grid else ""))
    for _, row in frame.iterrows():
        name = Path(row["path"]).relative_to(root).as_posix() if root.is_dir() else Path(row["path"]).name
        name = name if len(name) <= 40 else "..." + name[-37:]
        line = f"{name:<40} " + " ".join(f"{row[m]:>{width}.4f}" for m in members) + f" {row['S']:>6.3f}"
        if grid:
            line += "  " + " ".join(f"{row[f'S_r{i}c{j}']:.2f}" for i in range(grid[0]) for j in range(grid[1]))
        print(line)


def _write_parquet(frame: pandas.DataFrame, out: Path) -> None:
    with atomic_path(out) as tmp:
        frame.to_parquet(tmp, index=False)


def run(args: argparse.Namespace) -> int:
    from qtlib.data.intake import exit_code, summary
    from qtlib.imageio import list_images
    from qtlib.iqa import MissingWeightsError, UnknownMetricError

    grid = parse_grid(args.blocks) if args.blocks else None
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UserError(f"--max-pixels: must be >= 1, got {args.max_pixels}")
    cfg = _iqa_config(args)
    try:
        paths = list_images(args.input)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    if not paths:
        raise UserError(f"{args.input}: no images found")
    try:
        result = score_paths(paths, cfg, _device(args.device), grid, args.max_pixels)
    except (MissingWeightsError, UnknownMetricError, ValueError, OSError) as exc:
        raise UserError(str(exc)) from exc
    frame = result.frame
    if len(frame):
        _print_table(frame, Path(args.input), [m.metric for m in cfg.ensemble], grid)
    print(f"qt score: {summary(result.files, 'scored')}", file=sys.stderr)
    if args.out and len(frame):
        _write_parquet(frame, Path(args.out))
        print(f"wrote {args.out} ({len(frame)} rows)")
    return exit_code(len(frame))
