"""GPU leases: distinct devices for concurrent jobs, CPU fallback, scheduler's CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtlib.lease import lease_gpus, visible_gpus


def test_two_concurrent_leases_never_share(tmp_path: Path) -> None:
    with lease_gpus(1, ["0", "1"], tmp_path, set_env=False) as a, lease_gpus(1, ["0", "1"], tmp_path, set_env=False) as b:
        assert a.devices == ("0",) and b.devices == ("1",)
        with lease_gpus(1, ["0", "1"], tmp_path, set_env=False) as c:
            assert c.devices == () and c.device == "cpu"  # none left: CPU fallback
    with lease_gpus(2, ["0", "1"], tmp_path, set_env=False) as d:
        assert d.devices == ("0", "1")  # released on exit


def test_lease_across_processes_and_release_on_exit(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from qtlib.lease import lease_gpus\n"
        f"with lease_gpus(1, ['0', '1'], {str(tmp_path)!r}) as l:\n"
        "    import os; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0"
    with lease_gpus(1, ["0", "1"], tmp_path, set_env=False) as mine:
        assert mine.devices == ("1",)
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    with lease_gpus(1, ["0", "1"], tmp_path, set_env=False) as after:
        assert after.devices == ("0",)  # the dead process's lock is gone


def test_scheduler_cuda_visible_devices_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]
    with lease_gpus(1, lock_dir=tmp_path) as lease:
        assert lease.devices == ("3",) and os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_no_gpu_means_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with lease_gpus(1, lock_dir=tmp_path) as lease:
        assert lease.device == "cpu" and os.environ["CUDA_VISIBLE_DEVICES"] == ""
