"""The headroom table: how much better than the teacher's plain output could a round's pseudo-labels be?

A building block, shared by the three places that handle ``round_{r}/headroom.parquet``:
the headroom stage (:mod:`qtlib.headroom`) writes it, the evaluate stage summarizes it
into ``summary.md``, and the proxy harness (``benchmarks/proxy/run.py``) collects it
over rows and seeds. The schema, the column names, the threshold that calls a label
"unrestored" and the per-round summary live here, once.

One row per test image (V = the views of ``label.augmentations``; L = the V views and
``mean``, their pixel mean, always reported whether or not ``label.mean_label`` makes it
a label):

=====================  =======  ==============================================================
column                 type     meaning
=====================  =======  ==============================================================
image_id               string   id of the test image (from ``qt prepare``)
round                  int32    round r whose teacher (``Layout.teacher_of(r)``) made the labels
teacher_hash           string   sha256 (16 hex) of that teacher checkpoint
psnr_plain             float64  PSNR vs ground truth of the teacher's output on the image itself
psnr_<l>               float64  PSNR vs ground truth of label l (each view, then ``mean``)
psnr_s_first           float64  PSNR of the label the ensemble S ranks first
s_first                string   its name (null when no candidate has a finite S)
psnr_gt_best           float64  PSNR of the best label by ground truth
gt_best                string   its name
S_<l>                  float64  ensemble score of label l (the label stage's S)
psnr_vs_input_plain    float64  PSNR of the plain output against the degraded input
psnr_vs_input_<l>      float64  PSNR of label l against the degraded input: at least
                                :data:`UNRESTORED_MARGIN_DB` above the plain output's, the label
                                is "unrestored" (the input passed through)
=====================  =======  ==============================================================

``s_first`` and ``gt_best`` choose among the labels the label stage produces
(``label.label_names``: the views, plus ``mean`` with ``label.mean_label``); the schema
metadata records them (``qtlib.candidates``). Every pixel is quantized to uint8 before it
is scored, as the label stage stores and scores them; PSNR is pyiqa's (RGB, data range 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qtlib.config.types import MEAN_LABEL

#: A label this much closer to the degraded input than the teacher's plain output is (PSNR vs the input, dB)
#: is the input passed through, not a restoration: on the rain proxy, rot90 views of a teacher pretrained
#: without rotations came back 44-46 dB from the input, where plain outputs are 15-49 dB (median 23) from it.
#: Relative to plain, because on a lightly degraded image the teacher itself changes little (plain 40+ dB).
UNRESTORED_MARGIN_DB = 6.0
PLAIN = "plain"
MEAN = MEAN_LABEL
S_FIRST = "s_first"
GT_BEST = "gt_best"
TABLE = "headroom"


def labels_of(views: Sequence[str]) -> tuple[str, ...]:
    """Every label the table reports: the views, then their ``mean``."""
    return (*views, MEAN)


def summary_columns(views: Sequence[str]) -> tuple[str, ...]:
    """The rows of a round's summary, in order: plain, each view, mean, S's first, the best by ground truth."""
    return (PLAIN, *labels_of(views), S_FIRST, GT_BEST)


def headroom_schema(views: Sequence[str], candidates: Sequence[str]) -> pa.Schema:
    """The pyarrow schema of ``headroom.parquet`` (the one place it is declared; see the module docstring).

    Args:
        views: the views of ``label.augmentations``, in order.
        candidates: the labels S and ground truth choose among (``label.label_names``).
    """
    labels = labels_of(views)
    if unknown := [c for c in candidates if c not in labels]:
        raise ValueError(f"candidates: {unknown} are not among the labels {list(labels)}")
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("teacher_hash", pa.string(), nullable=False),
        pa.field("psnr_plain", pa.float64()),
        *[pa.field(f"psnr_{c}", pa.float64()) for c in labels],
        pa.field("psnr_s_first", pa.float64()),
        pa.field("s_first", pa.string()),
        pa.field("psnr_gt_best", pa.float64()),
        pa.field("gt_best", pa.string()),
        *[pa.field(f"S_{c}", pa.float64()) for c in labels],
        pa.field("psnr_vs_input_plain", pa.float64()),
        *[pa.field(f"psnr_vs_input_{c}", pa.float64()) for c in labels],
    ]
    return pa.schema(fields, metadata={"qtlib.table": TABLE, "qtlib.views": ",".join(views),
                                       "qtlib.candidates": ",".join(candidates)})


def unrestored(psnr_vs_input: np.ndarray | pd.Series, plain_vs_input: np.ndarray | pd.Series) -> np.ndarray:
    """True where a label is the input passed through: :data:`UNRESTORED_MARGIN_DB` or more closer to the input
    (PSNR vs the input) than the teacher's plain output is."""
    return np.asarray(psnr_vs_input, dtype=float) >= np.asarray(plain_vs_input, dtype=float) + UNRESTORED_MARGIN_DB


