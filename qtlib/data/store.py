"""Zarr image stores and their Parquet manifests, written atomically.

A store comes in one of two layouts, both read by :class:`ImageStore`:

- ``square`` (``data.geometry: square``, and stores built with :class:`StoreWriter`):
  one Zarr v3 array ``N x 3 x S x S`` uint8 (RGB), one chunk per image.
- ``per_image`` (``data.geometry: native``, :class:`PerImageWriter`): a Zarr group
  with one array ``3 x H_i x W_i`` per image, named by its row (``"0"``, ``"1"``, ...),
  each a single chunk. Images of a real data set differ in size and aspect, and
  zarr 3.1 has only regular chunk grids, so one N-d array would need padding (and
  a pad mask everywhere) or a flat buffer with an offset table that we would have to
  keep consistent ourselves. One array per image keeps one chunk per image, lets a
  reader open one image without touching the others (its ``zarr.json`` and its one
  chunk), and costs one small metadata file per image. The group's attributes hold
  every image's (H, W) (``sizes``), so opening a store reads no per-image metadata.

The attributes hold the image ids in row order (``ids``) and a description of the
geometry (``transform``). Writers build everything under a hidden
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


#: ``layout`` attribute of a per-image store (a square store is a plain array and has none).
PER_IMAGE = "per_image"


class PerImageWriter:
    """Build one per-image store (any size per image) under its ``.partial`` sibling.

    Args:
        final: where the store will live once committed (e.g. ``OUT/images.zarr``).
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = staging_path(final)
        remove_path(self.tmp)  # only a crashed earlier run leaves one behind
        self.ids: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self._group = zarr.open_group(str(self.tmp), mode="w")

    def append(self, image_id: str, image: np.ndarray) -> int:
        """Write one ``(H, W, 3)`` uint8 image as the next row (its own array, one chunk); return its row."""
        check_shape(image, ["H", "W", 3], "image")
        if image.dtype != np.uint8:
            raise ValueError(f"image: expected uint8, got {image.dtype}")
        index = len(self.ids)
        h, w = image.shape[:2]
        array = self._group.create_array(str(index), shape=(3, h, w), chunks=(3, h, w), dtype="uint8",
                                         fill_value=0, dimension_names=("channel", "y", "x"))
        array[...] = np.ascontiguousarray(image.transpose(2, 0, 1))
        self.ids.append(image_id)
        self.sizes.append((h, w))
        return index

    def close(self, attributes: dict[str, Any]) -> None:
        """Record ids, sizes and ``attributes``; the store stays at ``tmp``."""
        self._group.attrs.update({"layout": PER_IMAGE, "ids": list(self.ids),
                                  "sizes": [list(s) for s in self.sizes], **attributes})

    def abort(self) -> None:
        remove_path(self.tmp)


class Images(NamedTuple):
    """A whole store in memory: ids in row order and the ``N x 3 x S x S`` uint8 array."""

    ids: list[str]
    array: np.ndarray


