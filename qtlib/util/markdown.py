"""Markdown tables of the reports (``summary.md``, the reward's ``report.md``): one renderer, one look."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def cell(v: object) -> str:
    """A table cell: NaN as empty, floats with 4 significant digits, anything else as ``str``."""
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def to_markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (NaN as an empty cell, floats with 4 significant digits)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"
