"""Leak check: no test image may also be a training image (paired or unlabeled).

The manifests written by ``qt prepare`` hold the sha256 of every file's bytes
(``sha256``, and ``clean_sha256`` for the clean side of a paired set), so the
check is a join on those hashes: no file is read again. A test file whose bytes
equal a paired or unlabeled file, on either side of a pair (a test ground truth
that is also a training target is a leak too), is an error that names both
files; ``data.leaks: warn`` logs it instead, for users who do this on purpose.

The comparison is of exact bytes: a re-encoded or resized copy is not found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa

from qtlib.data.store import commit_path, staging_path, write_parquet

log = logging.getLogger(__name__)

LeakMode = Literal["error", "warn"]

#: The columns of the leak report: one row per (test file, training file) pair with equal bytes.
LEAK_SCHEMA = pa.schema([
    ("sha256", pa.string()),
    ("test_file", pa.string()),
    ("other_split", pa.string()),
    ("other_file", pa.string()),
])

#: Manifest columns that hold a file's hash, and the column of that file's path.
_HASHED = (("sha256", "path"), ("clean_sha256", "clean_path"))


class LeakError(ValueError):
    """A test image is also a training image; the message names both files."""


def _files(manifest: str | Path, root: str | Path) -> pd.DataFrame:
    """``(sha256, file)`` of every file a manifest hashed (both sides of a pair), ``file`` under ``root``."""
    frame = pd.read_parquet(manifest)
    parts = []
    for digest, path in _HASHED:
        if digest in frame.columns:
            part = frame.loc[frame[digest].fillna("") != "", [digest, path]]
            parts.append(pd.DataFrame({"sha256": part[digest].to_numpy(),
                                       "file": [str(Path(root) / p) for p in part[path]]}))
    return pd.concat(parts, ignore_index=True).drop_duplicates()


def find_leaks(test: tuple[str | Path, str | Path], others: Mapping[str, tuple[str | Path, str | Path]]) -> pd.DataFrame:
    """Every pair of a test file and a training file with the same bytes.

    Args:
        test: (test manifest, the folder its paths are relative to).
        others: split name -> (manifest, folder), e.g. ``{"paired": ..., "unlabeled": ...}``.

    Returns:
        A DataFrame with the columns of :data:`LEAK_SCHEMA` (empty when there is no leak), sorted.
    """
    test_files = _files(*test).rename(columns={"file": "test_file"})
    found = []
    for split, (manifest, root) in others.items():
        other = _files(manifest, root).rename(columns={"file": "other_file"}).assign(other_split=split)
        found.append(test_files.merge(other, on="sha256"))
    frame = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=LEAK_SCHEMA.names)
    return frame[LEAK_SCHEMA.names].sort_values(LEAK_SCHEMA.names, kind="stable").reset_index(drop=True)


def leak_message(leaks: pd.DataFrame, limit: int = 5) -> str:
    """One line per leaked pair (at most ``limit``, then a count), naming both files."""
    lines = [f"{r.test_file} has the same bytes as {r.other_split} file {r.other_file}"
             for r in leaks.head(limit).itertuples()]
    if len(leaks) > limit:
        lines.append(f"... and {len(leaks) - limit} more")
    return "\n".join(lines)


def check_leaks(test: tuple[str | Path, str | Path], others: Mapping[str, tuple[str | Path, str | Path]],
                out: str | Path, mode: LeakMode = "error") -> pd.DataFrame:
    """Find leaks (:func:`find_leaks`), write them to ``out`` (Parquet, atomically) and act on ``mode``.

    Args:
        test, others: as for :func:`find_leaks`.
        out: the report to write (written in both modes; empty when there is no leak).
        mode: ``error`` raises :class:`LeakError` on any leak, ``warn`` logs a warning.

    Returns:
        The leaks found.

    Raises:
        LeakError: ``mode == "error"`` and a test file is also a training file.
    """
    if mode not in ("error", "warn"):
        raise ValueError(f"mode: expected 'error' or 'warn', got {mode!r}")
    leaks = find_leaks(test, others)
    if len(leaks) and mode == "error":
        raise LeakError(f"{len(leaks)} test file(s) are also training files (set data.leaks: warn if this is on "
                        f"purpose):\n{leak_message(leaks)}")
    if len(leaks):
        log.warning("leak check: %d test file(s) are also training files (data.leaks: warn):\n%s", len(leaks),
                    leak_message(leaks))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(staging_path(out), leaks.to_dict("records"), LEAK_SCHEMA)
    commit_path(staging_path(out), out)
    return leaks
