"""Zarr image stores and their Parquet manifests, written atomically.

A store is a Zarr v3 array ``N x 3 x S x S`` uint8 (RGB), one chunk per image,
whose attributes hold the image ids in row order (``ids``) and a description of
the geometry (``transform``). Writers build everything under a hidden
``.NAME.partial`` sibling and swap it in only when complete, so a failed run
never leaves a half store and never destroys a good store from an earlier run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from qtlib.util.atomic import atomic_write_text, commit_file, remove_path, replace_dir
from qtlib.util.checks import check_shape

# Chunk keys spelled out so that dropping the rows past the end after a resize is a known path.
_CHUNK_KEYS = {"name": "default", "separator": "/"}


def staging_path(path: Path) -> Path:
    """The hidden temp sibling a writer builds ``path`` in."""
    return path.with_name(f".{path.name}.partial")


def commit_path(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` (file or folder) onto ``final``, replacing what was there.

    Files are committed with :func:`qtlib.util.atomic.commit_file` (fsync, one
    ``os.replace``); folders with :func:`qtlib.util.atomic.replace_dir` (the old
    folder is renamed aside first, so either the old or the new one always exists).
    """
    if tmp.is_file():
        commit_file(tmp, final)
    else:
        replace_dir(tmp, final)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp name + ``os.replace``)."""
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Write rows as Parquet to ``path`` (give a temp path and commit it with :func:`commit_path`)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)


class StoreWriter:
    """Build one image store under its ``.partial`` sibling.

    Args:
        final: where the store will live once committed (e.g. ``OUT/images.zarr``).
        capacity: the most images that may be written (rows past the end are dropped on close).
        size: image side S.
    """

    def __init__(self, final: Path, capacity: int, size: int) -> None:
        self.final = final
        self.tmp = staging_path(final)
        remove_path(self.tmp)  # only a crashed earlier run leaves one behind
        self.size = size
        self.ids: list[str] = []
        self._array = zarr.create_array(
            store=str(self.tmp),
            shape=(max(capacity, 1), 3, size, size),
            chunks=(1, 3, size, size),
            dtype="uint8",
            fill_value=0,
            chunk_key_encoding=_CHUNK_KEYS,
            dimension_names=("image", "channel", "y", "x"),
        )

    def append(self, image_id: str, image: np.ndarray) -> int:
        """Write one ``(S, S, 3)`` uint8 image as the next row; return its row index."""
        check_shape(image, [self.size, self.size, 3], "image")
        if image.dtype != np.uint8:
            raise ValueError(f"image: expected uint8, got {image.dtype}")
        index = len(self.ids)
        self._array[index] = np.ascontiguousarray(image.transpose(2, 0, 1))
        self.ids.append(image_id)
        return index

    def close(self, attributes: dict[str, Any]) -> None:
        """Shrink to the rows written and record ids and ``attributes``; the store stays at ``tmp``."""
        n = len(self.ids)
        capacity = self._array.shape[0]
        self._array.resize((n, 3, self.size, self.size))
        # zarr 3.1 keeps chunks past a shrink; drop them so the store holds only its rows.
        for row in range(n, capacity):
            remove_path(self.tmp / "c" / str(row))
        self._array.attrs.update({"ids": list(self.ids), **attributes})

    def abort(self) -> None:
        remove_path(self.tmp)


class Images(NamedTuple):
    """A whole store in memory: ids in row order and the ``N x 3 x S x S`` uint8 array."""

    ids: list[str]
    array: np.ndarray


class ImageStore:
    """Read-only access to an image store written by ``qt prepare``.

    Args:
        path: the ``.zarr`` folder.

    Shape:
        ``read`` returns uint8 ``(3, S, S)`` for an int and ``(B, 3, S, S)`` for a
        slice or a sequence of rows; ``read_tensor`` the same as float32 in [0, 1].
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no image store here (run qt prepare first)")
        self._array = zarr.open_array(str(self.path), mode="r")
        shape = self._array.shape
        check_shape(self._array, ["N", 3, "H", "W"], str(self.path))
        if self._array.dtype != np.uint8:
            raise ValueError(f"{self.path}: expected a uint8 array, got {self._array.dtype}")
        self.ids: tuple[str, ...] = tuple(self._array.attrs.get("ids", ()))
        if len(self.ids) != shape[0]:
            raise ValueError(f"{self.path}: {len(self.ids)} ids recorded for {shape[0]} rows")
        self._rows = {image_id: row for row, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._array.attrs)

    def index_of(self, image_id: str) -> int:
        """Row of an image id; KeyError names the id and the store."""
        try:
            return self._rows[image_id]
        except KeyError:
            raise KeyError(f"{self.path}: no image with id {image_id!r}") from None

    def read(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 pixels of one row (int), a slice, or a list of rows in the order given."""
        if isinstance(rows, (int, np.integer, slice)):
            return self._array[rows]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *self.shape[1:]), dtype=np.uint8)
        order = np.argsort(rows, kind="stable")
        data = self._array.get_orthogonal_selection((rows[order],))
        out = np.empty_like(data)
        out[order] = data
        return out

    def read_tensor(self, rows: int | slice | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Like :meth:`read`, as float32 in [0, 1]."""
        return torch.from_numpy(np.asarray(self.read(rows))).float().div_(255.0)

    def batches(self, batch_size: int) -> Iterator[tuple[range, torch.Tensor]]:
        """Iterate over the store in row order: ``(rows, float tensor B x 3 x S x S)``."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            rows = range(start, min(start + batch_size, len(self)))
            yield rows, self.read_tensor(slice(rows.start, rows.stop))


def load_images(path: str | Path) -> Images:
    """Load a whole image store: ``(ids, N x 3 x S x S uint8 array)``."""
    store = ImageStore(path)
    return Images(list(store.ids), store.read(slice(None)))
