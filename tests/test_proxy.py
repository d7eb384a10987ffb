"""The proxy benchmark harness (benchmarks/proxy/run.py): the merge and plan logic, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repo root on the path
    sys.path.insert(0, str(ROOT))

from benchmarks.proxy import run as proxy
from qtlib.config import load_config
from qtlib.headroom_table import headroom_schema
from qtlib.layout import Layout
from qtlib.ledger import write_table

PROXY = ROOT / "config" / "proxy.yaml"


@pytest.fixture(scope="module")
def spec() -> proxy.ProxySpec:
    return proxy.load_proxy(PROXY)


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


SIX = ("pretrained", "sup_only", "sup_aug", "plain_mt", "filter_mt", "qualiteacher")


def test_the_six_rows_change_only_the_method(spec: proxy.ProxySpec) -> None:
    """qualiteacher is config/config.yaml as shipped; the baselines change train.method and what it must
    switch off; sup_aug is sup_only plus the strong view on the pairs."""
    assert spec.tasks["rain"].rows[:6] == SIX
    assert spec.rows["pretrained"].reference == "pretrained"
    assert spec.rows["qualiteacher"].overrides == {}
    assert spec.rows["plain_mt"].overrides == {"train": {"method": "plain_mt"}}
    assert spec.rows["filter_mt"].overrides == {"train": {"method": "filter_mt"}}
    sup = {"train": {"method": "plain_mt", "losses": {"rec": {"weight": 0.0}, "per": {"weight": 0.0}}}}
    assert spec.rows["sup_only"].overrides == sup
    assert spec.rows["sup_aug"].overrides == {"train": {"method": "plain_mt", "losses": {
        "rec": {"weight": 0.0}, "per": {"weight": 0.0}, "sup": {"strong_view": True}}}}
    for row in SIX:
        assert spec.rows[row].seeds == (0, 1, 2), row


def test_table2_rows_accumulate_through_extends(spec: proxy.ProxySpec) -> None:
    switches = ("train.score_condition", "train.preference", "train.cropped", "gate.enabled")
    expected = {"a": (False, False, False, False), "b": (True, False, False, False), "c": (True, True, False, False),
                "d": (True, True, True, False), "e": (True, True, True, True)}
    for row, values in expected.items():
        assert tuple(_get(spec.rows[row].overrides, k) for k in switches) == values, row


def test_default_rain_plan_gives_every_row_one_budget(spec: proxy.ProxySpec, tmp_path: Path) -> None:
    plan = proxy.build_plan(spec, out=tmp_path)
    assert plan.task == "rain" and plan.scale == "cpu"
    assert [(r.row, r.seed) for r in plan.references] == [("pretrained", s) for s in (0, 1, 2)]
    assert {(r.row, r.seed) for r in plan.runs} == {(row, s) for row in SIX[1:] for s in (0, 1, 2)}
    assert plan.runs[0].row == "sup_only" and plan.runs[0].seed == 0  # the host of seed 0 runs first
    configs = {}
    for run in plan.runs:
        assert run.folder == tmp_path.resolve() / "rain" / run.row / f"seed_{run.seed}"
        assert run.config["results_dir"] == str(run.folder) and run.config["seed"] == run.seed
        assert run.config["device"] == "cpu" and run.config["demo"]["task"] == "rain"
        assert run.conditioned == (run.row == "qualiteacher")
        configs[run.row] = load_config(None, overrides=run.config)
    # one step budget: the same steps per round and labeled pairs per step for every method
    budgets = {row: (c.rounds, c.train.steps, c.train.batch_size, c.train.losses.sup.batch_size,
                     c.train.losses.sup.weight > 0) for row, c in configs.items()}
    assert len(set(budgets.values())) == 1 and next(iter(budgets.values()))[1] > 0, budgets
    # the rows of a seed share data + pretraining; seeds do not
    keys = {s: {r.shared_key for r in plan.runs if r.seed == s} for s in (0, 1, 2)}
    assert all(len(k) == 1 for k in keys.values()) and len(set.union(*keys.values())) == 3


def test_haze_negative_control(spec: proxy.ProxySpec, tmp_path: Path) -> None:
    plan = proxy.build_plan(spec, task="haze", out=tmp_path, seeds=[0])
    assert [(r.row, r.seed) for r in plan.runs] == [(row, 0) for row in (
        "sup_only", "plain_mt", "filter_mt", "qualiteacher", "qt_learned_rank", "qt_learned", "qt_learned_refresh")]
    assert [r.row for r in plan.references] == ["pretrained"]
    assert {r.config["demo"]["target_recipe"] for r in plan.runs} == {"haze_target"}


def test_rows_and_seeds_overrides_and_host(spec: proxy.ProxySpec, tmp_path: Path) -> None:
    """Any seed works: --seeds 7 plans new data and pretraining for that seed."""
    plan = proxy.build_plan(spec, scale="tiny", rows=["qualiteacher", "plain_mt"], seeds=[7], out=tmp_path)
    assert plan.rows == ("plain_mt", "qualiteacher")  # the task's order
    assert [(r.row, r.seed) for r in plan.runs] == [("plain_mt", 7), ("qualiteacher", 7)]
    assert "run, with data + pretrain" in proxy.describe_plan(plan, spec)
    alone = proxy.build_plan(spec, rows=["pretrained"], seeds=[4], out=tmp_path)
    assert [(r.row, r.seed, r.host) for r in alone.runs] == [("sup_only", 4, True)]


def test_a_new_row_is_data_only(tmp_path: Path) -> None:
    raw = yaml.safe_load(PROXY.read_text())
    raw["rows"]["e_lr"] = {"extends": "e", "overrides": {"train": {"lr": 0.001}}, "seeds": [0]}
    raw["tasks"]["rain"]["rows"].append("e_lr")
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    plan = proxy.build_plan(proxy.load_proxy(path), rows=["e_lr"], out=tmp_path)
    (run,) = plan.runs
    assert run.config["train"]["lr"] == 0.001 and run.config["gate"]["enabled"] is True


def test_bad_proxy_files_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(PROXY.read_text())
    raw["rows"]["b"]["extend"] = "a"
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(proxy.ProxyError, match="did you mean 'extends'"):
        proxy.load_proxy(path)
    raw = yaml.safe_load(PROXY.read_text())
    raw["rows"]["a"]["overrides"]["train"]["lrr"] = 1.0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(proxy.ProxyError, match="lrr"):  # the config schema checks the overrides
        proxy.build_plan(proxy.load_proxy(path), rows=["a"], out=tmp_path)
    assert proxy.main(["--dry-run", "--rows", "nope"]) == 2
    assert "no row named 'nope'" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert proxy.main(["--dry-run", "--out", str(out), "--rows", "plain_mt,e,pretrained", "--seeds", "0,1"]) == 0
    text = capsys.readouterr().out
    for row, seed in (("plain_mt", 0), ("e", 0), ("plain_mt", 1), ("e", 1)):
        assert str(out.resolve() / "rain" / row / f"seed_{seed}") in text
    assert "copied from plain_mt/seed_0" in text and "copied from plain_mt/seed_1" in text
    assert "read method 'pretrained'" in text
    assert not out.exists()


def _metrics(conditioned: bool = True, pretrained: bool = True) -> pd.DataFrame:
    rows = []
    for img in ("x", "y"):
        rows.append({"image_id": img, "method": "degraded", "level": np.nan, "psnr": 18.0, "brisque": 40.0})
        rows.append({"image_id": img, "method": "teacher", "level": 7.0, "psnr": 24.0, "brisque": 20.0})
        if pretrained:
            rows.append({"image_id": img, "method": "pretrained", "level": np.nan, "psnr": 23.0, "brisque": 22.0})
        for level in (range(8) if conditioned else [np.nan]):
            psnr = 20.0 + (level if conditioned else 5.0) + (0.5 if img == "x" else 0.0)
            rows.append({"image_id": img, "method": "student", "level": float(level), "psnr": psnr, "brisque": 15.0})
    return pd.DataFrame(rows)


def test_seed_record_picks_the_top_level_and_pairs_with_pretrained() -> None:
    rec = proxy.seed_record(_metrics(), conditioned=True, delta_vs="pretrained")
    assert rec["method"] == "student@7" and rec["n_images"] == 2
    assert rec["psnr"] == pytest.approx(27.25) and rec["dpsnr"] == pytest.approx(4.25)
    assert rec["teacher_psnr"] == pytest.approx(24.0)
    assert rec["spearman"] == pytest.approx(1.0) and rec["psnr_level_0"] == pytest.approx(20.25)
    flat = proxy.seed_record(_metrics(conditioned=False, pretrained=False), conditioned=False, delta_vs="pretrained")
    assert flat["method"] == "student" and flat["psnr"] == pytest.approx(25.25)
    assert math.isnan(flat["dpsnr"]) and math.isnan(flat["spearman"])
    ref = proxy.seed_record(_metrics(), conditioned=False, delta_vs="pretrained", reference="pretrained")
    assert ref["psnr"] == pytest.approx(23.0) and ref["dpsnr"] == pytest.approx(0.0)


def test_spearman_of_an_inert_condition_is_nan() -> None:
    assert math.isnan(proxy._spearman(range(8), [24.0 + 1e-6 * i for i in range(8)]))
    assert proxy._spearman(range(4), [1.0, 2.0, 4.0, 3.0]) == pytest.approx(0.8)


def test_parse_jobs_times_each_rule() -> None:
    log = ("Building DAG of jobs...\n\n[Tue Dec  1 20:42:07 2026]\nlocalrule pretrain:\n    jobid: 2\n"
           "    reason: Missing output files\n\n[Tue Dec  1 20:42:09 2026]\nrule label:\n    jobid: 3\n\n"
           "[Tue Dec  1 20:42:22 2026]\nFinished jobid: 2 (Rule: pretrain)\n1 of 3 steps (33%) done\n\n"
           "[Tue Dec  1 20:42:30 2026]\nFinished jobid: 3 (Rule: label)\n")
    times = proxy.rule_times(proxy.parse_jobs(log))
    assert times == {"pretrain": {"jobs": 1, "seconds": 15.0}, "label": {"jobs": 1, "seconds": 21.0}}


def _write_headroom(folder: Path, rounds: int, offset: float) -> None:
    """Hand-made round_{r}/headroom.parquet: two images, views hflip + rot90; the teacher at 24 + r + offset dB."""
    schema = headroom_schema(("hflip", "rot90"), ("hflip", "rot90"))
    for r in range(rounds):
        plain = 24.0 + r + offset
        frame = pd.DataFrame({
            "image_id": ["x", "y"], "round": r, "teacher_hash": "0" * 16, "psnr_plain": plain,
            "psnr_hflip": [plain + 0.2, plain - 0.1], "psnr_rot90": plain - 5.0, "psnr_mean": plain + 0.1,
            "psnr_s_first": plain - 5.0, "s_first": "rot90", "psnr_gt_best": [plain + 0.2, plain],
            "gt_best": "hflip", "S_hflip": 5.0, "S_rot90": 6.0, "S_mean": 5.5, "psnr_vs_input_plain": 25.0,
            "psnr_vs_input_hflip": 25.0, "psnr_vs_input_rot90": 45.0, "psnr_vs_input_mean": 30.0})
        write_table(frame, Layout(folder).headroom(r), schema)


def test_collect_from_folders_aggregates_seeds_and_skips_missing_pretrained(
        spec: proxy.ProxySpec, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plan = proxy.build_plan(spec, rows=["pretrained", "plain_mt", "e"], seeds=[0, 1], out=tmp_path)
    for run in plan.runs:
        metrics = _metrics(conditioned=True, pretrained=run.seed == 0)  # seed 1: no 'pretrained' rows
        metrics.loc[metrics["method"] == "student", "psnr"] += run.seed + (1.0 if run.row == "e" else 0.0)
        (run.folder / "eval").mkdir(parents=True)
        metrics.to_parquet(run.folder / "eval/metrics.parquet")
        _write_headroom(run.folder, rounds=3, offset=run.seed)
    with caplog.at_level("WARNING", logger="proxy"):
        table = proxy.write_tables(plan, spec).set_index("row")
    assert list(table.index) == ["pretrained", "plain_mt", "e"]
    assert table.loc["pretrained", "n_seeds"] == 1 and "seed 1" in caplog.text  # skipped with a warning
    assert table.loc["e", "n_seeds"] == 2 and table.loc["e", "psnr_mean"] == pytest.approx(28.75)
    assert table.loc["e", "psnr_std"] == pytest.approx(math.sqrt(0.5))
    assert table.loc["e", "dpsnr_mean"] == pytest.approx(5.25)  # seed 0 only: seed 1 has no pretrained
    assert math.isnan(table.loc["plain_mt", "spearman_mean"]) and table.loc["e", "spearman_mean"] == 1.0
    md = (plan.out / "table.md").read_text()
    assert "| e | (e) + dual drop = QualiTeacher | 2 | 28.75 ± 0.71 | 5.25 | +5.25, n/a |" in md
    # teacher per round: the headroom's plain, 24 + r + seed, means over seeds 0 and 1; then the final teacher
    assert "| 24.50 → 25.50 → 26.50 → 24.00 |" in md and "per seed dPSNR" in md
    headroom = pd.read_parquet(plan.out / "headroom.parquet")
    assert len(headroom) == 2 * 2 * 3 * 6  # (plain_mt, e) x 2 seeds x 3 rounds x 6 columns
    assert list(headroom.columns[:4]) == ["row", "seed", "round", "column"]
    rot90 = headroom[(headroom["column"] == "rot90")]
    assert (rot90["d_vs_plain"] == -5.0).all() and (rot90["share_unrestored"] == 1.0).all()
    hmd = (plan.out / "headroom.md").read_text()
    assert "| e | 0 | 2 | 24.50 ± 0.71 | +0.05 ± 0.00 (50%) | -5.00 ± 0.00 (0%) |" in hmd
    assert "| e | 2 | 2 | 26.50 ± 0.71 |" in hmd and "| e | 1 |" not in hmd  # round 0 and the last round
    assert (plan.out / "controllability.png").stat().st_size > 1000
    assert len(pd.read_parquet(plan.out / "per_seed.parquet")) == 5


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_shares_pretraining(tmp_path: Path) -> None:
    """A new seed (7) gets its own data and pretraining; every row trains the same steps on as many pairs."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.proxy.run", "--scale", "tiny", "--rows",
           "pretrained,sup_only,filter_mt,qualiteacher", "--seeds", "7", "--out", str(out), "--cores", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    task = out / "rain"
    trained = ("sup_only", "filter_mt", "qualiteacher")
    table = pd.read_parquet(task / "table.parquet").set_index("row")
    has_pretrained = (pd.read_parquet(task / "sup_only/seed_7/eval/metrics.parquet")["method"] == "pretrained").any()
    assert set(table.index) == set(trained) | ({"pretrained"} if has_pretrained else set())
    assert np.isfinite(table["psnr_mean"]).all() and (table["n_seeds"] == 1).all()
    md = (task / "table.md").read_text()
    assert all(f"| {row} |" in md for row in trained)
    assert (task / "controllability.png").stat().st_size > 1000
    assert {(r["row"], r["status"]) for r in json.loads((task / "run.json").read_text())["runs"]} == {
        (row, "ok") for row in trained}
    # one budget: every method made the same steps, each with one batch of labeled pairs
    logs = {row: pd.read_parquet(task / row / "seed_7/round_0/losses.parquet") for row in trained}
    assert len({len(log) for log in logs.values()}) == 1 and len(logs["sup_only"]) == 2
    assert all(np.isfinite(log["sup"]).all() for log in logs.values())
    assert np.isnan(logs["sup_only"]["rec"]).all() and np.isfinite(logs["filter_mt"]["rec"]).all()

    # The other rows started from the first one's data and pretraining, and did not redo them.
    record = json.loads((task / "qualiteacher/seed_7/proxy_run.json").read_text())
    assert record["shared_from"] == str(task / "sup_only/seed_7") and "pretrain" in record["copied"]
    assert record["shared_rules_rerun"] == [] and record["checkpoint_changed"] is False
    assert "rule pretrain:" not in (task / "qualiteacher/seed_7/snakemake.log").read_text()
    assert "rule pretrain:" in (task / "sup_only/seed_7/snakemake.log").read_text()
    host, copy = task / "sup_only/seed_7/pretrain/model.pt", task / "qualiteacher/seed_7/pretrain/model.pt"
    assert copy.stat().st_mtime_ns == host.stat().st_mtime_ns and copy.read_bytes() == host.read_bytes()

    # A second invocation finds both runs up to date and only rebuilds the table.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = json.loads((task / "run.json").read_text())["runs"]
    assert {r["this_invocation"] for r in runs} == {"skipped"}
