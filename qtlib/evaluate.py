"""The evaluate stage: final student at every condition level vs its teacher, tables and plots.

The evaluation panel is a list of no-reference metrics that should include
metrics NOT used in training (a reward-hacking check: a student that games
BRISQUE/NIQE but not PIQE shows it here). Where the test set has clean ground
truth, PSNR and SSIM (pyiqa, full-reference) are added.

Outputs: ``metrics.parquet`` (one row per image x method x level), ``summary.md``
(means per method and level, Markdown) and ``plots/*.png``: controllability
curve, per-round score histograms, drop rates, bank mean S by round, and a grid
of example restorations (degraded | teacher | student@top | ground truth).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from qtlib.config import EvaluateConfig, IQAConfig, Member  # noqa: E402
from qtlib.data import ImageStore  # noqa: E402
from qtlib.iqa import CATALOG, Ensemble, create_metric  # noqa: E402
from qtlib.ledger import read_ledger, write_table  # noqa: E402
from qtlib.models import ScoreConditioned, load_model  # noqa: E402

log = logging.getLogger(__name__)
FR_METRICS = ("psnr", "ssim")


@dataclass(frozen=True)
class EvalResult:
    metrics: Path
    summary: Path
    plots: list[Path]


def _restore(model: torch.nn.Module, x: torch.Tensor, level: float | None, batch: int) -> torch.Tensor:
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        outs.append(model(xb, level) if level is not None else model(xb))
    return torch.cat(outs).clamp(0, 1)


def _is_conditioned(model: torch.nn.Module) -> bool:
    return isinstance(model, ScoreConditioned)


def score_panel(images: torch.Tensor, panel: Ensemble, clean: torch.Tensor | None, fr: dict) -> dict[str, np.ndarray]:
    """Raw panel scores (and PSNR/SSIM against ``clean`` when given) for a batch of images."""
    out = {m: v.double().cpu().numpy() for m, v in panel.score(images).raw.items()}
    if clean is not None:
        with torch.no_grad():
            for name, metric in fr.items():
                out[name] = metric(images, clean).double().flatten().cpu().numpy()
    return out


def run_restorations(student_ckpt: str | Path, teacher_ckpt: str | Path, test_dir: str | Path,
                     cfg: EvaluateConfig, device: str = "cpu", batch: int = 4) -> tuple[pd.DataFrame, dict]:
    """Restore the test set (student at each level, teacher at the top) and score every output."""
    test_dir = Path(test_dir)
    degraded = ImageStore(test_dir / "degraded.zarr")
    clean_path = test_dir / "clean.zarr"
    rows = np.arange(len(degraded.ids))
    x = degraded.read_tensor(rows).to(device)
    gt = ImageStore(clean_path).read_tensor(rows).to(device) if clean_path.exists() else None
    panel = Ensemble(IQAConfig(ensemble=tuple(Member(m, 1.0) for m in cfg.panel)), device=device)
    fr = {m: create_metric(m, device) for m in FR_METRICS} if gt is not None else {}
    student = load_model(student_ckpt, use_ema=False, device=device)
    teacher = load_model(teacher_ckpt, use_ema=True, device=device)
    runs: list[tuple[str, float | None, torch.nn.Module | None]] = [("degraded", None, None)]
    top = max(cfg.levels)
    runs.append(("teacher", top if _is_conditioned(teacher) else None, teacher))
    levels = cfg.levels if _is_conditioned(student) else (None,)
    runs += [("student", lvl, student) for lvl in levels]
    frames, examples = [], {"degraded": x.cpu(), "clean": None if gt is None else gt.cpu()}
    with torch.no_grad():
        for method, level, model in runs:
            y = x if model is None else _restore(model, x, level, batch)
            scores = score_panel(y, panel, gt, fr)
            frame = pd.DataFrame({"image_id": list(degraded.ids), "method": method,
                                  "level": np.nan if level is None else float(level), **scores})
            frames.append(frame)
            if method == "teacher" or (method == "student" and level in (None, top)):
                examples[method] = y.cpu()
    return pd.concat(frames, ignore_index=True), examples


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean of every score per (method, level)."""
    cols = [c for c in metrics.columns if c not in ("image_id", "method", "level")]
    return metrics.groupby(["method", "level"], dropna=False, sort=False)[cols].mean().reset_index()


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_controllability(summary: pd.DataFrame, panel: tuple[str, ...], path: Path) -> Path:
    cols = [m for m in panel if m in summary.columns] + [m for m in FR_METRICS if m in summary.columns]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3), squeeze=False)
    stu = summary[summary["method"] == "student"].sort_values("level")
    for ax, col in zip(axes[0], cols, strict=True):
        ax.plot(stu["level"], stu[col], "o-", label="student")
        for method, style in (("teacher", "--"), ("degraded", ":")):
            val = summary.loc[summary["method"] == method, col]
            if len(val):
                ax.axhline(float(val.iloc[0]), linestyle=style, color="gray" if method == "degraded" else "C1",
                           label=method)
        ax.set_xlabel("condition level")
        better = "lower" if col in CATALOG and CATALOG[col].lower_better else "higher"
        ax.set_title(f"{col} ({better} is better)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Controllability: panel score vs condition level")
    return _save(fig, path)


