"""The ground-truth proxy benchmark: does QualiTeacher beat its pretrained model here, and by how much?

Every (row, seed) of ``config/proxy.yaml`` is one run of the real Snakemake
workflow on the demo's construction (paired source-recipe set; unlabeled and
test sets under the shifted target recipe, the clean test images kept aside),
so PSNR/SSIM against the ground truth answer the question that the no-reference
metrics can only estimate. Rows, tasks, scales and seeds are data in the proxy
file; this module only merges, runs and collects.

Run from the repository root::

    python -m benchmarks.proxy.run                          # the rain benchmark, cpu scale
    python -m benchmarks.proxy.run --task haze              # the negative control
    python -m benchmarks.proxy.run --rows plain_mt,e --seeds 0 --scale tiny --out /tmp/p
    python -m benchmarks.proxy.run --dry-run                # the plan: rows, seeds, folders
    python -m benchmarks.proxy.run --collect-only           # rebuild the table from existing folders

Writes ``<out>/<task>/<row>/seed_<s>/`` (a results folder each, with its
``config.yaml``, ``snakemake.log`` and ``proxy_run.json``), then
``<out>/<task>/table.parquet`` (one row per benchmark row: mean and std over
seeds), ``per_seed.parquet``, ``table.md``, ``controllability.png``,
``headroom.parquet`` and ``headroom.md`` (every run's ``round_*/headroom.parquet``:
what its pseudo-labels could give over the teacher's plain output) and
``run.json`` (command, machine, wall time per run and in total, git commit).

Data and pretraining depend only on the seed (the proxy file's ``shared.keys``),
so the first run of a seed runs them and every other run of that seed starts
from a copy of them (mtimes kept); its Snakemake log is checked for a rerun.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from qtlib.config import deep_merge, load_config, to_dict
from qtlib.headroom_table import PLAIN, read_headroom
from qtlib.headroom_table import summarize as summarize_headroom
from qtlib.layout import Layout

log = logging.getLogger("proxy")

ROOT = Path(__file__).resolve().parents[2]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
BASE_CONFIG = ROOT / "config" / "config.yaml"
DEFAULT_PROXY = ROOT / "config" / "proxy.yaml"
ID_COLUMNS = ("image_id", "method", "level")
METRICS = Path("eval") / "metrics.parquet"
RUN_RECORD = "proxy_run.json"

TOP_KEYS = {"default_task", "default_scale", "default_seeds", "delta_vs", "base", "scales", "tasks", "rows", "shared"}
ROW_KEYS = {"label", "overrides", "extends", "seeds", "reference"}
TASK_KEYS = {"overrides", "rows", "seeds"}
SCALE_KEYS = {"overrides", "gpus"}
SHARED_KEYS = {"copy", "keys", "rules", "checkpoint"}


class ProxyError(ValueError):
    """A proxy file or a command line that cannot be planned."""


# --------------------------------------------------------------------------- the proxy file


@dataclass(frozen=True)
class Row:
    """One benchmark row: config overrides (``extends`` resolved), or a reference method of the evaluation."""

    name: str
    label: str
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    reference: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    overrides: dict[str, Any]
    rows: tuple[str, ...]
    seeds: tuple[int, ...] | None


@dataclass(frozen=True)
class Scale:
    name: str
    overrides: dict[str, Any]
    gpus: int


@dataclass(frozen=True)
class Shared:
    """What the runs of one seed share (see the proxy file's ``shared`` section)."""

    copy: tuple[str, ...]
    keys: tuple[str, ...]
    rules: tuple[str, ...]
    checkpoint: str


@dataclass(frozen=True)
class ProxySpec:
    path: Path
    base: dict[str, Any]
    scales: dict[str, Scale]
    tasks: dict[str, Task]
    rows: dict[str, Row]
    shared: Shared
    default_task: str
    default_scale: str
    delta_vs: str


def _check_keys(mapping: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """``mapping`` as a dict whose keys are all in ``allowed`` (else an error naming the closest key)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ProxyError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(sorted(allowed))})"
            raise ProxyError(f"{where}: unknown key {key!r}{hint}")
    return mapping


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and s >= 0 for s in value):
        raise ProxyError(f"{where}: expected a non-empty list of seeds >= 0, got {value!r}")
    return tuple(dict.fromkeys(value))


def _resolve_row(name: str, raw: dict[str, Any], default_seeds: tuple[int, ...], chain: tuple[str, ...] = ()) -> Row:
    """The row ``name`` with the overrides of its ``extends`` chain merged in (parents first)."""
    if name not in raw:
        raise ProxyError(f"rows.{chain[-1]}.extends: no row {name!r}" if chain else f"no row {name!r}")
    if name in chain:
        raise ProxyError(f"rows: `extends` cycle {' -> '.join((*chain, name))}")
    entry = _check_keys(raw[name], ROW_KEYS, f"rows.{name}")
    own = entry.get("overrides") or {}
    if not isinstance(own, dict):
        raise ProxyError(f"rows.{name}.overrides: expected a mapping of config keys, got {own!r}")
    if entry.get("reference") is not None and (own or entry.get("extends")):
        raise ProxyError(f"rows.{name}: a reference row has no overrides of its own (nothing is trained for it)")
    overrides = own
    if entry.get("extends"):
        parent = _resolve_row(entry["extends"], raw, default_seeds, (*chain, name))
        overrides = deep_merge(parent.overrides, own)
    seeds = _seeds(entry["seeds"], f"rows.{name}.seeds") if "seeds" in entry else default_seeds
    return Row(name, str(entry.get("label", name)), overrides, seeds, entry.get("reference"))


def load_proxy(path: str | Path) -> ProxySpec:
    """Read and check a proxy file (see ``config/proxy.yaml`` for the format).

    Raises:
        ProxyError: an unknown key, a task naming an undefined row, an ``extends`` cycle, ...
    """
    path = Path(path)
    raw = _check_keys(yaml.safe_load(path.read_text(encoding="utf-8")), TOP_KEYS, str(path))
    default_seeds = _seeds(raw.get("default_seeds", [0]), "default_seeds")
    rows_raw = _check_keys(raw.get("rows"), set(raw.get("rows") or {}), "rows")
    rows = {name: _resolve_row(name, rows_raw, default_seeds) for name in rows_raw}
    tasks = {}
    for name, entry in _check_keys(raw.get("tasks"), set(raw.get("tasks") or {}), "tasks").items():
        entry = _check_keys(entry, TASK_KEYS, f"tasks.{name}")
        names = tuple(entry.get("rows") or rows)
        if unknown := [r for r in names if r not in rows]:
            raise ProxyError(f"tasks.{name}.rows: no row named {', '.join(map(repr, unknown))}")
        seeds = _seeds(entry["seeds"], f"tasks.{name}.seeds") if "seeds" in entry else None
        tasks[name] = Task(name, dict(entry.get("overrides") or {}), names, seeds)
    scales = {}
    for name, entry in _check_keys(raw.get("scales"), set(raw.get("scales") or {}), "scales").items():
        entry = _check_keys(entry, SCALE_KEYS, f"scales.{name}")
        scales[name] = Scale(name, dict(entry.get("overrides") or {}), int(entry.get("gpus", 1)))
    sh = _check_keys(raw.get("shared"), SHARED_KEYS, "shared")
    shared = Shared(tuple(sh.get("copy", ("data", "pretrain"))), tuple(sh.get("keys", ())),
                    tuple(sh.get("rules", ())), str(sh.get("checkpoint", "pretrain/model.pt")))
    spec = ProxySpec(path, dict(raw.get("base") or {}), scales, tasks, rows, shared,
                     str(raw.get("default_task", next(iter(tasks), ""))),
                     str(raw.get("default_scale", next(iter(scales), ""))), str(raw.get("delta_vs", "pretrained")))
    for key, table in (("default_task", tasks), ("default_scale", scales)):
        if getattr(spec, key) not in table:
            raise ProxyError(f"{path}: {key} {getattr(spec, key)!r} is not defined")
    return spec


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Run:
    """One Snakemake run: a trained row at one seed.

    Attributes:
        config: the resolved config written to ``folder/config.yaml``.
        shared_key: hash of the config keys the shared stages read; runs with equal keys share them.
        conditioned: the student was trained with a score condition (it has a controllability curve).
        host: added only so that a reference row of this seed has an evaluation to read.
    """

    row: str
    seed: int
    folder: Path
    config: dict[str, Any]
    shared_key: str
    conditioned: bool
    host: bool = False


@dataclass(frozen=True)
class Reference:
    """A reference row at one seed: ``method`` rows read from any run of that seed."""

    row: str
    seed: int
    method: str


@dataclass(frozen=True)
class Plan:
    task: str
    scale: str
    out: Path
    rows: tuple[str, ...]
    runs: tuple[Run, ...]
    references: tuple[Reference, ...]
    gpus: int


def _get(data: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def resolve_config(spec: ProxySpec, task: str, scale: str, row: str, seed: int, folder: Path) -> dict[str, Any]:
    """config/config.yaml <- base <- scale <- task <- row <- {seed, results_dir}: the config of one run."""
    config = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8")) or {}
    for layer in (spec.base, spec.scales[scale].overrides, spec.tasks[task].overrides, spec.rows[row].overrides):
        config = deep_merge(config, layer)
    return deep_merge(config, {"seed": seed, "results_dir": str(folder)})


def _make_run(spec: ProxySpec, task: str, scale: str, row: str, seed: int, out: Path, host: bool = False) -> Run:
    folder = out / row / f"seed_{seed}"
    config = resolve_config(spec, task, scale, row, seed, folder)
    try:
        full = load_config(None, overrides=config)  # validated here so that --dry-run checks every config
    except ValueError as exc:
        raise ProxyError(f"row {row!r}, seed {seed}: {exc}") from exc
    resolved = to_dict(full)
    picked = {k: v for k in spec.shared.keys for found, v in [_get(resolved, k)] if found}
    conditioned = (full.train.method == "qualiteacher" and full.train.score_condition
                   and full.model.conditioning.enabled)
    key = hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
    return Run(row, seed, folder, config, key, conditioned, host)


def _select_rows(spec: ProxySpec, task: str, rows: Sequence[str] | None) -> tuple[str, ...]:
    if not rows:
        return spec.tasks[task].rows
    if unknown := [r for r in rows if r not in spec.rows]:
        raise ProxyError(f"--rows: no row named {', '.join(map(repr, unknown))} (rows: {', '.join(spec.rows)})")
    in_task = [r for r in spec.tasks[task].rows if r in rows]
    return tuple(in_task + [r for r in dict.fromkeys(rows) if r not in in_task])


def _evaluated_on_disk(out: Path, seed: int) -> bool:
    return any(p.is_file() for p in out.glob(f"*/seed_{seed}/{METRICS}"))


def build_plan(spec: ProxySpec, task: str | None = None, scale: str | None = None, rows: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None, out: str | Path = "results/proxy", gpus: int | None = None) -> Plan:
    """Every run and reference row of a benchmark, seed by seed (so each seed's first run hosts the others).

    Args:
        spec: the proxy file.
        task, scale: names in the proxy file (None = its defaults).
        rows: a subset of rows (None = the task's rows), kept in the task's order.
        seeds: replaces every row's seeds (None = the task's, else each row's).
        out: the benchmark folder; runs go to ``out/<task>/<row>/seed_<s>``.
        gpus: the Snakemake ``gpu`` resource (None = the scale's).
    """
    task, scale = task or spec.default_task, scale or spec.default_scale
    for kind, name, table in (("task", task, spec.tasks), ("scale", scale, spec.scales)):
        if name not in table:
            raise ProxyError(f"--{kind} {name!r}: not in {spec.path} (has {', '.join(table)})")
    names = _select_rows(spec, task, rows)
    task_out = Path(out).resolve() / task
    seeds_of = {r: tuple(seeds) if seeds else spec.tasks[task].seeds or spec.rows[r].seeds for r in names}
    order = list(dict.fromkeys(s for r in names for s in seeds_of[r]))
    runs: list[Run] = []
    refs: list[Reference] = []
    for seed in order:
        for r in (r for r in names if seed in seeds_of[r]):
            ref = spec.rows[r].reference
            if ref is not None:
                refs.append(Reference(r, seed, ref))
            else:
                runs.append(_make_run(spec, task, scale, r, seed, task_out))
        needs_host = any(x.seed == seed for x in refs) and not any(x.seed == seed for x in runs)
        if needs_host and not _evaluated_on_disk(task_out, seed):
            trained = [r for r in spec.tasks[task].rows if spec.rows[r].reference is None]
            if not trained:
                raise ProxyError(f"task {task!r}: reference rows need a trained row to run at seed {seed}")
            runs.append(_make_run(spec, task, scale, trained[0], seed, task_out, host=True))
    return Plan(task, scale, task_out, names, tuple(runs), tuple(refs),
                spec.scales[scale].gpus if gpus is None else gpus)


def _is_fresh(folder: Path) -> bool:
    """The run's evaluation exists and is newer than its config."""
    metrics, config = folder / METRICS, folder / "config.yaml"
    return metrics.is_file() and config.is_file() and metrics.stat().st_mtime > config.stat().st_mtime


def _config_text(run: Run) -> str:
    head = f"# proxy benchmark run: row {run.row}, seed {run.seed} (written by benchmarks/proxy/run.py)\n"
    return head + yaml.safe_dump(run.config, sort_keys=False)


def _up_to_date(run: Run) -> bool:
    path = run.folder / "config.yaml"
    return _is_fresh(run.folder) and path.read_text(encoding="utf-8") == _config_text(run)


def describe_plan(plan: Plan, spec: ProxySpec, force: bool = False) -> str:
    """The plan as text: what each (row, seed) will do, and where."""
    lines = [(f"proxy benchmark: task {plan.task}, scale {plan.scale}, {len(plan.runs)} runs, "
              f"{len(plan.references)} reference rows; out {plan.out}"),
             f"rows: {', '.join(plan.rows)}", ""]
    width = max([len(r) for r in plan.rows] + [4])
    lines.append(f"{'row':<{width}}  seed  action")
    hosts: dict[str, Run] = {}
    for run in plan.runs:
        donor = hosts.get(run.shared_key)
        on_disk = None if force or donor is not None else _find_donor(run, {}, force=False)
        if _up_to_date(run) and not force:
            action = "skip (evaluation newer than config)"
        elif donor is not None:
            action = f"run, data + pretrain copied from {donor.row}/seed_{donor.seed}"
        elif on_disk is not None:
            action = f"run, data + pretrain copied from {on_disk.parent.name}/{on_disk.name} (on disk)"
        else:
            action = "run, with data + pretrain" + (" (host of the reference rows)" if run.host else "")
        hosts.setdefault(run.shared_key, run)
        lines.append(f"{run.row:<{width}}  {run.seed:>4}  {action}\n{'':<{width}}        -> {run.folder}")
    for ref in plan.references:
        lines.append(f"{ref.row:<{width}}  {ref.seed:>4}  read method {ref.method!r} from a seed_{ref.seed} run")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Job:
    """One Snakemake job from its log: rule, job id, start and end (seconds since the epoch)."""

    rule: str
    jobid: int
    start: float
    end: float | None


_BLOCK = re.compile(r"\n(?=\[\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4}\])")
_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")


def parse_jobs(text: str) -> list[Job]:
    """Every job that a Snakemake log started, with its start and finish times (1 s resolution)."""
    starts: dict[int, tuple[str, float]] = {}
    ends: dict[int, float] = {}
    for block in _BLOCK.split("\n" + text):
        stamp = _STAMP.match(block.strip())
        if not stamp:
            continue
        t = time.mktime(time.strptime(stamp.group(1), "%a %b %d %H:%M:%S %Y"))
        start = re.search(r"^(?:local)?rule (\w+):.*?jobid: (\d+)", block.strip(), flags=re.DOTALL | re.MULTILINE)
        if start:
            starts[int(start.group(2))] = (start.group(1), t)
        for done in re.finditer(r"Finished jobid: (\d+)", block):
            ends[int(done.group(1))] = t
    return [Job(rule, jid, t0, ends.get(jid)) for jid, (rule, t0) in sorted(starts.items())]


def rule_times(jobs: Iterable[Job]) -> dict[str, dict[str, float]]:
    """Per rule: number of jobs and the sum of their durations (the ``all`` rule left out)."""
    out: dict[str, dict[str, float]] = {}
    for job in jobs:
        if job.rule == "all":
            continue
        entry = out.setdefault(job.rule, {"jobs": 0, "seconds": 0.0})
        entry["jobs"] += 1
        entry["seconds"] += (job.end - job.start) if job.end is not None else math.nan
    return out


def snakemake_command(config: Path, cores: int, gpus: int) -> list[str]:
    exe = Path(sys.executable).with_name("snakemake")
    return [str(exe) if exe.exists() else (shutil.which("snakemake") or "snakemake"),
            "--snakefile", str(SNAKEFILE), "--directory", str(ROOT), "--configfile", str(config),
            "--cores", str(cores), "--resources", f"gpu={gpus}",
            # A run killed mid-job leaves "incomplete" outputs that Snakemake refuses to touch
            # without this flag; the harness always wants them redone.
            "--rerun-incomplete",
            # `-q host` rather than a bare `-q` (the output goes to the run's snakemake.log, not the
            # console, anyway): a bare -q, or -q progress, also drops the "rule X:" and "Finished
            # jobid" lines, and those are how we time each rule and check that a run did not redo
            # the shared stages.
            "-q", "host"]


def copy_shared(donor: Path, folder: Path, items: Iterable[str]) -> list[str]:
    """Copy the shared stages' outputs from ``donor`` into ``folder``, keeping every mtime.

    Snakemake then sees them as up to date: their inputs are still older than them
    (mtime trigger), and the copies have no metadata record in ``.snakemake/``, for
    which Snakemake only prints a note; the params, input and code triggers compare
    against recorded metadata and have none to compare with. That is why the
    harness itself only copies between runs that agree on ``shared.keys`` (the
    params of those rules). A script newer than the copies (an edited
    ``workflow/scripts/pretrain.py``) would still rerun them, as it should.
    """
    copied = []
    for item in items:
        src, dst = donor / item, folder / item
        if not src.exists() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
        else:
            shutil.copy2(src, dst)
        copied.append(item)
    return copied


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (Snakemake and its jobs).

    Less sensitive than wall time to what else the machine runs, though not immune: torch's
    thread pools spin while they wait, so an oversubscribed machine inflates it too.
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _file_state(path: Path) -> list[int] | None:
    return [path.stat().st_mtime_ns, path.stat().st_size] if path.is_file() else None


def _find_donor(run: Run, donors: Mapping[str, Path], force: bool) -> Path | None:
    """A finished run of the same seed and shared keys: from this invocation, else (without
    ``force``, which redoes runs from scratch) one on disk."""
    if run.shared_key in donors or force:
        return donors.get(run.shared_key)
    for record_path in sorted(run.folder.parent.parent.glob(f"*/seed_{run.seed}/{RUN_RECORD}")):
        record = json.loads(record_path.read_text())
        folder = record_path.parent
        if folder != run.folder and record.get("status") == "ok" and record.get("shared_key") == run.shared_key:
            return folder
    return None


def _write_config(run: Run, force: bool) -> Path:
    """Write (only when changed, so that its mtime means something) and validate the run's config."""
    path = run.folder / "config.yaml"
    if force and path.is_file():
        shutil.rmtree(run.folder)  # only a folder the harness made: it has our config.yaml
    run.folder.mkdir(parents=True, exist_ok=True)
    text = _config_text(run)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    load_config(path)
    return path


def execute_run(run: Run, spec: ProxySpec, donors: dict[str, Path], cores: int, gpus: int,
                force: bool) -> dict[str, Any]:
    """Run one (row, seed) through Snakemake (or skip it when up to date); returns its record."""
    config = _write_config(run, force)
    record_path = run.folder / RUN_RECORD
    if not force and _is_fresh(run.folder):
        old = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if old.get("status", "ok") == "ok":
            donors.setdefault(run.shared_key, run.folder)
        return {**old, "row": run.row, "seed": run.seed, "folder": str(run.folder), "this_invocation": "skipped"}
    donor = _find_donor(run, donors, force)
    copied = copy_shared(donor, run.folder, spec.shared.copy) if donor is not None else []
    checkpoint = run.folder / spec.shared.checkpoint
    before = _file_state(checkpoint)
    cmd = snakemake_command(config, cores, gpus)
    log.info("run %s/seed_%d%s", run.row, run.seed, f" (data + pretrain from {donor.parent.name})" if copied else "")
    t0, cpu0 = time.time(), _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds, cpu = time.time() - t0, _children_cpu() - cpu0
    text = proc.stdout + proc.stderr
    (run.folder / "snakemake.log").write_text(text, encoding="utf-8")
    jobs = parse_jobs(text)
    reran = sorted({j.rule for j in jobs} & set(spec.shared.rules))
    changed = bool(copied) and before is not None and _file_state(checkpoint) != before
    if copied and (reran or changed):
        log.warning("%s/seed_%d: got data + pretrain from %s, but Snakemake reran %s (see %s)", run.row,
                    run.seed, donor, ", ".join(reran) or spec.shared.checkpoint, run.folder / "snakemake.log")
    status = "ok" if proc.returncode == 0 and (run.folder / METRICS).is_file() else "failed"
    if status == "failed":
        log.error("%s/seed_%d failed (exit %d): %s\n%s", run.row, run.seed, proc.returncode, shlex.join(cmd),
                  text[-3000:])
    record = {"row": run.row, "seed": run.seed, "folder": str(run.folder), "status": status,
              "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
              "shared_from": str(donor) if copied else None, "copied": copied,
              "shared_rules_rerun": reran, "checkpoint_changed": changed, "shared_key": run.shared_key,
              "rules": rule_times(jobs), "command": shlex.join(cmd), "host": run.host,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    if status == "ok":
        donors.setdefault(run.shared_key, run.folder)
    return {**record, "this_invocation": "ran"}


# --------------------------------------------------------------------------- collecting


def _spearman(x: Sequence[float], y: Sequence[float], resolution: float = 0.01) -> float:
    """Spearman's rho (average ranks for ties); NaN when either side is constant or too short.

    ``y`` is rounded to ``resolution`` first (0.01 dB of PSNR), so a condition that does
    nothing gives NaN, not a rho of +-1 ranked from float noise.
    """
    xs = pd.Series(x, dtype=float).rank()
    ys = (pd.Series(y, dtype=float) / resolution).round().rank()
    if len(xs) < 2 or xs.nunique() < 2 or ys.nunique() < 2:
        return math.nan
    return float(np.corrcoef(xs, ys)[0, 1])


def _metric_columns(metrics: pd.DataFrame) -> list[str]:
    return [c for c in metrics.columns if c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(metrics[c])]


def _mean(frame: pd.DataFrame, cols: Sequence[str]) -> dict[str, float]:
    return {c: float(frame[c].mean()) if len(frame) else math.nan for c in cols}


def _student_at_top(metrics: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The student at its top condition level, or the unconditioned student (level NaN)."""
    student = metrics[metrics["method"] == "student"]
    levels = student["level"].dropna()
    if levels.empty:
        return student, "student"
    top = levels.max()
    return student[student["level"] == top], f"student@{top:g}"


def seed_record(metrics: pd.DataFrame, conditioned: bool, delta_vs: str, reference: str | None = None) -> dict:
    """One (row, seed): the means over test images that the table is made of.

    Args:
        metrics: that run's ``eval/metrics.parquet``.
        conditioned: report the controllability curve (mean PSNR per level) and its Spearman rho.
        delta_vs: the method dPSNR is measured against (the pretrained model), paired within the run.
        reference: for a reference row, the method to report instead of the student.
    """
    cols = _metric_columns(metrics)
    if reference is not None:
        chosen, what = metrics[metrics["method"] == reference], reference
    else:
        chosen, what = _student_at_top(metrics)
    rec: dict[str, Any] = {"method": what, "n_images": int(chosen["image_id"].nunique()), **_mean(chosen, cols)}
    teacher = metrics[metrics["method"] == "teacher"]
    for c in ("psnr", "ssim"):
        if c in cols:
            rec[f"teacher_{c}"] = _mean(teacher, [c])[c] if reference is None else math.nan
    base = metrics[metrics["method"] == delta_vs]
    rec["dpsnr"] = rec.get("psnr", math.nan) - _mean(base, ["psnr"])["psnr"] if "psnr" in cols else math.nan
    rec["spearman"] = math.nan
    student = metrics[(metrics["method"] == "student") & metrics["level"].notna()]
    if conditioned and reference is None and "psnr" in cols and not student.empty:
        curve = student.groupby("level")["psnr"].mean()
        rec.update({f"psnr_level_{lvl:g}": float(v) for lvl, v in curve.items()})
        rec["spearman"] = _spearman(list(curve.index), list(curve.values))
        rec["curve_range"] = float(curve.max() - curve.min())  # dB between the best and worst level
    return rec


def _reference_source(plan: Plan, seed: int, method: str) -> Path | None:
    """A run folder of ``seed`` whose evaluation has ``method`` rows: the plan's first, else any on disk."""
    planned = [r.folder for r in plan.runs if r.seed == seed]
    on_disk = sorted(p.parent.parent for p in plan.out.glob(f"*/seed_{seed}/{METRICS}"))
    for folder in dict.fromkeys(planned + on_disk):
        path = folder / METRICS
        if path.is_file() and (pd.read_parquet(path, columns=["method"])["method"] == method).any():
            return folder
    return None


def collect(plan: Plan, spec: ProxySpec) -> pd.DataFrame:
    """One record per (row, seed) that has an evaluation; warns about the ones that have none."""
    records = []
    for run in (r for r in plan.runs if r.row in plan.rows):
        path = run.folder / METRICS
        if not path.is_file():
            log.warning("%s/seed_%d: no %s, left out of the table", run.row, run.seed, path)
            continue
        metrics = pd.read_parquet(path)
        if not (metrics["method"] == spec.delta_vs).any():
            log.warning("%s has no %r rows (does the evaluation write them yet?): dPSNR left empty", path,
                        spec.delta_vs)
        records.append({"row": run.row, "seed": run.seed, "folder": str(run.folder),
                        **seed_record(metrics, run.conditioned, spec.delta_vs)})
    for ref in plan.references:
        folder = _reference_source(plan, ref.seed, ref.method)
        if folder is None:
            log.warning("row %s, seed %d: no seed_%d evaluation under %s has %r rows; row skipped", ref.row,
                        ref.seed, ref.seed, plan.out, ref.method)
            continue
        metrics = pd.read_parquet(folder / METRICS)
        records.append({"row": ref.row, "seed": ref.seed, "folder": str(folder),
                        **seed_record(metrics, False, spec.delta_vs, reference=ref.method)})
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    order = {r: i for i, r in enumerate(plan.rows)}
    return frame.sort_values(["row", "seed"], key=lambda s: s.map(order) if s.name == "row" else s,
                             ignore_index=True)


def aggregate(per_seed: pd.DataFrame, spec: ProxySpec) -> pd.DataFrame:
    """Mean and std over seeds of every number of :func:`seed_record`, one row per benchmark row."""
    values = [c for c in per_seed.columns if c not in ("row", "seed", "folder", "method", "n_images")]
    out = []
    for row, group in per_seed.groupby("row", sort=False):
        rec: dict[str, Any] = {"row": row, "label": spec.rows[row].label, "method": group["method"].iloc[0],
                               "n_seeds": len(group), "seeds": ",".join(map(str, group["seed"])),
                               "n_images": int(group["n_images"].iloc[0])}
        for c in values:
            rec[f"{c}_mean"] = float(group[c].mean()) if group[c].notna().any() else math.nan
            rec[f"{c}_std"] = float(group[c].std(ddof=1)) if group[c].notna().sum() > 1 else math.nan
        rec["dpsnr_per_seed"] = ", ".join("n/a" if math.isnan(v) else f"{v:+.2f}" for v in group["dpsnr"])
        out.append(rec)
    return pd.DataFrame.from_records(out)


# --------------------------------------------------------------------------- the headroom of the labels

#: per_seed column of the teacher's plain PSNR in round r (the headroom table's ``plain``)
TEACHER_ROUND = "teacher_psnr_round_{r}"
HEADROOM_KEYS = ("row", "seed")


def headroom_paths(folder: Path) -> list[Path]:
    """A run's ``round_{r}/headroom.parquet`` for r = 0, 1, ... while they exist."""
    layout, paths = Layout(folder), []
    while layout.headroom(len(paths)).is_file():
        paths.append(layout.headroom(len(paths)))
    return paths


def collect_headroom(plan: Plan) -> pd.DataFrame:
    """Every trained run's headroom summary: one row per (row, seed, round, column), see
    :func:`qtlib.headroom_table.summarize_round` (mean PSNR, d vs plain, shares better / unrestored / S first)."""
    parts = []
    for run in (r for r in plan.runs if r.row in plan.rows):
        paths = headroom_paths(run.folder)
        if not paths:
            log.info("%s/seed_%d: no round_*/headroom.parquet, left out of the headroom table", run.row, run.seed)
            continue
        summary = summarize_headroom(read_headroom(paths))
        parts.append(summary.assign(row=run.row, seed=run.seed))
    if not parts:
        return pd.DataFrame()
    frame = pd.concat(parts, ignore_index=True)
    return frame[[*HEADROOM_KEYS, *[c for c in frame.columns if c not in HEADROOM_KEYS]]]


def with_teacher_rounds(per_seed: pd.DataFrame, headroom: pd.DataFrame) -> pd.DataFrame:
    """``per_seed`` with the teacher's plain PSNR of each round (:data:`TEACHER_ROUND`) from the headroom."""
    if headroom.empty or per_seed.empty:
        return per_seed
    plain = headroom[headroom["column"] == PLAIN].pivot(index=list(HEADROOM_KEYS), columns="round", values="psnr")
    plain.columns = [TEACHER_ROUND.format(r=int(r)) for r in plain.columns]
    return per_seed.merge(plain.reset_index(), on=list(HEADROOM_KEYS), how="left")


def _headroom_cell(values: pd.DataFrame, column: str) -> str:
    """``d vs plain (share better)`` as mean ± std over seeds; the plain PSNR itself for ``plain``."""
    v = values[values["column"] == column]
    if v.empty:
        return ""
    if column == PLAIN:
        return _cell(float(v["psnr"].mean()), float(v["psnr"].std(ddof=1)), 2)
    share = float(v["share_better"].mean())
    d = _cell(float(v["d_vs_plain"].mean()), float(v["d_vs_plain"].std(ddof=1)), 2)
    return f"{'+' if not d.startswith('-') else ''}{d} ({100 * share:.0f}%)" if d else ""


def headroom_markdown(headroom: pd.DataFrame, plan: Plan) -> str:
    """The headroom table as Markdown: per row, its round 0 and its last round, mean ± std over seeds."""
    labels = [c for c in dict.fromkeys(headroom["column"]) if c != PLAIN]
    head = ["row", "round", "n seeds", "plain PSNR", *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, group in headroom.groupby("row", sort=False):
        for r in sorted({int(group["round"].min()), int(group["round"].max())}):
            at = group[group["round"] == r]
            cells = [row, str(r), str(at["seed"].nunique()), *[_headroom_cell(at, c) for c in (PLAIN, *labels)]]
            lines.append("| " + " | ".join(cells) + " |")
    intro = (f"# Headroom of the pseudo-labels: {plan.task} (scale {plan.scale})\n\n"
             "Per row, the round-0 and last-round teacher (the teacher that labels the round) on the test images: "
             "`plain` is the PSNR of its output on the image itself; every other cell is the label's PSNR minus "
             "plain (dB) with the share of images where it beats plain, mean ± std over seeds. `mean` is the "
             "pixel mean of the views, `s_first` the label the ensemble S ranks first, `gt_best` the best label "
             "by ground truth. Per-image tables: `<row>/seed_<s>/round_<r>/headroom.parquet`; all numbers: "
             "`headroom.parquet` here.\n\n")
    return intro + "\n".join(lines) + "\n"


def _cell(mean: float, std: float, digits: int) -> str:
    if mean is None or math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" + ("" if std is None or math.isnan(std) else f" ± {std:.{digits}f}")


def _stat(row: pd.Series, name: str, digits: int) -> str:
    """``mean ± std`` of ``name`` in one aggregated row."""
    return _cell(row.get(f"{name}_mean", math.nan), row.get(f"{name}_std", math.nan), digits)


def _teacher_rounds(row: pd.Series) -> str:
    """The teacher's mean PSNR per round (the headroom tables' plain), then the final teacher's, joined by →."""
    rounds = sorted((int(m.group(1)), c) for c in row.index
                    if (m := re.fullmatch(TEACHER_ROUND.format(r=r"(\d+)") + "_mean", c)))
    values = [row[c] for _, c in rounds] + [row.get("teacher_psnr_mean", math.nan)]
    finite = [f"{v:.2f}" for v in values if isinstance(v, float) and not math.isnan(v)]
    return " → ".join(finite) if len(finite) > 1 else ""


def _direction(metric: str) -> str:
    """An arrow from qtlib's metric catalog (pyiqa's own metadata); none when the catalog has no entry."""
    try:
        from qtlib.iqa import (
            CATALOG,  # imports pyiqa (seconds): only when a table is written
        )
    except ImportError:
        return ""
    info = CATALOG.get(metric)
    return "" if info is None else (" ↓" if info.lower_better else " ↑")


def to_markdown(table: pd.DataFrame, plan: Plan, spec: ProxySpec) -> str:
    """The table as Markdown: row, seeds, PSNR, dPSNR vs pretrained, SSIM, the NR panel, Spearman, teacher."""
    nr = [c[: -len("_mean")] for c in table.columns
          if c.endswith("_mean") and c[: -len("_mean")] not in ("psnr", "ssim", "dpsnr", "spearman", "curve_range")
          and not c.startswith(("teacher_", "psnr_level_"))]
    head = ["row", "what", "n seeds", "PSNR ↑", f"dPSNR vs {spec.delta_vs}", "per seed dPSNR", "SSIM ↑",
            *[f"{m.upper()}{_direction(m)}" for m in nr], "Spearman(level, PSNR)", "teacher PSNR",
            "teacher PSNR per round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [r["row"], r["label"], str(r["n_seeds"]), _stat(r, "psnr", 2), _stat(r, "dpsnr", 2),
                 str(r.get("dpsnr_per_seed", "")), _stat(r, "ssim", 3), *[_stat(r, m, 2) for m in nr],
                 _stat(r, "spearman", 2), _stat(r, "teacher_psnr", 2), _teacher_rounds(r)]
        lines.append("| " + " | ".join(cells) + " |")
    n_images = int(table["n_images"].max()) if len(table) else 0
    intro = (f"# Proxy benchmark: {plan.task} (scale {plan.scale})\n\n"
             f"Test set: {n_images} held-out images per seed under the target recipe, with ground truth. "
             "Each trained row reports its final student at the top condition level (the unconditioned "
             f"student where there are no levels); mean ± std over seeds. dPSNR is the student minus the "
             f"{spec.delta_vs} model of the same run (so paired by seed). Spearman(level, PSNR) is over the "
             "condition levels, for rows trained with a score condition. teacher PSNR: the final EMA teacher; "
             "per round: the teacher that labels round 0, 1, ... (its plain output in the headroom tables), then "
             "the final one, means over seeds.\n\n")
    return intro + "\n".join(lines) + "\n"


def plot_controllability(per_seed: pd.DataFrame, table: pd.DataFrame, path: Path, delta_vs: str) -> Path:
    """Mean PSNR per condition level (± std over seeds) of the conditioned rows; the other rows as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    level_cols = sorted((c for c in per_seed.columns if c.startswith("psnr_level_")),
                        key=lambda c: float(c[len("psnr_level_"):]))
    for i, (row, group) in enumerate(per_seed.groupby("row", sort=False)):
        curve = group[level_cols].dropna(how="all", axis=1) if level_cols else group.iloc[:, :0]
        if curve.shape[1] and curve.notna().any().any():
            x = [float(c[len("psnr_level_"):]) for c in curve.columns]
            mean, std = curve.mean(), curve.std(ddof=1).fillna(0.0)
            ax.plot(x, mean.values, "o-", color=f"C{i % 10}", label=f"{row} (n={len(group)})")
            ax.fill_between(x, (mean - std).values, (mean + std).values, color=f"C{i % 10}", alpha=0.2)
        else:
            psnr = float(group["psnr"].mean()) if "psnr" in group else math.nan
            style = ":" if row == delta_vs or group["method"].iloc[0] == delta_vs else "--"
            ax.axhline(psnr, linestyle=style, color=f"C{i % 10}", label=f"{row} (n={len(group)})")
    ax.set_xlabel("condition level")
    ax.set_ylabel("PSNR (dB), mean over test images")
    ax.set_title("Controllability: student PSNR per condition level", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_tables(plan: Plan, spec: ProxySpec) -> pd.DataFrame:
    """Collect, aggregate and write table.parquet, per_seed.parquet, table.md, controllability.png and, where
    the runs have headroom tables, headroom.parquet and headroom.md."""
    headroom = collect_headroom(plan)
    per_seed = with_teacher_rounds(collect(plan, spec), headroom)
    plan.out.mkdir(parents=True, exist_ok=True)
    if not headroom.empty:
        headroom.to_parquet(plan.out / "headroom.parquet", index=False)
        (plan.out / "headroom.md").write_text(headroom_markdown(headroom, plan), encoding="utf-8")
    if per_seed.empty:
        log.warning("nothing to collect under %s", plan.out)
        return per_seed
    table = aggregate(per_seed, spec)
    per_seed.to_parquet(plan.out / "per_seed.parquet", index=False)
    table.to_parquet(plan.out / "table.parquet", index=False)
    (plan.out / "table.md").write_text(to_markdown(table, plan, spec), encoding="utf-8")
    plot_controllability(per_seed, table, plan.out / "controllability.png", spec.delta_vs)
    return table


# --------------------------------------------------------------------------- provenance and CLI


def machine() -> dict[str, Any]:
    """Where the benchmark ran: platform, CPU count, torch version and GPUs (from nvidia-smi)."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "processor": platform.processor(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "node": platform.node()}
    try:
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    if smi := shutil.which("nvidia-smi"):
        proc = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                              check=False)
        info["gpus"] = [g.strip() for g in proc.stdout.splitlines() if g.strip()]
    return info


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.proxy.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_PROXY), help="the proxy file (default: config/proxy.yaml)")
    p.add_argument("--out", default="results/proxy", help="benchmark folder (default: results/proxy)")
    p.add_argument("--task", default=None, help="a task of the proxy file (default: its default_task, rain)")
    p.add_argument("--rows", type=_csv, default=None, help="comma-separated subset of rows (default: the task's)")
    p.add_argument("--seeds", type=lambda v: [int(s) for s in _csv(v)], default=None,
                   help="comma-separated seeds for every row (default: each row's)")
    p.add_argument("--scale", default=None, help="a scale of the proxy file: cpu, gpu, tiny (default: cpu)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="Snakemake --cores (default: all)")
    p.add_argument("--gpus", type=int, default=None, help="Snakemake --resources gpu=N (default: the scale's)")
    p.add_argument("--force", action="store_true",
                   help="redo the selected (row, seed) folders from scratch, even if up to date; they share "
                        "data + pretraining only among themselves")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan (rows, seeds, folders) and exit")
    mode.add_argument("--collect-only", action="store_true", help="only rebuild the table from existing folders")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    try:
        spec = load_proxy(args.config)
        plan = build_plan(spec, args.task, args.scale, args.rows, args.seeds, args.out, args.gpus)
    except (ProxyError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe_plan(plan, spec, args.force))
        return 0
    t0, started, records = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S"), []
    if not args.collect_only:
        donors: dict[str, Path] = {}
        records = [execute_run(run, spec, donors, args.cores, plan.gpus, args.force) for run in plan.runs]
    table = write_tables(plan, spec)
    if not args.collect_only:
        run_json = {"command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.proxy.run",
                                           *(sys.argv[1:] if argv is None else argv)]),
                    "task": plan.task, "scale": plan.scale, "proxy_file": str(spec.path), "cores": args.cores,
                    "gpus": plan.gpus, "machine": machine(), "qtlib": git_commit(), "started": started,
                    "total_seconds": round(time.time() - t0, 1), "runs": records}
        (plan.out / "run.json").write_text(json.dumps(run_json, indent=1), encoding="utf-8")
    if not table.empty:
        print((plan.out / "table.md").read_text(encoding="utf-8"))
    failed = [f"{r['row']}/seed_{r['seed']}" for r in records if r.get("status") == "failed"]
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
