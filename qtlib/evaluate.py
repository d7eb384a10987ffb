"""The evaluate stage: does the final student beat the model it started from, and does its condition work?

On one test set, four methods are restored and scored:

- ``degraded``: the input itself (level NaN);
- ``pretrained``: ``results/pretrain/model.pt``, the real teacher_0 and the reference;
- ``teacher``: the final EMA teacher (its EMA weights);
- ``student``: the final student with its STUDENT weights (those the score
  conditioning was trained on, not the EMA copy), at every level of
  ``evaluate.levels``.

Column ``level`` is the score condition given to the model: NaN for the input
and for unconditioned models; the pretrained model and the teacher run at their
top score (``model_config.conditioning.top_score`` of their checkpoint). Every
output is scored by the evaluation panel, a list of no-reference metrics that
should include metrics NOT used in training (a student that games BRISQUE/NIQE
but not PIQE shows it here), and by PSNR and SSIM (pyiqa, full-reference) when
the test set has clean ground truth.

Outputs under ``out_dir``: ``metrics.parquet`` (one row per image x method x
level, schema :func:`metrics_schema`), ``summary.md`` (means with the pretrained
row as the reference, differences to it, Spearman(level, score) of the student;
with the rounds' headroom tables, a last section on what their pseudo-labels could
give, :mod:`qtlib.headroom_table`) and ``plots/*.png`` (:mod:`qtlib.plots`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from qtlib import plots
from qtlib.config import EvaluateConfig, IQAConfig, Member
from qtlib.config.types import ConditioningConfig
from qtlib.data import ImageStore
from qtlib.data.store import open_pair
from qtlib.headroom_table import read_headroom, render_section
from qtlib.headroom_table import summarize as summarize_headroom
from qtlib.iqa import Ensemble, create_metric, get_info
from qtlib.iqa.ensemble import check_images
from qtlib.ledger import read_ledger, write_table
from qtlib.models import load_checkpoint, load_model
from qtlib.restore import restore_tiled
from qtlib.runtime import file_hash
from qtlib.util.markdown import to_markdown

log = logging.getLogger(__name__)

FR_METRICS = ("psnr", "ssim")
#: the methods, in the order of every table
METHODS = ("degraded", "pretrained", "teacher", "student")
REFERENCE = "pretrained"
KEY_COLUMNS = ("image_id", "method", "level", "checkpoint_hash")
#: per-level means closer than this (relative) are float rounding, not control: Spearman is not reported
INERT_RTOL = 1e-5


def metrics_schema(panel: Sequence[str], reference: bool) -> pa.Schema:
    """The pyarrow schema of ``metrics.parquet`` (the one place it is declared).

    =================  =======  ==========================================================
    column             type     meaning
    =================  =======  ==========================================================
    image_id           string   id of the test image (from ``qt prepare``)
    method             string   degraded, pretrained, teacher or student
    level              float64  score condition given to the model; null (NaN) for the
                                degraded input and for unconditioned models
    checkpoint_hash    string   sha256 (16 hex) of the checkpoint file; null for degraded
    <panel metric>     float64  raw pyiqa score, one column per panel metric
    psnr, ssim         float64  against the clean image (only when ground truth exists)
    =================  =======  ==========================================================

    Args:
        panel: the no-reference metrics of the evaluation panel, in column order.
        reference: the test set has clean ground truth (adds ``psnr``, ``ssim``).
    """
    scores = [*panel, *(FR_METRICS if reference else ())]
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("level", pa.float64()),
        pa.field("checkpoint_hash", pa.string()),
        *[pa.field(m, pa.float64()) for m in scores],
    ]
    return pa.schema(fields, metadata={"qtlib.table": "eval-metrics", "qtlib.metrics": ",".join(scores)})


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` wrote, and its two summary tables."""

    metrics: Path
    summary: Path
    plots: list[Path]
    means: pd.DataFrame
    controllability: pd.DataFrame


@dataclass(frozen=True)
class Candidate:
    """A model loaded from a checkpoint, with what its checkpoint says about its conditioning."""

    name: str
    model: nn.Module
    conditioning: ConditioningConfig
    path: Path
    checkpoint_hash: str
    weights: str

    @property
    def top_level(self) -> float | None:
        """The level a single-level method runs at: the top score when conditioned, else None."""
        return float(self.conditioning.top_score) if self.conditioning.enabled else None