@dataclass(frozen=True)
class Headroom:
    """The headroom tables of one run read back: every round's rows, the views, and the labels S ranks."""

    frame: pd.DataFrame
    views: tuple[str, ...]
    candidates: tuple[str, ...]


def read_headroom(paths: Sequence[str | Path]) -> Headroom:
    """Read and concatenate ``headroom.parquet`` files of one run (their views and candidates must agree).

    Raises:
        ValueError: no path, a file that is not a headroom table, or files of different label sets.
    """
    if not paths:
        raise ValueError("read_headroom: expected at least one headroom.parquet")
    frames, first = [], None
    for path in paths:
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"qtlib.table") != TABLE.encode():
            raise ValueError(f"{path}: not a headroom table (no qtlib.table={TABLE!r} in its schema metadata)")
        kind = (meta[b"qtlib.views"].decode(), meta[b"qtlib.candidates"].decode())
        if first is not None and kind != first:
            raise ValueError(f"{path}: its views/labels {kind} differ from {paths[0]}'s {first}; "
                             "re-run the headroom rule of every round")
        first = kind
        frames.append(pd.read_parquet(path))
    views, candidates = (tuple(s.split(",")) if s else () for s in first)  # type: ignore[union-attr]
    return Headroom(pd.concat(frames, ignore_index=True), views, candidates)


def _chosen(frame: pd.DataFrame, name_col: str, prefix: str) -> np.ndarray:
    """Per image, column ``prefix<name>`` of the label named in ``name_col`` (NaN where none is named)."""
    out = np.full(len(frame), np.nan)
    for name, idx in frame.groupby(name_col).indices.items():
        out[idx] = frame[f"{prefix}{name}"].to_numpy(dtype=float)[idx]
    return out


