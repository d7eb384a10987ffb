"""Machine-readable benchmark records: ``--json PATH`` writes one object per benchmark (or variant).

Every object carries what is needed to compare runs: the benchmark's name, the
command that produced it, the machine, the device, torch/pyiqa versions, and
the benchmark's own fields (metrics, sizes, batch, figures, ratios). A file is a
JSON list of such objects; :mod:`benchmarks.table` turns the committed files in
``benchmarks/results/`` into the README's table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def device_name(device: str) -> str:
    """A human name of ``device`` (the GPU model, or the CPU with its thread count)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def environment(device: str) -> dict[str, Any]:
    """Machine, device and library versions of this process."""
    import pyiqa
    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "pyiqa": pyiqa.__version__,
        "python": platform.python_version(),
    }


def record(benchmark: str, device: str, **fields: Any) -> dict[str, Any]:
    """One result object: ``benchmark``, the environment, then ``fields``."""
    return {"benchmark": benchmark, **environment(device), **fields}


def write_json(path: str | Path | None, objects: list[dict[str, Any]]) -> None:
    """Write ``objects`` as a JSON list to ``path`` (nothing when ``path`` is None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(objects, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    print(f"wrote {len(objects)} record(s) to {path}")


def default_name(benchmark: str, device: str) -> Path:
    """``benchmarks/results/<date>_<device>_<benchmark>.json``, the committed naming."""
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS / f"{day}_{device.split(':')[0]}_{benchmark}.json"
