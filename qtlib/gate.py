"""Gating: the dual-drop test (paper eq. 2) and the top-k memory bank (eq. 3).

Pure pandas/numpy and vectorized: a million ledger rows gate in seconds.

Dual-drop, per image with labels k = 1..K scored by metrics m = 1..M
(normalized scores s[k, m] in [0, 1], population variances):

* test 1, consistency across metrics: ``Var_m(s[k, :]) < tau1`` for every k;
* test 2, robustness across augmentations: ``Var_k(s[:, m]) < tau2`` for every m.

If any test fails the whole set of the image is dropped. A threshold is either a
number (the paper's strict ``<``) or ``"auto"``: the ``quantile`` of this round's
per-image maxima of that variance, and images strictly above it are dropped, so
``auto`` removes only the extreme tail (the paper's Fig. 1) and never drops an
image whose variance ties the quantile (e.g. all zeros for a one-metric ensemble).

Images with a non-ok status, a NaN/inf score or a missing augmentation are
marked ``invalid``, counted, and never enter the bank.

Memory bank: per image, the top ``bank_size`` by S of the previous bank and this
round's surviving labels. Ties are broken deterministically: newer round first
(a later teacher is the better-trained one), then shard, index and augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from qtlib.config import GateConfig
from qtlib.layout import label_store_column
from qtlib.ledger import STATUS_OK, metrics_of

KEPT, DROPPED, INVALID = "kept", "dropped", "invalid"


def gate_schema(metrics: list[str]) -> pa.Schema:
    """Schema of ``gate.parquet``: one row per image with every number behind its decision."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("round", pa.int32(), nullable=False),
            pa.field("n_labels", pa.int32(), nullable=False),
            pa.field("var_metrics_max", pa.float64()),
            *[pa.field(f"var_aug_{m}", pa.float64()) for m in metrics],
            pa.field("var_aug_max", pa.float64()),
            pa.field("tau1", pa.float64(), nullable=False),
            pa.field("tau2", pa.float64(), nullable=False),
            pa.field("pass_metrics", pa.bool_(), nullable=False),
            pa.field("pass_aug", pa.bool_(), nullable=False),
            pa.field("decision", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
        ],
        metadata={"qtlib.table": "gate"},
    )


def bank_schema(metrics: list[str]) -> pa.Schema:
    """Schema of ``bank.parquet``: one row per kept label, with pointers and provenance."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("source_index", pa.int32(), nullable=False),
            pa.field("rank", pa.int8(), nullable=False),
            pa.field("store", pa.string(), nullable=False),
            pa.field("round", pa.int32(), nullable=False),
            pa.field("shard", pa.int32(), nullable=False),
            pa.field("index", pa.int32(), nullable=False),
            pa.field("aug_index", pa.int8(), nullable=False),
            pa.field("augmentation", pa.string(), nullable=False),
            pa.field("S", pa.float64(), nullable=False),
            pa.field("blocks_S", pa.list_(pa.float32())),
            *[pa.field(f"norm_{m}", pa.float64()) for m in metrics],
            pa.field("teacher_hash", pa.string(), nullable=False),
        ],
        metadata={"qtlib.table": "bank"},
    )


@dataclass(frozen=True)
class GateResult:
    """Decisions per image, the new bank, the thresholds used and counts per decision."""

    decisions: pd.DataFrame
    bank: pd.DataFrame
    tau1: float
    tau2: float
    counts: dict[str, int]


def _threshold(value: float | str, observed: np.ndarray, quantile: float) -> tuple[float, bool]:
    """Resolve a threshold; returns (tau, inclusive). ``auto`` thresholds keep values equal to tau."""
    if value != "auto":
        return float(value), False
    if observed.size == 0:
        return float("inf"), True
    return float(np.quantile(observed, quantile)), True


def _per_image_numbers(ledger: pd.DataFrame, metrics: list[str], n_aug: int) -> pd.DataFrame:
    norm = ledger[[f"norm_{m}" for m in metrics]].to_numpy(dtype=np.float64)
    finite = np.isfinite(norm).all(axis=1) & np.isfinite(ledger["S"].to_numpy(dtype=np.float64))
    ok = finite & (ledger["status"].astype(str).to_numpy() == STATUS_OK)
    work = pd.DataFrame({"image_id": ledger["image_id"].to_numpy(), "ok": ok,
                         "var_metrics": norm.var(axis=1) if metrics else np.zeros(len(ledger))})
    for j, m in enumerate(metrics):
        work[m] = norm[:, j]
    groups = work.groupby("image_id", sort=True, observed=True)
    per = pd.DataFrame({
        "n_labels": groups.size(),
        "all_ok": groups["ok"].all(),
        "var_metrics_max": groups["var_metrics"].max(),
    })
    aug_var = groups[metrics].var(ddof=0) if metrics else pd.DataFrame(index=per.index)
    for m in metrics:
        per[f"var_aug_{m}"] = aug_var[m]
    per["var_aug_max"] = aug_var.max(axis=1) if metrics else 0.0
    per["valid"] = per["all_ok"] & (per["n_labels"] == n_aug)
    return per


def dual_drop(ledger: pd.DataFrame, cfg: GateConfig, n_aug: int) -> tuple[pd.DataFrame, float, float]:
    """Apply eq. (2) to one round's ledger; return per-image decisions and the thresholds used."""
    metrics = metrics_of(ledger.columns)
    per = _per_image_numbers(ledger, metrics, n_aug)
    valid = per["valid"].to_numpy()
    v1 = per["var_metrics_max"].to_numpy()
    v2 = per["var_aug_max"].to_numpy(dtype=np.float64)
    tau1, incl1 = _threshold(cfg.tau1, v1[valid], cfg.quantile)
    tau2, incl2 = _threshold(cfg.tau2, v2[valid], cfg.quantile)
    pass1 = (v1 <= tau1) if incl1 else (v1 < tau1)
    pass2 = (v2 <= tau2) if incl2 else (v2 < tau2)
    if not cfg.enabled:
        pass1 = np.ones_like(pass1)
        pass2 = np.ones_like(pass2)
    decision = np.where(~valid, INVALID, np.where(pass1 & pass2, KEPT, DROPPED))
    reason = np.full(len(per), "", dtype=object)
    reason[~pass1] = "tau1"
    reason[~pass2] = "tau2"
    reason[~pass1 & ~pass2] = "tau1+tau2"
    incomplete = per["n_labels"].to_numpy() != n_aug
    reason[~valid] = "nan_or_failed"
    reason[incomplete] = "incomplete"
    out = per.reset_index()
    out["round"] = int(ledger["round"].iloc[0]) if len(ledger) else 0
    out["tau1"], out["tau2"] = tau1, tau2
    out["pass_metrics"], out["pass_aug"] = pass1 & valid, pass2 & valid
    out["decision"], out["reason"] = decision, reason
    return out, tau1, tau2