@dataclass(frozen=True)
class Run:
    """One block of rows of ``metrics.parquet``: a model (None = the input) at one level (None = no condition)."""

    method: str
    level: float | None
    model: nn.Module | None = None
    checkpoint_hash: str | None = None


def load_candidate(name: str, path: str | Path, kind: str, use_ema: bool, device: str | torch.device) -> Candidate:
    """Load ``path`` (which must be a ``kind`` checkpoint) with its student or EMA weights."""
    path = Path(path)
    ckpt = load_checkpoint(path, kinds=(kind,))
    model = load_model(path, use_ema=use_ema, device=device, kinds=(kind,))
    weights = "EMA" if use_ema else ("student" if kind == "student" else "model")
    return Candidate(name, model, ckpt.model_config.conditioning, path, file_hash(path), weights)


def plan_runs(pretrained: Candidate, teacher: Candidate, student: Candidate, levels: Sequence[float]) -> list[Run]:
    """The runs of an evaluation: the input, pretrained and teacher at their top level, the student per level.

    Levels are evaluated in increasing order, each once.
    """
    if not levels:
        raise ValueError("evaluate.levels: expected at least one condition level")
    levels = sorted({float(lvl) for lvl in levels})
    runs = [Run("degraded", None)]
    for cand in (pretrained, teacher):
        runs.append(Run(cand.name, cand.top_level, cand.model, cand.checkpoint_hash))
    if not student.conditioning.enabled:
        log.warning("evaluate: the student is not score-conditioned; it is evaluated once, at no level")
        return [*runs, Run(student.name, None, student.model, student.checkpoint_hash)]
    top = student.conditioning.top_score
    if any(lvl > top for lvl in levels):
        log.warning("evaluate: levels above the student's top score %g are clamped to it", top)
    return [*runs, *(Run(student.name, lvl, student.model, student.checkpoint_hash) for lvl in levels)]


def restore_batch(run: Run, x: torch.Tensor, tile: int = 0, overlap: int = 32) -> torch.Tensor:
    """The run's output for ``x`` (the input itself for ``degraded``), clamped to [0, 1].

    Images whose longer side exceeds ``tile`` (0 = never) are restored tile by tile, one by one.
    """
    if run.model is None:
        return x
    if tile and max(x.shape[-2:]) > tile:
        level = run.level if run.level is not None else getattr(run.model, "top_score", 7.0)
        y = torch.stack([restore_tiled(run.model, img, level, tile, overlap) for img in x])
        return y.clamp(0, 1)
    score = None if run.level is None else torch.full((x.shape[0],), run.level, device=x.device)
    y = run.model(x, score)
    if y.shape != x.shape:
        raise ValueError(f"{run.method}: expected an output of shape {tuple(x.shape)}, got {tuple(y.shape)}")
    return y.clamp(0, 1)


class Scorer:
    """The evaluation panel (no-reference, raw scores) plus PSNR/SSIM against ground truth when given.

    Args:
        panel: no-reference metrics; full-reference ones are refused (they are added by ``reference``).
        iqa: the ``iqa`` config (batch size, downloads); its ensemble is replaced by the panel.
        reference: add PSNR and SSIM.
        device: where the metrics run.
    """

    def __init__(self, panel: Sequence[str], iqa: IQAConfig, reference: bool, device: str | torch.device) -> None:
        for m in panel:
            if get_info(m).needs_reference:
                raise ValueError(f"evaluate.panel: {m!r} is full-reference; PSNR and SSIM are added when the test "
                                 "set has clean images, list only no-reference metrics")
        cfg = dataclasses.replace(iqa, ensemble=tuple(Member(m, 1.0) for m in panel))
        self.panel = Ensemble(cfg, device=device)
        self.fr = {m: create_metric(m, device) for m in FR_METRICS} if reference else {}
        self.columns = [*panel, *self.fr]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, clean: torch.Tensor | None) -> dict[str, np.ndarray]:
        """Raw scores per column for ``(B, 3, H, W)`` images in [0, 1]; ``clean`` the same shape or None."""
        out = {m: v.double().cpu().numpy() for m, v in self.panel.score(images).raw.items()}
        if self.fr and clean is None:
            raise ValueError("clean: ground truth is needed for PSNR/SSIM, got None")
        for name, metric in self.fr.items():
            out[name] = metric(images, clean).double().flatten().cpu().numpy()
        return out


