"""Plots of the evaluation, drawn on :class:`matplotlib.figure.Figure` objects (no pyplot state).

Every function takes plain tables (pandas) or tensors, draws one figure and
writes it as PNG to ``path``. Nothing here selects a matplotlib backend or
registers figures with pyplot: ``Figure.savefig`` renders with Agg, so the
plots work on a headless node, inside Snakemake and inside a notebook alike,
and importing this module never changes the caller's matplotlib state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 110
# method -> (line style, colour, legend label) of the reference lines in the controllability plot
REFERENCES = {
    "pretrained": ("-", "black", "pretrained (reference)"),
    "teacher": ("--", "C1", "teacher (EMA)"),
    "degraded": (":", "gray", "degraded input"),
}


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _reference_lines(ax: Axes, means: pd.DataFrame, col: str) -> None:
    for method, (style, color, label) in REFERENCES.items():
        val = means.loc[means["method"] == method, col]
        if len(val) and np.isfinite(val.iloc[0]):
            ax.axhline(float(val.iloc[0]), linestyle=style, color=color, linewidth=1.2, label=label)


def _student_curve(ax: Axes, means: pd.DataFrame, col: str) -> None:
    stu = means[means["method"] == "student"].sort_values("level")
    if stu["level"].notna().any():
        ax.plot(stu["level"], stu[col], "o-", color="C0", label="student")
    elif len(stu):  # an unconditioned student has one row, at no level
        ax.axhline(float(stu[col].iloc[0]), color="C0", label="student (unconditioned)")


def plot_controllability(
    means: pd.DataFrame, metrics: Sequence[str], lower_better: Mapping[str, bool], path: str | Path
) -> Path:
    """Student mean score per condition level, one panel per metric, with reference lines.

    Args:
        means: one row per (method, level) with a column per metric (:func:`qtlib.evaluate.summarize`).
        metrics: the columns to plot, one panel each.
        lower_better: metric -> True when lower is better (panel titles).
        path: output PNG.

    The pretrained model is the solid black reference; the teacher (dashed) and the
    degraded input (dotted) are drawn too, so a student curve below the reference
    line at every level is visible at a glance.
    """
    fig = Figure(figsize=(3.2 * len(metrics), 3.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, col in zip(axes, metrics, strict=True):
        _student_curve(ax, means, col)
        _reference_lines(ax, means, col)
        ax.set_xlabel("condition level")
        ax.set_title(f"{col} ({'lower' if lower_better.get(col, False) else 'higher'} is better)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Controllability: score vs condition level")
    return save(fig, path)


def plot_score_histograms(ledger: pd.DataFrame, path: str | Path) -> Path:
    """Histogram of the pseudo-labels' ensemble score S, one per round (columns ``round``, ``S``)."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    for r, group in ledger.groupby("round"):
        ax.hist(group["S"].dropna(), bins=30, alpha=0.5, label=f"round {r}")
    ax.set_xlabel("ensemble score S (0..10)")
    ax.set_ylabel("pseudo-labels")
    ax.legend(fontsize=7)
    ax.set_title("Pseudo-label scores per round")
    return save(fig, path)


def plot_drop_rates(gates: pd.DataFrame, path: str | Path) -> Path:
    """Stacked fraction of images per dual-drop decision and round (columns ``round``, ``decision``)."""
    rates = gates.groupby("round")["decision"].value_counts(normalize=True).unstack(fill_value=0.0)
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    labels = [str(r) for r in rates.index]
    bottom = np.zeros(len(rates))
    for decision in rates.columns:
        heights = rates[decision].to_numpy(dtype=float)
        ax.bar(labels, heights, bottom=bottom, label=str(decision))
        bottom += heights
    ax.set_xlabel("round")
    ax.set_ylabel("fraction of images")
    ax.legend(fontsize=7)
    ax.set_title("Dual-drop decisions per round")
    return save(fig, path)


def plot_bank_mean_score(banks: pd.DataFrame, path: str | Path) -> Path:
    """Mean S of the memory bank after each round (columns ``bank_round``, ``S``)."""
    mean_s = banks.groupby("bank_round")["S"].mean()
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(mean_s.index, mean_s.values, "o-")
    ax.set_xlabel("round")
    ax.set_ylabel("mean S in bank")
    ax.set_title("Memory bank mean score by round")
    return save(fig, path)


def plot_examples(columns: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """A grid of example images: one column per entry (title -> ``(N, 3, H, W)`` in [0, 1]), one row per image.

    Columns may hold different numbers of images; the grid has as many rows as the shortest.
    """
    if not columns:
        raise ValueError("columns: expected at least one column of images")
    n = max(1, min(len(images) for images in columns.values()))
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * n), layout="constrained")
    axes = fig.subplots(n, len(columns), squeeze=False)
    for j, (title, images) in enumerate(columns.items()):
        axes[0][j].set_title(title, fontsize=8)
        for i in range(n):
            axes[i][j].set_axis_off()
            if i < len(images):
                axes[i][j].imshow(images[i].clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    return save(fig, path)
