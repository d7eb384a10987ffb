"""The Snakemake DAG end to end on a tiny config: outputs, rerun-on-edit, GPU resources, profiles."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import qtlib.ledger
from qtlib.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

# Small enough to run the whole method in well under 3 minutes on 2 cores: 64 px images,
# a BRISQUE-only ensemble (NIQE needs 96 px blocks), a width-4 U-Net, a few steps.
TINY = {
    "results_dir": "results",
    "rounds": 2,
    "device": "cpu",
    "data": {"size": 64, "min_size": 16},
    "demo": {"n_paired": 4, "n_unlabeled": 4, "n_test": 2, "size": 64},
    "iqa": {"ensemble": [{"metric": "brisque", "weight": 1.0}], "blocks": [2, 2], "batch_size": 16},
    "model": {"backbone": "unet", "unet": {"width": 4, "depth": 2}},
    "pretrain": {"steps": 4, "batch_size": 2, "patch_size": 32, "checkpoint_every": 2},
    "label": {"shards": 2, "batch_size": 2},
    "gate": {"quantile": 0.95},
    "train": {"batch_size": 2, "patch_size": 64, "checkpoint_every": 2, "losses": {"per": {"kind": "none"}}},
    "evaluate": {"levels": [0, 7], "panel": ["brisque", "piqe"], "n_examples": 2},
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "-d", str(workdir), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def write_config(workdir: Path, data: dict) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(data))


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    counts: dict[str, int] = {}
    in_table = False
    for line in output.splitlines():
        if line.startswith("Job stats:"):
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    return counts


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("wf")
    write_config(workdir, TINY)
    proc = snakemake(workdir, "--resources", "gpu=2")
    (workdir / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return workdir


@pytest.mark.slow
def test_tiny_dag_produces_every_artifact(run: Path) -> None:
    res = run / "results"
    for r in range(2):
        for k in range(2):
            assert (res / f"round_{r}/labels/shard_{k}.zarr").is_dir()
            assert (res / f"round_{r}/ledger/shard_{k}.parquet").is_file()
        for name in ("gate.parquet", "bank.parquet", "student.pt", "teacher.pt", "losses.parquet"):
            assert (res / f"round_{r}/{name}").is_file(), name
        headroom = pd.read_parquet(res / f"round_{r}/headroom.parquet")  # the teacher of round r on the test set
        assert len(headroom) == 2 and (headroom["round"] == r).all() and headroom["psnr_plain"].notna().all()
    assert (res / "pretrain/model.pt").is_file()
    ledger = qtlib.ledger.load(res)
    assert sorted(ledger["round"].unique()) == [0, 1] and len(ledger) == 2 * 4 * 3
    bank = pd.read_parquet(res / "round_1/bank.parquet")
    assert bank.groupby("image_id").size().max() <= 3
    metrics = pd.read_parquet(res / "eval/metrics.parquet")
    assert {"brisque", "piqe", "psnr", "ssim"} <= set(metrics.columns)
    assert set(metrics["method"]) == {"degraded", "pretrained", "teacher", "student"}
    for plot in ("controllability", "round_histograms", "drop_rates", "bank_mean_S", "examples"):
        assert (res / f"eval/plots/{plot}.png").stat().st_size > 1000
    assert "| method |" in (res / "eval/summary.md").read_text()
    assert "### Round 1 (2 images)" in (res / "eval/summary.md").read_text().split("## Headroom")[1]
    snakemake(run, "--report", "results/report.html")
    assert (res / "report.html").stat().st_size > 10_000


def concurrent_label_jobs(log: str, round_: int) -> int:
    """Most round-``round_`` label jobs running at once, from Snakemake's start/finish events."""
    running: set[str] = set()
    most = 0
    for block in re.split(r"\n(?=\[\w{3} \w{3} )", log):
        start = re.search(r"rule label:.*?jobid: (\d+).*?wildcards: r=(\d+)", block, flags=re.S)
        if start and int(start.group(2)) == round_:
            running.add(start.group(1))
            most = max(most, len(running))
        done = re.search(r"Finished jobid: (\d+) \(Rule: label\)", block)
        if done:
            running.discard(done.group(1))
    return most


@pytest.mark.slow
def test_two_label_shards_run_at_once_with_gpu_2(run: Path) -> None:
    log = (run / "snakemake.out").read_text()
    assert concurrent_label_jobs(log, 0) == 2
    assert concurrent_label_jobs(log, 1) == 2


@pytest.mark.slow
def test_editing_gate_reruns_exactly_gate_and_what_follows(run: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(run, work, symlinks=True)
    edited = {**TINY, "gate": {"quantile": 0.8}}
    write_config(work, edited)
    dry = snakemake(work, "-n", "--resources", "gpu=2")
    # round 1's headroom: its teacher is round 0's, retrained
    assert planned_jobs(dry.stdout) == {"all": 1, "gate": 2, "train": 2, "label": 2, "headroom": 1, "evaluate": 1}
    # ... and the labels of round 0 are not among them:
    assert "round_0/labels" not in "".join(l for l in dry.stdout.splitlines() if l.strip().startswith("output:"))


@pytest.mark.slow
def test_editing_evaluation_reruns_only_evaluation(run: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(run, work, symlinks=True)
    write_config(work, {**TINY, "evaluate": {**TINY["evaluate"], "n_examples": 1}})
    assert planned_jobs(snakemake(work, "-n").stdout) == {"all": 1, "evaluate": 1}
    write_config(work, TINY)
    assert "Nothing to be done" in snakemake(work, "-n").stdout


def test_headroom_is_scheduled_per_round_unless_switched_off(tmp_path: Path) -> None:
    write_config(tmp_path, TINY)
    assert planned_jobs(snakemake(tmp_path, "-n").stdout)["headroom"] == TINY["rounds"]
    write_config(tmp_path, {**TINY, "evaluate": {**TINY["evaluate"], "headroom": False}})
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    assert "headroom" not in jobs and jobs["evaluate"] == 1


def test_slurm_profile_dry_run(tmp_path: Path) -> None:
    write_config(tmp_path, TINY)
    proc = snakemake(tmp_path, "--profile", str(ROOT / "workflow/profiles/slurm"), "-n")
    assert "label" in proc.stdout and "train" in proc.stdout


def test_shipped_profiles_and_configs_are_valid() -> None:
    load_config(ROOT / "config" / "config.yaml")
    for profile in ("default", "slurm"):
        assert yaml.safe_load((ROOT / f"workflow/profiles/{profile}/config.yaml").read_text())