def _share(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else math.nan


def summarize_round(frame: pd.DataFrame, views: Sequence[str], candidates: Sequence[str]) -> pd.DataFrame:
    """One round's summary: one row per :func:`summary_columns` entry.

    Columns: ``column``; ``n`` images; ``psnr`` (mean dB); ``d_vs_plain`` (mean minus the plain mean);
    ``share_better`` (images where the column beats plain); ``share_unrestored`` (its label is the input
    passed through, :func:`unrestored`; NaN for plain); ``share_s_first`` (S ranks this label first; for ``gt_best``:
    S's first is the best label; NaN for plain, s_first and a label that is not a candidate).
    """
    plain = frame["psnr_plain"].to_numpy(dtype=float)
    plain_in = frame["psnr_vs_input_plain"].to_numpy(dtype=float)
    rows = []
    for col in summary_columns(views):
        psnr = plain if col == PLAIN else frame[f"psnr_{col}"].to_numpy(dtype=float)
        if col in (S_FIRST, GT_BEST):
            vs_input = _chosen(frame, col, "psnr_vs_input_")
        else:
            vs_input = frame[f"psnr_vs_input_{col}"].to_numpy(dtype=float)
        if col in candidates:
            first = _share((frame[S_FIRST] == col).to_numpy())
        elif col == GT_BEST:
            first = _share((frame[S_FIRST] == frame[GT_BEST]).to_numpy())
        else:
            first = math.nan
        rows.append({"column": col, "n": len(frame), "psnr": float(np.nanmean(psnr)) if len(frame) else math.nan,
                     "d_vs_plain": float(np.nanmean(psnr - plain)) if len(frame) else math.nan,
                     "share_better": math.nan if col == PLAIN else _share(psnr > plain),
                     "share_unrestored": math.nan if col == PLAIN else _share(unrestored(vs_input, plain_in)),
                     "share_s_first": first})
    return pd.DataFrame(rows)


def summarize(headroom: Headroom) -> pd.DataFrame:
    """:func:`summarize_round` of every round, with a ``round`` column first, rounds in order."""
    parts = [summarize_round(group, headroom.views, headroom.candidates).assign(round=int(r))
             for r, group in headroom.frame.groupby("round", sort=True)]
    if not parts:
        return pd.DataFrame(columns=["round", "column", "n", "psnr", "d_vs_plain", "share_better",
                                     "share_unrestored", "share_s_first"])
    out = pd.concat(parts, ignore_index=True)
    return out[["round", *[c for c in out.columns if c != "round"]]]


def _pct(v: float) -> str:
    return "" if math.isnan(v) else f"{100 * v:.0f}%"


def display_round(summary: pd.DataFrame) -> pd.DataFrame:
    """One round's summary as text cells, for a Markdown table (PSNR 2 decimals, shares in percent)."""
    return pd.DataFrame({
        "label": summary["column"],
        "PSNR (dB)": [f"{v:.2f}" for v in summary["psnr"]],
        "d vs plain (dB)": ["" if c == PLAIN else f"{v:+.3f}" for c, v in zip(summary["column"],
                                                                           summary["d_vs_plain"], strict=True)],
        "better than plain": [_pct(v) for v in summary["share_better"]],
        "unrestored": [_pct(v) for v in summary["share_unrestored"]],
        "S ranks first": [_pct(v) for v in summary["share_s_first"]],
    })


SECTION_TITLE = "## Headroom of the pseudo-labels (per round)"
SECTION_NOTE = (
    "On the test images (with ground truth), the teacher that labels round r (the pretrained model for "
    "round 0, else round r-1's EMA teacher) at its top score: `plain` is its output on the image itself, "
    "each view A^-1(f(A(x))) as the label stage makes it, `mean` their pixel mean (a label only with "
    "`label.mean_label`), `s_first` the label the ensemble S ranks first and `gt_best` the best label by "
    "ground truth (both among the labels the label stage makes). Pixels are quantized to uint8 before "
    "scoring; PSNR is pyiqa's. `unrestored`: the label is {db:g} dB or more closer to the degraded input "
    "(PSNR against it) than the plain output is: the input passed through. `S ranks first` for `gt_best`: how often S's first is the best label. "
    "If no label beats plain, no training step can make the student beat its teacher with these labels.")


def render_section(summary: pd.DataFrame, to_markdown: Callable[[pd.DataFrame], str]) -> str:
    """The ``summary.md`` section: the teacher's PSNR per round, then one table per round.

    Args:
        summary: :func:`summarize` of every round.
        to_markdown: renders a DataFrame as a Markdown table (the caller's, so the report looks alike).
    """
    plain = summary[summary["column"] == PLAIN]
    teacher = ", ".join(f"round {int(r)}: {v:.2f} dB" for r, v in zip(plain["round"], plain["psnr"], strict=True))
    parts = [SECTION_TITLE, "", SECTION_NOTE.format(db=UNRESTORED_MARGIN_DB), "",
             f"Teacher PSNR per round (its plain output): {teacher}.", ""]
    for r, group in summary.groupby("round", sort=True):
        n = int(group["n"].iloc[0])
        parts += [f"### Round {int(r)} ({n} images)", "", to_markdown(display_round(group))]
    return "\n".join(parts)
