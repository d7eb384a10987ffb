"""Dual-drop (eq. 2) and the memory bank (eq. 3) on small hand-checkable ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from qtlib.config import GateConfig
from qtlib.gate import bank_schema, dual_drop, gate_round, gate_schema, run_gate, update_bank
from qtlib.ledger import LedgerWriter, ledger_schema, load, to_table, write_table

AUGS = ("hflip", "vflip", "rot90")


def make_ledger(norms: dict[str, list[tuple[float, float]]], round_: int = 0, shard: int = 0,
                s_offset: float = 0.0) -> pd.DataFrame:
    """A ledger with metrics a and b; S = 10 * mean of the normalized scores (+ offset)."""
    rows = []
    for i, (image_id, per_aug) in enumerate(sorted(norms.items())):
        for k, (a, b) in enumerate(per_aug):
            s = 10 * (a + b) / 2 + s_offset
            rows.append({
                "image_id": image_id, "source_index": i, "round": round_, "shard": shard, "index": i,
                "aug_index": k, "augmentation": AUGS[k], "raw_a": a * 100, "raw_b": b,
                "norm_a": a, "norm_b": b, "S": s, "blocks_S": [s] * 4, "teacher_hash": f"t{round_}",
                "metric_versions": json.dumps({"pyiqa": "x"}), "qtlib_version": "test",
                "status": "ok" if np.isfinite(s) else "nan_score",
            })
    return pd.DataFrame(rows)


# Hand-computed (population variances):
# A: per-PL Var over metrics = 0.01, 0, 0.04 (max 0.04); per-metric Var over augs = 0.00667, 0.00667.
# B: first PL (0.2, 0.9) has Var over metrics 0.1225 -> fails tau1 = 0.05; Var over augs 0.00056 passes.
# C: metrics agree on every PL (Var 0) but metric a over augs (0.1, 0.5, 0.9) has Var 0.10667 -> fails tau2.
HAND = {
    "A": [(0.5, 0.7), (0.6, 0.6), (0.4, 0.8)],
    "B": [(0.2, 0.9), (0.25, 0.85), (0.2, 0.9)],
    "C": [(0.1, 0.1), (0.5, 0.5), (0.9, 0.9)],
}


def test_dual_drop_matches_hand_computed_example() -> None:
    decisions, tau1, tau2 = dual_drop(make_ledger(HAND), GateConfig(tau1=0.05, tau2=0.01), n_aug=3)
    d = decisions.set_index("image_id")
    assert (tau1, tau2) == (0.05, 0.01)
    assert d.loc["A", "var_metrics_max"] == pytest.approx(0.04)
    assert d.loc["A", "var_aug_a"] == pytest.approx(0.02 / 3)
    assert d.loc["B", "var_metrics_max"] == pytest.approx(0.1225)
    assert d.loc["C", "var_aug_a"] == pytest.approx(0.32 / 3)
    assert d["decision"].to_dict() == {"A": "kept", "B": "dropped", "C": "dropped"}
    assert d["reason"].to_dict() == {"A": "", "B": "tau1", "C": "tau2"}


def test_whole_set_dropped_and_drop_switch() -> None:
    result = gate_round(make_ledger(HAND), None, GateConfig(tau1=0.05, tau2=0.01), n_aug=3)
    assert set(result.bank["image_id"]) == {"A"} and len(result.bank) == 3
    off = gate_round(make_ledger(HAND), None, GateConfig(tau1=0.05, tau2=0.01, enabled=False), n_aug=3)
    assert set(off.bank["image_id"]) == {"A", "B", "C"}


def test_auto_thresholds_drop_the_configured_tail() -> None:
    rng = np.random.default_rng(0)
    n = 400
    spread = rng.uniform(0, 0.3, size=n)  # per-image spread of metric b around metric a
    norms = {f"img{i:04d}": [(0.5, 0.5 + spread[i] * s) for s in (1.0, 0.5, 0.0)] for i in range(n)}
    for q in (0.9, 0.95, 0.99):
        decisions, tau1, _ = dual_drop(make_ledger(norms), GateConfig(quantile=q), n_aug=3)
        dropped = int((decisions["decision"] == "dropped").sum())
        # Test 1 alone drops exactly the images strictly above the q-quantile of its per-image maxima;
        # test 2 drops the same images here (its variance is monotone in the same spread).
        expected = int((decisions["var_metrics_max"] > tau1).sum())
        assert dropped == expected
        assert abs(dropped - (1 - q) * n) <= 2


def test_auto_threshold_never_drops_ties_at_zero() -> None:
    norms = {f"i{i}": [(0.5, 0.5)] * 3 for i in range(5)}
    decisions, tau1, tau2 = dual_drop(make_ledger(norms), GateConfig(), n_aug=3)
    assert tau1 == 0.0 and tau2 == 0.0
    assert (decisions["decision"] == "kept").all()


def test_nan_scores_excluded_and_counted() -> None:
    ledger = make_ledger(HAND)
    ledger.loc[(ledger["image_id"] == "A") & (ledger["aug_index"] == 1), ["norm_a", "S"]] = np.nan
    ledger.loc[(ledger["image_id"] == "A") & (ledger["aug_index"] == 1), "status"] = "nan_score"
    result = gate_round(ledger, None, GateConfig(tau1=1.0, tau2=1.0), n_aug=3)
    d = result.decisions.set_index("image_id")
    assert d.loc["A", "decision"] == "invalid" and d.loc["A", "reason"] == "nan_or_failed"
    assert "A" not in set(result.bank["image_id"])
    assert result.counts["invalid"] == 1 and result.counts["nan_score_rows"] == 1


def test_incomplete_sets_are_invalid() -> None:
    ledger = make_ledger(HAND)
    ledger = ledger[~((ledger["image_id"] == "B") & (ledger["aug_index"] == 2))]
    result = gate_round(ledger, None, GateConfig(tau1=1.0, tau2=1.0), n_aug=3)
    assert result.decisions.set_index("image_id").loc["B", "reason"] == "incomplete"


def test_bank_keeps_top3_across_rounds_with_provenance() -> None:
    cfg = GateConfig(tau1=1.0, tau2=1.0)
    r0 = gate_round(make_ledger(HAND, round_=0), None, cfg, n_aug=3)
    # Round 1: image A gets better labels (+1 on S) from shard 1; B and C worse ones.
    led1 = make_ledger(HAND, round_=1, shard=1, s_offset=1.0)
    led1.loc[led1["image_id"] != "A", "S"] -= 3.0
    r1 = gate_round(led1, r0.bank, cfg, n_aug=3)
    bank = r1.bank
    assert bank.groupby("image_id").size().max() <= 3
    a = bank[bank["image_id"] == "A"]
    assert set(a["round"]) == {1} and set(a["store"]) == {"round_1/labels/shard_1.zarr"}
    assert list(a["rank"]) == [0, 1, 2] and a["S"].is_monotonic_decreasing
    b = bank[bank["image_id"] == "B"]
    assert set(b["round"]) == {0}  # the old, better labels stay
    # Best possible: the kept labels are exactly the top 3 of the union.
    union = pd.concat([r0.bank, update_bank(None, led1.assign(store="x")[r0.bank.columns.drop("rank")], 3)])
    for image_id, group in bank.groupby("image_id"):
        best = sorted(union[union["image_id"] == image_id]["S"], reverse=True)[:3]
        assert sorted(group["S"], reverse=True) == pytest.approx(best)


def test_bank_ties_are_deterministic() -> None:
    cfg = GateConfig(tau1=1.0, tau2=1.0)
    flat = {"A": [(0.5, 0.5)] * 3}
    r0 = gate_round(make_ledger(flat, round_=0), None, cfg, n_aug=3)
    r1 = gate_round(make_ledger(flat, round_=1), r0.bank, cfg, n_aug=3)
    again = gate_round(make_ledger(flat, round_=1).sample(frac=1, random_state=3), r0.bank, cfg, n_aug=3)
    assert list(r1.bank["round"]) == [1, 1, 1]  # ties: the newer teacher wins
    pd.testing.assert_frame_equal(r1.bank, again.bank)


def test_run_gate_writes_schema_checked_parquet(tmp_path: Path) -> None:
    ledger = make_ledger(HAND)
    schema = ledger_schema(["a", "b"])
    (tmp_path / "round_0" / "ledger").mkdir(parents=True)
    path = write_table(ledger, tmp_path / "round_0" / "ledger" / "shard_0.parquet", schema)
    result = run_gate([path], None, GateConfig(tau1=0.05, tau2=0.01), 3,
                      tmp_path / "round_0" / "gate.parquet", tmp_path / "round_0" / "bank.parquet")
    assert pq.read_schema(tmp_path / "round_0" / "gate.parquet").equals(gate_schema(["a", "b"]), check_metadata=False)
    assert pq.read_schema(tmp_path / "round_0" / "bank.parquet").equals(bank_schema(["a", "b"]), check_metadata=False)
    assert result.counts["kept"] == 1
    loaded = load(tmp_path)
    assert len(loaded) == 9 and str(loaded["augmentation"].dtype) == "category"


def test_ledger_schema_is_enforced(tmp_path: Path) -> None:
    schema = ledger_schema(["a", "b"])
    ledger = make_ledger(HAND)
    with pytest.raises(ValueError, match="missing \\['raw_b'\\]"):
        to_table(ledger.drop(columns="raw_b"), schema)
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        to_table(ledger.assign(extra=1), schema)
    bad = ledger.assign(round="zero")
    with pytest.raises(Exception):
        to_table(bad, schema)
    # A failed streaming write leaves nothing behind.
    target = tmp_path / "shard_0.parquet"
    with pytest.raises(ValueError):
        with LedgerWriter(target, ["a", "b"]) as writer:
            writer.write(ledger)
            writer.write(ledger.drop(columns="S"))
    assert not target.exists() and not list(tmp_path.iterdir())