class ImageStore:
    """Read-only access to an image store written by ``qt prepare`` (either layout, see the module docstring).

    Args:
        path: the ``.zarr`` folder.

    Shape:
        ``read`` returns uint8 ``(3, H, W)`` for an int and ``(B, 3, H, W)`` for a slice or a
        sequence of rows (which must then share one size); ``read_tensor`` the same as
        float32 in [0, 1]. ``sizes`` is ``(N, 2)`` int64: every image's (H, W).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no image store here (run qt prepare first)")
        node = zarr.open(str(self.path), mode="r")
        self._attrs = dict(node.attrs)
        self.ids: tuple[str, ...] = tuple(self._attrs.get("ids", ()))
        self.per_image = isinstance(node, zarr.Group)
        if self.per_image:
            if self._attrs.get("layout") != PER_IMAGE:
                raise ValueError(f"{self.path}: a Zarr group without layout {PER_IMAGE!r} (not an image store)")
            self._group, self._arrays = node, {}
            self.sizes = np.asarray(self._attrs.get("sizes", []), dtype=np.int64).reshape(-1, 2)
            n = len(self.sizes)
        else:
            self._array = node
            check_shape(node, ["N", 3, "H", "W"], str(self.path))
            if node.dtype != np.uint8:
                raise ValueError(f"{self.path}: expected a uint8 array, got {node.dtype}")
            n = node.shape[0]
            self.sizes = np.tile(np.asarray(node.shape[2:], dtype=np.int64), (n, 1))
        if len(self.ids) != n:
            raise ValueError(f"{self.path}: {len(self.ids)} ids recorded for {n} rows")
        self._rows = {image_id: row for row, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def uniform(self) -> bool:
        """True when every image has the same size (always for a square store)."""
        return len(self) == 0 or bool((self.sizes == self.sizes[0]).all())

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, 3, H, W)``; only for a store whose images share one size (see :attr:`uniform`)."""
        if not self.per_image:
            return tuple(self._array.shape)
        if not self.uniform:
            raise ValueError(f"{self.path}: images of several sizes have no common shape; use sizes")
        h, w = (int(v) for v in self.sizes[0]) if len(self) else (0, 0)
        return (len(self), 3, h, w)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def size_of(self, row: int) -> tuple[int, int]:
        """(H, W) of one row."""
        h, w = self.sizes[row]
        return int(h), int(w)

    def index_of(self, image_id: str) -> int:
        """Row of an image id; KeyError names the id and the store."""
        try:
            return self._rows[image_id]
        except KeyError:
            raise KeyError(f"{self.path}: no image with id {image_id!r}") from None

    def _image(self, row: int) -> zarr.Array:
        if row not in self._arrays:
            if not 0 <= row < len(self):
                raise IndexError(f"{self.path}: row {row} out of range for {len(self)} images")
            self._arrays[row] = self._group[str(row)]
        return self._arrays[row]

    def read_window(self, row: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """uint8 ``(3, height, width)`` window of one image (only that image's chunk is read)."""
        h, w = self.size_of(row)
        if not (0 <= top and top + height <= h and 0 <= left and left + width <= w):
            raise ValueError(f"{self.path}: window {height}x{width} at ({top},{left}) is outside row {row} "
                             f"({h}x{w})")
        win = (slice(None), slice(top, top + height), slice(left, left + width))
        return np.asarray(self._image(row)[win] if self.per_image else self._array[(row, *win)])

    def read(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 pixels of one row (int), a slice, or a list of rows in the order given."""
        if isinstance(rows, (int, np.integer)):
            row = int(rows) + (len(self) if rows < 0 else 0)
            return np.asarray(self._image(row)[...]) if self.per_image else self._array[row]
        if isinstance(rows, slice):
            if not self.per_image:
                return self._array[rows]
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            h, w = self.sizes[0] if len(self) else (0, 0)
            return np.zeros((0, 3, h, w), dtype=np.uint8)
        if self.per_image:
            sizes = {tuple(self.sizes[r]) for r in rows}
            if len(sizes) > 1:
                raise ValueError(f"{self.path}: rows of several sizes {sorted(sizes)} cannot be stacked; read them "
                                 "one by one or through batches()")
            return np.stack([self.read(int(r)) for r in rows])
        order = np.argsort(rows, kind="stable")
        data = self._array.get_orthogonal_selection((rows[order],))
        out = np.empty_like(data)
        out[order] = data
        return out

    def read_tensor(self, rows: int | slice | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Like :meth:`read`, as float32 in [0, 1]."""
        return torch.from_numpy(np.asarray(self.read(rows))).float().div_(255.0)

    def buckets(self, rows: Sequence[int] | np.ndarray | None = None) -> list[np.ndarray]:
        """``rows`` (default: all) grouped by image size, each group in the order given; groups in order of
        their first row."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        groups: dict[tuple[int, int], list[int]] = {}
        for r in rows:
            groups.setdefault(tuple(int(v) for v in self.sizes[r]), []).append(int(r))
        return [np.asarray(g, dtype=np.int64) for g in groups.values()]

    def batches(self, batch_size: int, rows: Sequence[int] | np.ndarray | None = None,
                ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(rows, float tensor B x 3 x H x W)`` over ``rows`` (default: all): images of one size per batch.

        Rows are bucketed by size (:meth:`buckets`), so no image is padded or resized; for a
        store of one size this is row order in batches of ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        for bucket in self.buckets(rows):
            for start in range(0, len(bucket), batch_size):
                part = bucket[start:start + batch_size]
                yield part, self.read_tensor(part)


class LabelStore:
    """Read-only access to a label store of either layout (one array, or one array per image).

    Args:
        path: a ``labels/shard_{k}.zarr`` folder.

    Shape:
        :meth:`labels` ``(K, 3, H, W)`` uint8 of one image; :meth:`window` ``(3, h, w)``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"label store {self.path}: not found")
        self.group = zarr.open_group(str(self.path), mode="r")
        node = self.group["labels"]
        self.per_image = isinstance(node, zarr.Group)
        self._node = node
        if self.per_image:
            self.sizes = np.asarray(node.attrs["sizes"], dtype=np.int64).reshape(-1, 2)
        else:
            if node.ndim != 5 or node.shape[2] != 3 or node.dtype != np.uint8:
                raise ValueError(f"label store {self.path}: expected uint8 labels (N, K, 3, H, W), got "
                                 f"{node.shape} {node.dtype}")
            self.sizes = np.tile(np.asarray(node.shape[-2:], dtype=np.int64), (node.shape[0], 1))
        self.grid = tuple(int(v) for v in self.group["blocks_S"].shape[-2:])

    def __len__(self) -> int:
        return len(self.sizes)

    def size_of(self, index: int) -> tuple[int, int]:
        h, w = self.sizes[index]
        return int(h), int(w)

    def _array(self, index: int) -> zarr.Array:
        return self._node[str(index)]

    def labels(self, index: int) -> np.ndarray:
        """Every augmentation's label of one image: ``(K, 3, H, W)`` uint8 (only its chunk is read)."""
        return np.asarray(self._array(index)[...] if self.per_image else self._node[index])

    def window(self, index: int, aug_index: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """A ``(3, height, width)`` window of one label."""
        win = (aug_index, slice(None), slice(top, top + height), slice(left, left + width))
        return np.asarray(self._array(index)[win] if self.per_image else self._node[(index, *win)])


def load_images(path: str | Path) -> Images:
    """Load a whole image store: ``(ids, N x 3 x S x S uint8 array)``."""
    store = ImageStore(path)
    return Images(list(store.ids), store.read(slice(None)))


def open_pair(folder: str | Path, clean: bool | None = True) -> tuple[ImageStore, ImageStore | None]:
    """The degraded and clean stores of a prepared paired or test folder (``qt prepare --paired``), checked.

    Args:
        folder: the prepared folder.
        clean: True = ground truth is required; None = optional (returned as None when absent).

    Raises:
        FileNotFoundError: no clean store where it is required.
        ValueError: the stores differ in ids or sizes, or hold no image.
    """
    from qtlib.layout import CLEAN_STORE, DEGRADED_STORE

    folder = Path(folder)
    if clean and not (folder / CLEAN_STORE).exists():
        raise FileNotFoundError(f"{folder}: no {CLEAN_STORE} (ground truth), which this needs")
    degraded = ImageStore(folder / DEGRADED_STORE)
    truth = None
    if (folder / CLEAN_STORE).exists():
        truth = ImageStore(folder / CLEAN_STORE)
        if truth.ids != degraded.ids or not np.array_equal(truth.sizes, degraded.sizes):
            raise ValueError(f"{folder}: {CLEAN_STORE} does not match {DEGRADED_STORE} (ids or sizes differ); "
                             "re-run qt prepare on the folder")
    if len(degraded) == 0:
        raise ValueError(f"{folder}/{DEGRADED_STORE}: no images")
    return degraded, truth