def _candidates(ledger: pd.DataFrame, kept_ids: pd.Index, metrics: list[str]) -> pd.DataFrame:
    cand = ledger[ledger["image_id"].isin(kept_ids)].copy()
    cand["store"] = label_store_column(cand["round"].to_numpy(), cand["shard"].to_numpy())
    cols = ["image_id", "source_index", "store", "round", "shard", "index", "aug_index", "augmentation",
            "S", "blocks_S", *[f"norm_{m}" for m in metrics], "teacher_hash"]
    return cand[cols]


def update_bank(previous: pd.DataFrame | None, candidates: pd.DataFrame, bank_size: int) -> pd.DataFrame:
    """Eq. (3): per image, the top ``bank_size`` of ``previous`` U ``candidates`` by S (deterministic ties)."""
    parts = [candidates] if previous is None or previous.empty else [previous.drop(columns="rank"), candidates]
    pool = pd.concat(parts, ignore_index=True)
    pool = pool[np.isfinite(pool["S"].to_numpy(dtype=np.float64))]
    # A label already in the bank may come back as a candidate only if a round is re-gated; keep one copy.
    pool = pool.drop_duplicates(subset=["store", "index", "aug_index"], keep="first")
    pool = pool.sort_values(["image_id", "S", "round", "shard", "index", "aug_index"],
                            ascending=[True, False, False, True, True, True], kind="mergesort")
    pool["rank"] = pool.groupby("image_id", sort=False).cumcount()
    bank = pool[pool["rank"] < bank_size].reset_index(drop=True)
    bank["rank"] = bank["rank"].astype(np.int8)
    return bank


def gate_round(ledger: pd.DataFrame, previous_bank: pd.DataFrame | None, cfg: GateConfig, n_aug: int) -> GateResult:
    """Dual-drop one round's ledger, then update the memory bank.

    Args:
        ledger: this round's ledger rows (all shards), as written by labeling.
        previous_bank: bank of round r-1 (None or empty for round 0).
        cfg: thresholds, quantile, bank size and the drop switch.
        n_aug: augmentations per image (a complete set has this many rows).

    Returns:
        :class:`GateResult` with per-image decisions, the new bank, tau1, tau2, counts.
    """
    metrics = metrics_of(ledger.columns)
    decisions, tau1, tau2 = dual_drop(ledger, cfg, n_aug)
    kept = pd.Index(decisions.loc[decisions["decision"] == KEPT, "image_id"])
    bank = update_bank(previous_bank, _candidates(ledger, kept, metrics), cfg.bank_size)
    counts = {d: int((decisions["decision"] == d).sum()) for d in (KEPT, DROPPED, INVALID)}
    counts["nan_score_rows"] = int((~np.isfinite(ledger["S"].to_numpy(dtype=np.float64))).sum())
    counts["bank_rows"] = len(bank)
    return GateResult(decisions, bank, tau1, tau2, counts)


def read_bank(path: str | Path) -> pd.DataFrame:
    """Read a ``bank.parquet``."""
    return pd.read_parquet(path)


def run_gate(
    ledger_paths: list[str | Path],
    previous_bank: str | Path | None,
    cfg: GateConfig,
    n_aug: int,
    gate_out: str | Path,
    bank_out: str | Path,
) -> GateResult:
    """The gate stage: read ledgers (+ previous bank), write ``gate.parquet`` and ``bank.parquet`` atomically."""
    from qtlib.ledger import read_ledger, write_table

    ledger = read_ledger(ledger_paths)
    prev = read_bank(previous_bank) if previous_bank else None
    result = gate_round(ledger, prev, cfg, n_aug)
    metrics = metrics_of(ledger.columns)
    gschema, bschema = gate_schema(metrics), bank_schema(metrics)
    write_table(result.decisions[gschema.names], gate_out, gschema)
    write_table(result.bank[bschema.names], bank_out, bschema)
    return result
