"""Packaging: files the package reads at run time must ship in a (non-editable) wheel.

The editable install the tests run under reads straight from the checkout, so
only a built wheel shows whether package-data is complete.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "qtlib/config/config.schema.yaml"


def test_schema_lives_in_the_package() -> None:
    real, link = ROOT / SCHEMA, ROOT / "workflow" / "schemas" / "config.schema.yaml"
    assert real.is_file() and not real.is_symlink()
    # Snakemake's validate() opens the workflow path; it must reach the same file.
    assert link.resolve() == real.resolve()


def test_schema_is_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "config/config.schema.yaml" in pyproject["tool"]["setuptools"]["package-data"]["qtlib"]


def _build_wheel(out: Path) -> Path:
    """Build the wheel from a clean copy (an in-tree build/lib could hold stale files)."""
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "qtlib", src / "qtlib", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(src), "-w", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("qtlib-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_ships_the_schema_as_a_regular_file(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as whl:
        assert SCHEMA in whl.namelist(), f"{SCHEMA} missing from {wheel.name}"
        info = whl.getinfo(SCHEMA)
        mode = info.external_attr >> 16
        assert not info.is_dir() and (mode == 0 or stat.S_ISREG(mode)), oct(mode)
        assert whl.read(info) == (ROOT / SCHEMA).read_bytes()
