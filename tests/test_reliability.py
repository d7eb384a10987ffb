"""The tiny workflow as a hostile but fair user runs it: same seed elsewhere, SIGKILL, a moved folder.

- Determinism: the same seed in two work directories gives byte-identical
  ledgers, banks, label stores, loss logs and checkpoints.
- Crash and resume: SIGKILL of the whole Snakemake process group during a label
  job and again during a train job; the rerun is what a user does
  (``snakemake --unlock``, then the same command) and gives the same bytes as
  the uninterrupted run. The second crash is resumed from a moved folder, so the
  train job must pick up its step checkpoint there.
- Safety: the run writes nothing outside its results folder (and Snakemake's
  ``.snakemake``), and every output is readable by the group (umask, not 0600).

One uninterrupted baseline (module-scoped) serves every comparison.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_workflow import SNAKEFILE, SNAKEMAKE, TINY, snakemake, write_config  # noqa: E402

from qtlib.models import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("--resources", "gpu=2")


def _files(root: Path) -> dict[str, bytes]:
    """Every output under ``root/results`` that must be reproducible, by relative path (job logs excluded)."""
    res = root / "results"
    return {p.relative_to(res).as_posix(): p.read_bytes() for p in sorted(res.rglob("*"))
            if p.is_file() and "logs" not in p.relative_to(res).parts}


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An uninterrupted tiny run, with what its work directory and TMPDIR held before and after."""
    work = tmp_path_factory.mktemp("base")
    tmp = tmp_path_factory.mktemp("tmpdir")
    write_config(work, TINY)
    before = _tree(work)
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "-d", str(work), "--cores", "2", *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"work": work, "before": before, "after": _tree(work), "tmp_after": _tree(tmp)}


@pytest.mark.slow
def test_same_seed_in_two_folders_gives_equal_bytes_and_a_moved_folder_is_up_to_date(
        baseline: dict[str, object], tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    write_config(twin, TINY)
    snakemake(twin, *ARGS)
    a, b = _files(baseline["work"]), _files(twin)  # type: ignore[arg-type]
    assert set(a) == set(b)
    assert any(k.endswith("bank.parquet") for k in a) and any(k.startswith("round_1/labels/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    base = Path(baseline["work"]) / "results"  # type: ignore[arg-type]
    for name in ("pretrain/model.pt", "round_1/student.pt", "round_1/teacher.pt"):
        sa, sb = load_checkpoint(base / name), load_checkpoint(twin / "results" / name)
        assert sa.model_state.keys() == sb.model_state.keys()
        assert all(torch.equal(sa.model_state[k], sb.model_state[k]) for k in sa.model_state)
    moved = tmp_path / "moved"
    shutil.move(twin, moved)
    assert "Nothing to be done" in snakemake(moved, "-n", *ARGS).stdout


def _run_until(work: Path, when: Callable[[], bool], timeout: float = 900) -> bool:
    """Start the workflow in its own process group; SIGKILL the whole group as soon as ``when()`` holds.

    Returns:
        True if it was killed, False if it finished first.
    """
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "-d", str(work), "--cores", "2", *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.05)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_sigkill_during_label_and_train_then_rerun_from_a_moved_folder(
        baseline: dict[str, object], tmp_path: Path) -> None:
    work = tmp_path / "crash"
    write_config(work, TINY)
    res = work / "results"
    # 1. killed while a label job of round 0 runs (its log is open, its ledger not yet written)
    assert _run_until(work, lambda: (res / "logs/round_0/label_0.log").exists())
    assert not (res / "round_0/bank.parquet").exists()
    # the next run stops on Snakemake's lock; the README says: --unlock, then the same command
    locked = snakemake(work, *ARGS, check=False)
    assert locked.returncode != 0 and "unlock" in (locked.stdout + locked.stderr)
    snakemake(work, "--unlock")
    # 2. killed while a train job runs, after it wrote a step checkpoint
    partials = lambda: list(res.glob("round_*/student.pt.partial"))  # noqa: E731
    assert _run_until(work, lambda: bool(partials()))
    killed_in = partials()[0].parent.name
    assert not (res / killed_in / "student.pt").exists()
    # 3. the folder moves (a cluster user copies results elsewhere); unlock and the same command
    moved = tmp_path / "moved"
    shutil.move(work, moved)
    snakemake(moved, "--unlock")
    snakemake(moved, *ARGS)
    log = (moved / "results/logs" / killed_in / "train.log").read_text()
    assert re.search(r"steps from step [1-9]", log), "the train job started afresh instead of resuming"
    a, b = _files(baseline["work"]), _files(moved)  # type: ignore[arg-type]
    assert set(a) == set(b)
    assert [k for k in a if a[k] != b[k]] == []  # banks, ledgers, label stores, losses, weights, evaluation


@pytest.mark.slow
def test_workflow_writes_only_under_its_results_folder(baseline: dict[str, object]) -> None:
    before, after = baseline["before"], baseline["after"]
    new_top = {p.split("/")[0] for p in after - before}  # type: ignore[operator]
    assert new_top <= {"results", ".snakemake"}, new_top
    # In TMPDIR only the machine-wide GPU lease locks (shared by every run on purpose, qtlib.lease) and
    # caches of the libraries (torch inductor) and Snakemake's own scratch folder may appear.
    allowed = re.compile(r"(qtlib-gpu-locks|torchinductor_[^/]+|snakemake[^/]*)(/.*)?")
    left = sorted(p for p in baseline["tmp_after"] if not allowed.fullmatch(p))  # type: ignore[attr-defined]
    assert left == []


@pytest.mark.slow
def test_outputs_are_group_readable(baseline: dict[str, object]) -> None:
    # created with the process umask (022 here), not mkstemp's 0600: a shared results folder stays readable
    res = Path(baseline["work"]) / "results"  # type: ignore[arg-type]
    umask = os.umask(0)
    os.umask(umask)
    unreadable = [p for p in res.rglob("*") if p.is_file() and (p.stat().st_mode & 0o777) != (0o666 & ~umask)]
    assert unreadable == []


# -- static safety checks (fast) ---------------------------------------------------------------------------------

def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def _sources() -> list[Path]:
    return sorted((ROOT / "qtlib").rglob("*.py")) + sorted((ROOT / "workflow" / "scripts").glob("*.py"))


def test_every_torch_load_is_weights_only() -> None:
    found = []
    for path in _sources():
        for call in _calls(ast.parse(path.read_text())):
            if _name(call) == "torch.load":
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                found.append((path.relative_to(ROOT).as_posix(), call.lineno, ok))
    assert found and all(ok for *_, ok in found), found


def test_no_path_reaches_a_shell() -> None:
    bad = []
    for path in _sources():
        for call in _calls(ast.parse(path.read_text())):
            name = _name(call)
            shell = any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                        for k in call.keywords)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput") or shell:
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno}: {name}")
            if name.startswith("subprocess.") and call.args and not isinstance(call.args[0], (ast.List, ast.Name)):
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno}: {name} with a string command")
    rules = [ROOT / "workflow" / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
    for path in rules:  # rules call scripts (Python, arguments as objects), never a shell command line
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(shell|run):", line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert bad == []