Batch = tuple[list[str], torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class EvalSet:
    """A prepared test folder: ``degraded.zarr`` and, when ground truth exists, ``clean.zarr`` (same ids)."""

    degraded: ImageStore
    clean: ImageStore | None

    @classmethod
    def open(cls, test_dir: str | Path) -> EvalSet:
        return cls(*open_pair(test_dir, clean=None))

    def batches(self, size: int, device: str | torch.device) -> Iterator[Batch]:
        """``(ids, degraded, clean or None)`` per batch, checked: (B, 3, H, W) float in [0, 1].

        Images keep their own size: a batch holds images of one size (bucketed by shape).
        """
        for rows, x in self.degraded.batches(size):
            gt = None if self.clean is None else self.clean.read_tensor(rows).to(device)
            check_images(x, "degraded")
            if gt is not None:
                check_images(gt, "clean")
            yield [self.degraded.ids[int(r)] for r in rows], x.to(device), gt


def _example_titles(runs: Sequence[Run]) -> dict[int, str]:
    """Run index -> column title of the example grid: the input, references, the student's extreme levels."""
    titles = {i: r.method for i, r in enumerate(runs) if r.method != "student"}
    stu = sorted((r.level or 0.0, i) for i, r in enumerate(runs) if r.method == "student")
    for _, i in {stu[0], stu[-1]} if stu else ():
        titles[i] = "student" if runs[i].level is None else f"student @ {runs[i].level:g}"
    return dict(sorted(titles.items()))


def _run_frame(run: Run, ids: list[str], scores: Mapping[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": ids, "method": run.method, "level": np.nan if run.level is None else run.level,
                         "checkpoint_hash": run.checkpoint_hash, **scores})


def run_restorations(runs: Sequence[Run], test: EvalSet, scorer: Scorer, batch_size: int, n_examples: int,
                     device: str | torch.device, tile: int = 0,
                     overlap: int = 32) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Restore and score the test set for every run; returns the metrics table and example images per title.

    The outputs of all runs for one batch of test images are scored in one panel call
    (pyiqa's metrics are per image, so this changes no score, only the number of calls).
    Examples come from the images of the first batch's size (a grid needs one size).
    """
    parts: list[list[pd.DataFrame]] = [[] for _ in runs]
    titles = _example_titles(runs)
    shown: dict[str, list[torch.Tensor]] = {t: [] for t in titles.values()}
    seen, shape = 0, None
    with torch.no_grad():
        for ids, x, gt in test.batches(batch_size, device):
            outs = [restore_batch(run, x, tile, overlap) for run in runs]
            scores = scorer(torch.cat(outs), None if gt is None else gt.repeat(len(runs), 1, 1, 1))
            for i, run in enumerate(runs):
                part = {m: v[i * len(ids):(i + 1) * len(ids)] for m, v in scores.items()}
                parts[i].append(_run_frame(run, ids, part))
            shape = shape or tuple(x.shape[-2:])
            keep = max(0, n_examples - seen) if tuple(x.shape[-2:]) == shape else 0
            if keep:
                for i, title in titles.items():
                    shown[title].append(outs[i][:keep].cpu())
                if gt is not None:
                    shown.setdefault("ground truth", []).append(gt[:keep].cpu())
                seen += min(keep, len(ids))
    examples = {t: torch.cat(v) for t, v in shown.items() if v}
    return pd.concat([f for p in parts for f in p], ignore_index=True), examples


def score_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in (*KEY_COLUMNS, "n")]


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean of every score per (method, level), with the image count ``n``, in :data:`METHODS` order."""
    cols = score_columns(metrics)
    groups = metrics.groupby(["method", "level"], dropna=False, sort=False)
    means = groups[cols].mean().join(groups.size().rename("n")).reset_index()
    means["_order"] = means["method"].map({m: i for i, m in enumerate(METHODS)})
    means = means.sort_values(["_order", "level"], na_position="first", kind="stable").drop(columns="_order")
    return means[["method", "level", "n", *cols]].reset_index(drop=True)


def differences(means: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Every non-reference row's means minus the reference method's means (columns ``d<METRIC> vs <ref>``)."""
    cols = score_columns(means)
    ref = means.loc[means["method"] == reference, cols]
    if len(ref) != 1:
        raise ValueError(f"means: expected one {reference!r} row, got {len(ref)}")
    rest = means[means["method"] != reference].reset_index(drop=True)
    diff = rest[cols] - ref.iloc[0]
    diff.columns = [f"d{c.upper()} vs {reference}" for c in cols]
    return pd.concat([rest[["method", "level"]], diff], axis=1)


def controllability(means: pd.DataFrame, lower_better: Mapping[str, bool]) -> pd.DataFrame:
    """Per metric: Spearman(level, student's per-level mean), the sign a working condition gives, the span.

    Rho is NaN when fewer than two levels were evaluated or the per-level means agree
    to within :data:`INERT_RTOL` of their magnitude (float rounding of an inert
    condition would otherwise give a rho of +-1); the span (max - min of the
    per-level means) shows how inert.
    """
    stu = means[(means["method"] == "student") & means["level"].notna()].sort_values("level")
    rows = []
    for col in score_columns(means):
        values = stu[col].astype(float)
        span = float(values.max() - values.min()) if len(stu) else math.nan
        varies = stu["level"].nunique() > 1 and span > INERT_RTOL * float(values.abs().max())
        # Spearman = Pearson of the ranks (no scipy needed)
        rho = float(stu["level"].rank().corr(values.rank())) if varies else math.nan
        rows.append({"metric": col, "better": "lower" if lower_better[col] else "higher",
                     "expected sign": "-" if lower_better[col] else "+", "levels": len(stu),
                     "Spearman(level, mean)": rho, "span (max - min)": span})
    return pd.DataFrame(rows)


def _verdict(diffs: pd.DataFrame) -> str:
    """One sentence on the student vs the reference, by PSNR when ground truth exists."""
    col = f"dPSNR vs {REFERENCE}"
    stu = diffs[diffs["method"] == "student"]
    if col not in diffs.columns or stu.empty:
        return "No ground truth: judge the student by the no-reference differences below."
    best = stu.loc[stu[col].idxmax()]
    wins = int((stu[col] > 0).sum())
    level = "no level" if math.isnan(best["level"]) else f"level {best['level']:g}"
    return (f"The student beats the pretrained model in PSNR at {wins} of {len(stu)} levels; "
            f"best: {level}, {best[col]:+.3f} dB.")


_LEVEL_NOTE = ("`level` is the score condition given to the model (empty for the degraded input and for "
               "unconditioned models; the pretrained model and the teacher run at their top score).")
_DIFF_NOTE = "For lower-is-better metrics a negative difference is an improvement."
_CONTROL_NOTE = ("Spearman correlation of the condition level with the student's per-level mean. A condition that "
                 "works gives the expected sign; empty = fewer than two levels, or per-level means equal to within "
                 f"{INERT_RTOL:g} relative (float rounding: the condition is inert).")


def render_summary(means: pd.DataFrame, diffs: pd.DataFrame, control: pd.DataFrame,
                   candidates: Sequence[Candidate], n_images: int, lower_better: Mapping[str, bool]) -> str:
    """The text of ``summary.md``."""
    shown = means.assign(method=means["method"].replace({REFERENCE: f"**{REFERENCE} (reference)**"}))
    ckpts = pd.DataFrame([{"method": c.name, "weights": c.weights, "checkpoint": str(c.path),
                           "sha256": c.checkpoint_hash} for c in candidates])
    direction = ", ".join(f"{m} {'lower' if lower_better[m] else 'higher'}" for m in score_columns(means))
    return "\n".join([
        "# Evaluation", "", f"{n_images} test images. Better is: {direction}. {_LEVEL_NOTE}", "",
        to_markdown(ckpts),
        "## Mean scores per method and level", "", to_markdown(shown),
        "## Difference to the pretrained model (method mean - pretrained mean)", "",
        f"{_verdict(diffs)} {_DIFF_NOTE}", "", to_markdown(diffs),
        "## Controllability of the student", "", _CONTROL_NOTE, "", to_markdown(control),
    ])


def _round_plots(ledgers: Sequence[str | Path], gates: Sequence[str | Path], banks: Sequence[str | Path],
                 out: Path) -> list[Path]:
    paths = []
    if ledgers:
        paths.append(plots.plot_score_histograms(read_ledger(ledgers), out / "round_histograms.png"))
    if gates:
        frame = pd.concat([pd.read_parquet(p) for p in gates], ignore_index=True)
        paths.append(plots.plot_drop_rates(frame, out / "drop_rates.png"))
    if banks:
        frame = pd.concat([pd.read_parquet(p).assign(bank_round=r) for r, p in enumerate(banks)], ignore_index=True)
        paths.append(plots.plot_bank_mean_score(frame, out / "bank_mean_S.png"))
    return paths


def evaluate(pretrained: str | Path, teacher: str | Path, student: str | Path, test_dir: str | Path,
             out_dir: str | Path, cfg: EvaluateConfig, *, iqa: IQAConfig | None = None,
             ledgers: Sequence[str | Path] = (), gates: Sequence[str | Path] = (), banks: Sequence[str | Path] = (),
             headrooms: Sequence[str | Path] = (), device: str | torch.device = "cpu",
             batch_size: int = 4) -> EvalResult:
    """Evaluate degraded input, pretrained model, final teacher and final student; write tables and plots.

    Args:
        pretrained: ``results/pretrain/model.pt`` (a ``pretrain`` checkpoint): teacher_0, the reference.
        teacher: the final ``teacher.pt`` (its EMA weights).
        student: the final ``student.pt`` (its student weights, at every level of ``cfg.levels``).
        test_dir: a prepared test folder (``degraded.zarr``, optional ``clean.zarr``).
        out_dir: receives ``metrics.parquet``, ``summary.md`` and ``plots/``.
        cfg: the ``evaluate`` config (levels, panel, number of examples).
        iqa: the ``iqa`` config (batch size, downloads); None = defaults.
        ledgers, gates, banks: the rounds' tables, for the per-round plots (empty = no such plot).
        headrooms: the rounds' ``headroom.parquet`` (empty = no headroom section in ``summary.md``).
        device: where models and metrics run.
        batch_size: test images per forward pass.

    Returns:
        :class:`EvalResult`.
    """
    out_dir, test = Path(out_dir), EvalSet.open(test_dir)
    cands = [load_candidate("pretrained", pretrained, "pretrain", False, device),
             load_candidate("teacher", teacher, "teacher", True, device),
             load_candidate("student", student, "student", False, device)]
    scorer = Scorer(cfg.panel, iqa or IQAConfig(), test.clean is not None, device)
    metrics, examples = run_restorations(plan_runs(*cands, cfg.levels), test, scorer, batch_size, cfg.n_examples,
                                         device, cfg.tile, cfg.tile_overlap)
    metrics_path = write_table(metrics, out_dir / "metrics.parquet",
                               metrics_schema(cfg.panel, test.clean is not None))
    lower_better = {m: get_info(m).lower_better for m in scorer.columns}
    means = summarize(metrics)
    control = controllability(means, lower_better)
    summary_path = out_dir / "summary.md"
    text = render_summary(means, differences(means), control, cands, len(test.degraded.ids), lower_better)
    if headrooms:
        text += "\n" + render_section(summarize_headroom(read_headroom(headrooms)), to_markdown)
    summary_path.write_text(text)
    plot_dir = out_dir / "plots"
    paths = [plots.plot_controllability(means, scorer.columns, lower_better, plot_dir / "controllability.png")]
    paths += _round_plots(ledgers, gates, banks, plot_dir)
    if cfg.n_examples > 0:
        paths.append(plots.plot_examples(examples, plot_dir / "examples.png"))
    log.info("evaluate: %d rows, summary in %s", len(metrics), summary_path)
    return EvalResult(metrics_path, summary_path, paths, means, control)