def plot_rounds(ledger: pd.DataFrame, gates: pd.DataFrame, banks: pd.DataFrame, out: Path) -> list[Path]:
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r, group in ledger.groupby("round"):
        ax.hist(group["S"].dropna(), bins=30, alpha=0.5, label=f"round {r}")
    ax.set_xlabel("ensemble score S (0..10)")
    ax.set_ylabel("pseudo-labels")
    ax.legend(fontsize=7)
    ax.set_title("Pseudo-label scores per round")
    paths.append(_save(fig, out / "round_histograms.png"))

    rates = gates.groupby("round")["decision"].value_counts(normalize=True).unstack(fill_value=0.0)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    rates.plot.bar(stacked=True, ax=ax)
    ax.set_ylabel("fraction of images")
    ax.set_title("Dual-drop decisions per round")
    paths.append(_save(fig, out / "drop_rates.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    mean_s = banks.groupby("bank_round")["S"].mean()
    ax.plot(mean_s.index, mean_s.values, "o-")
    ax.set_xlabel("round")
    ax.set_ylabel("mean S in bank")
    ax.set_title("Memory bank mean score by round")
    paths.append(_save(fig, out / "bank_mean_S.png"))
    return paths


def plot_examples(examples: dict, n: int, path: Path) -> Path:
    cols = [c for c in ("degraded", "teacher", "student", "clean") if examples.get(c) is not None]
    n = min(n, len(examples["degraded"]))
    fig, axes = plt.subplots(max(n, 1), len(cols), figsize=(2.2 * len(cols), 2.2 * max(n, 1)), squeeze=False)
    titles = {"degraded": "degraded", "teacher": "teacher", "student": "student @ top", "clean": "ground truth"}
    for i in range(n):
        for j, c in enumerate(cols):
            axes[i][j].imshow(examples[c][i].permute(1, 2, 0).numpy())
            axes[i][j].set_axis_off()
            if i == 0:
                axes[i][j].set_title(titles[c], fontsize=8)
    return _save(fig, path)


def to_markdown(summary: pd.DataFrame) -> str:
    cols = list(summary.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in summary.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append("" if isinstance(v, float) and math.isnan(v) else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(student_ckpt: str | Path, teacher_ckpt: str | Path, test_dir: str | Path, ledgers: list[str | Path],
             gates: list[str | Path], banks: list[str | Path], out_dir: str | Path, cfg: EvaluateConfig,
             device: str = "cpu") -> EvalResult:
    """Run the whole evaluation and write tables and plots under ``out_dir``."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metrics, examples = run_restorations(student_ckpt, teacher_ckpt, test_dir, cfg, device)
    metrics_path = write_table(metrics, out_dir / "metrics.parquet", _schema_of(metrics))
    summary = summarize(metrics)
    summary_path = out_dir / "summary.md"
    summary_path.write_text("# Evaluation\n\nMean scores on the test set per method and condition level "
                            f"(panel: {', '.join(cfg.panel)}).\n\n" + to_markdown(summary))
    ledger = read_ledger(ledgers)
    gate_frame = pd.concat([pd.read_parquet(p) for p in gates], ignore_index=True)
    bank_frame = pd.concat([pd.read_parquet(p).assign(bank_round=r) for r, p in enumerate(banks)], ignore_index=True)
    paths = [plot_controllability(summary, cfg.panel, plots / "controllability.png")]
    paths += plot_rounds(ledger, gate_frame, bank_frame, plots)
    paths.append(plot_examples(examples, cfg.n_examples, plots / "examples.png"))
    return EvalResult(metrics_path, summary_path, paths)


def _schema_of(frame: pd.DataFrame):
    import pyarrow as pa

    return pa.Schema.from_pandas(frame, preserve_index=False)
