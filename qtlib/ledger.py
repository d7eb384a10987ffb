"""The Parquet score ledger: one row per (image, augmentation) pseudo-label.

The schema lives here and only here (:func:`ledger_schema`); every write goes
through :func:`LedgerWriter` / :func:`write_table`, which enforce it, and
:func:`load` reads every round of a results folder back as one tidy DataFrame.

Columns (M = the ensemble's metrics, G = blocks per label, e.g. 4 for 2x2):

=================  ==========  =====================================================
column             type        meaning
=================  ==========  =====================================================
image_id           string      id of the unlabeled image (from ``qt prepare``)
source_index       int32       its row in the prepared ``images.zarr``
round              int32       round r whose teacher made the label
shard              int32       label shard k
index              int32       row of the image in the shard's label store
aug_index          int8        position of the augmentation in the store
augmentation       string      hflip, vflip, rot90 or identity
raw_<metric>       float64     raw pyiqa score of the whole label, per metric
norm_<metric>      float64     the same normalized to [0, 1], higher = better
S                  float64     ensemble score on the 0..10 condition scale
blocks_S           list<f32>   ensemble score of each block, row-major (G values)
teacher_hash       string      sha256 (16 hex) of the teacher checkpoint file
metric_versions    string      JSON: pyiqa version and metric identifiers
qtlib_version      string      version of qtlib that wrote the row
status             string      ok; nan_score (a whole or block score is NaN/inf);
                               nonfinite_label (the teacher output NaN/inf);
                               constant_label (a label or block without variation)
=================  ==========  =====================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qtlib.util.atomic import atomic_path, commit_file, discard, make_temp

KEY_COLUMNS = ("image_id", "source_index", "round", "shard", "index", "aug_index", "augmentation")
STATUS_OK = "ok"
STATUS_NAN = "nan_score"
STATUS_NONFINITE = "nonfinite_label"
STATUS_CONSTANT = "constant_label"


def metric_columns(metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    """Names of the raw and normalized score columns of ``metrics``."""
    return [f"raw_{m}" for m in metrics], [f"norm_{m}" for m in metrics]


def metrics_of(columns: Sequence[str]) -> list[str]:
    """The metric names present in a ledger's columns, in column order."""
    return [c.removeprefix("norm_") for c in columns if c.startswith("norm_")]


def ledger_schema(metrics: Sequence[str]) -> pa.Schema:
    """The pyarrow schema of a ledger whose ensemble has ``metrics``."""
    raw, norm = metric_columns(metrics)
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_index", pa.int32(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("aug_index", pa.int8(), nullable=False),
        pa.field("augmentation", pa.string(), nullable=False),
        *[pa.field(c, pa.float64()) for c in raw],
        *[pa.field(c, pa.float64()) for c in norm],
        pa.field("S", pa.float64()),
        pa.field("blocks_S", pa.list_(pa.float32())),
        pa.field("teacher_hash", pa.string(), nullable=False),
        pa.field("metric_versions", pa.string(), nullable=False),
        pa.field("qtlib_version", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={"qtlib.table": "ledger", "qtlib.metrics": ",".join(metrics)})


def to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert ``frame`` to ``schema`` exactly: missing, extra or mistyped columns are errors."""
    missing = [n for n in schema.names if n not in frame.columns]
    extra = [c for c in frame.columns if c not in schema.names]
    if missing or extra:
        raise ValueError(f"table does not match its schema: missing {missing}, unexpected {extra}")
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def write_table(table: pa.Table | pd.DataFrame, path: str | Path, schema: pa.Schema) -> Path:
    """Write a table to Parquet atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    if isinstance(table, pd.DataFrame):
        table = to_table(table, schema)
    elif not table.schema.equals(schema, check_metadata=False):
        raise ValueError(f"{path}: table schema differs from the declared schema")
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata({**(schema.metadata or {})}), tmp)
    return path


class LedgerWriter:
    """Stream ledger batches into one Parquet file; the file appears only on :meth:`close`.

    Memory stays flat: each batch is written as a row group and dropped.
    """

    def __init__(self, path: str | Path, metrics: Sequence[str]) -> None:
        self.path = Path(path)
        self.schema = ledger_schema(metrics)
        # Not `with atomic_path`: the file stays open across write() calls until close().
        self._tmp = make_temp(self.path)
        self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self.rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        self._writer.write_table(to_table(frame, self.schema))
        self.rows += len(frame)

    def close(self) -> Path:
        self._writer.close()
        try:
            return commit_file(self._tmp, self.path)
        finally:
            discard(self._tmp)  # gone after a successful commit; removed if it failed

    def abort(self) -> None:
        self._writer.close()
        discard(self._tmp)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_ledger(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Read ledger shard files into one DataFrame (pyarrow-backed strings, numpy numbers)."""
    if not paths:
        raise FileNotFoundError("no ledger files given")
    frames = []
    for p in paths:
        try:
            frames.append(pq.read_table(p).to_pandas())
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValueError(f"{p}: not a readable ledger Parquet file: {exc}") from exc
    frame = pd.concat(frames, ignore_index=True)
    for col in ("image_id", "augmentation", "status", "teacher_hash"):
        frame[col] = frame[col].astype("string")
    frame["augmentation"] = frame["augmentation"].astype("category")
    frame["status"] = frame["status"].astype("category")
    return frame


_ROUND_DIR = re.compile(r"^round_(0|[1-9][0-9]*)$")


def ledger_files(results_dir: str | Path) -> list[Path]:
    """Every ledger shard of every round under ``results_dir``, in (round, shard) order."""
    root = Path(results_dir)
    rounds = sorted((int(p.name.split("_")[1]), p) for p in root.glob("round_*") if _ROUND_DIR.match(p.name))
    files: list[Path] = []
    for _, rdir in rounds:
        files += sorted((rdir / "ledger").glob("shard_*.parquet"), key=lambda p: int(p.stem.split("_")[1]))
    return files


def load(results_dir: str | Path) -> pd.DataFrame:
    """All rounds' ledgers under ``results_dir`` as one tidy DataFrame.

    Example:
        >>> import qtlib.ledger
        >>> df = qtlib.ledger.load("results")
        >>> df.groupby("round")["S"].describe()
    """
    files = ledger_files(results_dir)
    if not files:
        raise FileNotFoundError(f"{results_dir}: no ledgers found (expected round_<r>/ledger/shard_<k>.parquet)")
    return read_ledger(files).sort_values(["round", "image_id", "aug_index"], ignore_index=True)
