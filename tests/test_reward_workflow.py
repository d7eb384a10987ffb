"""The learned member in the workflow: fitted after pretraining, refitted per round, used by the label stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

import qtlib.ledger
from qtlib.iqa.learned import read_learned
from qtlib.runtime import file_hash
from tests.test_workflow import TINY, planned_jobs, snakemake, write_config

LEARNED = copy.deepcopy(TINY)
LEARNED["iqa"]["ensemble"] = [{"metric": "liteiqa", "weight": 1.0}]  # S, levels, gate, bank
LEARNED["train"]["reward_ensemble"] = [{"metric": "brisque", "weight": 1.0}]  # the reward's gradient
LEARNED["reward"] = {"crop": 64, "steps": 20, "hidden": 16, "refresh": True, "refresh_levels": [7]}
LEARNED["evaluate"]["panel"] = ["brisque", "piqe", "liteiqa"]
LEARNED["evaluate"]["headroom"] = False  # tested in test_workflow.py; fewer jobs keep the suite in budget
LEARNED["label"]["shards"] = 1


@pytest.mark.slow
def test_learned_member_is_fitted_refreshed_and_scores_the_labels(tmp_path: Path) -> None:
    write_config(tmp_path, LEARNED)
    plan = planned_jobs(snakemake(tmp_path, "-n", "--resources", "gpu=2").stdout)
    assert plan["reward_fit"] == 1 and plan["reward_refresh"] == 1  # round 1 refits against round 0's student
    snakemake(tmp_path, "--resources", "gpu=2")
    res = tmp_path / "results"
    fitted, refit = res / "reward" / "model.pt", res / "round_1" / "reward.pt"
    assert fitted.is_file() and refit.is_file() and (res / "reward" / "report.md").is_file()
    assert read_learned(refit).meta["students"] == [file_hash(res / "round_0" / "student.pt")]
    ledger = qtlib.ledger.load(res)
    for r, path in ((0, fitted), (1, refit)):  # the ledger records which reward file scored each row
        versions = ledger.loc[ledger["round"] == r, "metric_versions"].map(json.loads)
        digest = file_hash(path)
        assert all(v["liteiqa"].endswith(digest) for v in versions)
    metrics = pd.read_parquet(res / "eval" / "metrics.parquet")
    assert metrics["liteiqa"].notna().all()


def test_no_learned_member_no_fit(tmp_path: Path) -> None:
    write_config(tmp_path, TINY)
    assert "reward_fit" not in planned_jobs(snakemake(tmp_path, "-n").stdout)
    given = copy.deepcopy(LEARNED)
    given["iqa"]["learned"] = {"path": str(tmp_path / "mine.pt")}
    write_config(tmp_path, given)
    out = snakemake(tmp_path, "-n", check=False)
    assert out.returncode != 0 and "iqa.learned.path" in out.stdout + out.stderr  # a named file must exist
    (tmp_path / "mine.pt").write_bytes(b"x")
    plan = planned_jobs(snakemake(tmp_path, "-n").stdout)
    assert "reward_fit" not in plan and "reward_refresh" not in plan  # the user's file is used as it is
