"""GPU leases: concurrent jobs pick distinct free devices, or fall back to CPU.

Snakemake counts ``gpu`` resources but does not say *which* device a job gets.
A job leases device ids itself: it takes a non-blocking ``fcntl.flock`` on one
lock file per device (``<lock_dir>/gpu<ID>.lock``), keeps the locks for its
lifetime, and sets ``CUDA_VISIBLE_DEVICES`` to the leased ids before torch
initializes CUDA. The kernel drops a lock when its process dies, so a crashed
job never leaves a device taken.

The candidate devices are, in order of precedence: the ids in a scheduler-set
``CUDA_VISIBLE_DEVICES`` (SLURM sets it per job: then those are ours and no
locking is needed unless several jobs share the allocation), else the GPUs that
``nvidia-smi`` lists, else none (CPU).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger(__name__)
DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "qtlib-gpu-locks"


@dataclass(frozen=True)
class Lease:
    """The devices a job holds: ``devices`` empty means CPU."""

    devices: tuple[str, ...]

    @property
    def device(self) -> str:
        """Torch device string for the job (the first leased GPU is ``cuda:0`` after masking)."""
        return "cuda" if self.devices else "cpu"


def visible_gpus() -> list[str]:
    """GPU ids this job may use: a scheduler's ``CUDA_VISIBLE_DEVICES``, else nvidia-smi's list."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _try_lock(path: Path) -> IO[str] | None:
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


@contextmanager
def lease_gpus(n: int, candidates: list[str] | None = None, lock_dir: str | Path = DEFAULT_LOCK_DIR,
               set_env: bool = True) -> Iterator[Lease]:
    """Hold ``n`` free GPUs for the duration of the block (fewer if fewer are free; none = CPU).

    Args:
        n: devices wanted (0 = CPU job).
        candidates: device ids to choose from (default :func:`visible_gpus`).
        lock_dir: folder of the lock files, shared by all jobs on the machine.
        set_env: set ``CUDA_VISIBLE_DEVICES`` to the leased ids (empty string on CPU).
    """
    candidates = visible_gpus() if candidates is None else candidates
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: list[tuple[str, IO[str]]] = []
    try:
        for dev in candidates:
            if len(held) >= n:
                break
            fh = _try_lock(lock_dir / f"gpu{dev}.lock")
            if fh is not None:
                held.append((dev, fh))
        lease = Lease(tuple(d for d, _ in held))
        if n > 0 and len(held) < n:
            log.warning("wanted %d GPU(s), leased %s (candidates %s)", n, list(lease.devices) or "none, CPU",
                        candidates)
        if set_env:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(lease.devices)
        yield lease
    finally:
        for _, fh in held:
            fh.close()
