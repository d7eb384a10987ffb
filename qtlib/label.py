"""The label stage: the teacher's multi-augmentation pseudo-labels, scored, into Zarr + Parquet.

For its shard of the prepared unlabeled images, the teacher restores every image
under each augmentation (all views of a batch in one forward pass, eq. 1), the
labels are quantized to uint8 (the pixels that are stored are the pixels that
are scored), and the IQA ensemble scores each label whole and per block.

Outputs (written to temporary names, renamed into place at the end):

* ``labels/shard_{k}.zarr`` — a Zarr group, one chunk per image:
  ``labels`` uint8 ``(N, K, 3, H, W)`` when the shard's images share one size, else a
  group of one array ``(K, 3, H_i, W_i)`` per image named by its index (the layout
  of :mod:`qtlib.data.store`, for the same reasons; read either with
  :class:`qtlib.data.store.LabelStore`). The block score maps have one grid (gh x gw)
  whatever the image size, so they stay N-d arrays. ``S`` float64 ``(N, K)``;
  ``raw`` float64 ``(N, K, M)``; ``blocks_S`` float32 ``(N, K, gh, gw)``;
  ``blocks_raw`` float32 ``(N, K, M, gh, gw)``; attributes: image ids, source
  indices, augmentations, metrics, round, shard, teacher hash.
* ``ledger/shard_{k}.parquet`` — one row per (image, augmentation), see
  :mod:`qtlib.ledger`. Streamed batch by batch: memory does not grow with N.

Images of different sizes are labeled at their own size: batches hold images of
one size (:meth:`ImageStore.batches` buckets by shape), so nothing a metric scores
is ever padded. Views that keep the shape (hflip, vflip) share one teacher call;
rot90 of a non-square image is its own call. An image whose longer side exceeds
``label.tile`` is restored tile by tile (:func:`qtlib.restore.restore_tiled`) and
scored whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from tqdm import tqdm

from qtlib import __version__
from qtlib.augment import get_augmentations, pick_labels, restore_views
from qtlib.config import IQAConfig, LabelConfig
from qtlib.data import ImageStore
from qtlib.data.store import commit_path, remove_path, staging_path
from qtlib.imageio import quantize_uint8
from qtlib.iqa import Ensemble
from qtlib.iqa.ensemble import EnsembleScores, split_blocks, unscorable
from qtlib.ledger import (
    STATUS_CONSTANT,
    STATUS_NAN,
    STATUS_NONFINITE,
    STATUS_OK,
    LedgerWriter,
)
from qtlib.models import load_model
from qtlib.restore import restore_tiled
from qtlib.runtime import file_hash, resolve_device
from qtlib.util.checks import check_image


@dataclass(frozen=True)
class LabelResult:
    """What one label shard wrote."""

    store: Path
    ledger: Path
    n_images: int
    n_rows: int
    n_nan: int


def shard_indices(n: int, shard: int, n_shards: int) -> np.ndarray:
    """Rows of shard ``shard`` of ``n_shards`` (contiguous, sizes differ by at most one)."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard: expected 0 <= k < {n_shards}, got {shard}")
    return np.array_split(np.arange(n), n_shards)[shard]


def _create_store(path: Path, n: int, k: int, sizes: np.ndarray, metrics: list[str],
                  grid: tuple[int, int], attrs: dict) -> zarr.Group:
    m = len(metrics)
    group = zarr.open_group(str(path), mode="w")
    if len(sizes) == 0 or (sizes == sizes[0]).all():
        h, w = (int(v) for v in sizes[0]) if len(sizes) else (1, 1)
        group.create_array("labels", shape=(n, k, 3, h, w), chunks=(1, k, 3, h, w), dtype="uint8")
    else:  # images of several sizes: one single-chunk array per image (see qtlib.data.store)
        labels = group.create_group("labels")
        labels.attrs.update({"layout": "per_image", "sizes": sizes.tolist()})
        for i, (h, w) in enumerate(sizes.tolist()):
            labels.create_array(str(i), shape=(k, 3, h, w), chunks=(k, 3, h, w), dtype="uint8")
    group.create_array("S", shape=(n, k), chunks=(max(n, 1), k), dtype="float64", fill_value=np.nan)
    group.create_array("raw", shape=(n, k, m), chunks=(max(n, 1), k, m), dtype="float64", fill_value=np.nan)
    group.create_array("blocks_S", shape=(n, k, *grid), chunks=(1, k, *grid), dtype="float32", fill_value=np.nan)
    group.create_array("blocks_raw", shape=(n, k, m, *grid), chunks=(1, k, m, *grid), dtype="float32",
                       fill_value=np.nan)
    group.attrs.update(attrs)
    return group


def label_status(nonfinite: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], scores: EnsembleScores,
                 blocks) -> np.ndarray:
    """Status per label (flattened ``B*K``): nonfinite_label, constant_label, nan_score or ok, first that applies.

    ``nonfinite`` marks teacher outputs with a NaN/inf pixel; ``labels`` are the quantized labels that were scored.
    """
    n = labels.shape[0]
    constant = unscorable(labels).cpu().numpy() | unscorable(split_blocks(labels, grid)).view(n, -1).any(1).cpu().numpy()
    finite = np.isfinite(torch.stack([*scores.raw.values(), scores.S], 1).double().cpu().numpy()).all(1)
    finite &= np.isfinite(blocks.S.flatten(1).double().cpu().numpy()).all(1)
    status = np.where(finite, STATUS_OK, STATUS_NAN).astype(object)
    status[constant] = STATUS_CONSTANT
    status[nonfinite.cpu().numpy()] = STATUS_NONFINITE
    return status


def _mask_nonfinite(scores, bad: torch.Tensor):
    """NaN for every score of a label whose teacher output was not finite (its pixels were zeroed to be stored).

    Works on :class:`EnsembleScores` and :class:`BlockScores` alike (both hold ``raw``, ``normalized``, ``S``).
    """
    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.masked_fill(bad.to(t.device).view(-1, *[1] * (t.ndim - 1)), float("nan"))

    return replace(scores, raw={m: nan(v) for m, v in scores.raw.items()},
                   normalized={m: nan(v) for m, v in scores.normalized.items()}, S=nan(scores.S))


def _ledger_rows(ids: list[str], src: np.ndarray, rows: np.ndarray, aug_names: list[str], scores, blocks,
                 metrics: list[str], meta: dict, status: np.ndarray | None = None) -> pd.DataFrame:
    b, k = len(ids), len(aug_names)
    frame = pd.DataFrame({
        "image_id": np.repeat(ids, k),
        "source_index": np.repeat(src, k).astype(np.int32),
        "round": np.int32(meta["round"]),
        "shard": np.int32(meta["shard"]),
        "index": np.repeat(rows, k).astype(np.int32),
        "aug_index": np.tile(np.arange(k), b).astype(np.int8),
        "augmentation": np.tile(aug_names, b),
    })
    for m in metrics:
        frame[f"raw_{m}"] = scores.raw[m].double().cpu().numpy()
    for m in metrics:
        frame[f"norm_{m}"] = scores.normalized[m].double().cpu().numpy()
    s = scores.S.double().cpu().numpy()
    frame["S"] = s
    frame["blocks_S"] = list(blocks.S.flatten(1).float().cpu().numpy())
    finite = np.isfinite(frame[[f"raw_{m}" for m in metrics] + ["S"]].to_numpy()).all(axis=1)
    frame["teacher_hash"] = meta["teacher_hash"]
    frame["metric_versions"] = meta["metric_versions"]
    frame["qtlib_version"] = __version__
    frame["status"] = np.where(finite, STATUS_OK, STATUS_NAN) if status is None else status
    return frame


def _open_staging_store(tmp: Path, prepared: ImageStore, rows: np.ndarray, names: tuple[str, ...],
                        metrics: list[str], grid: tuple[int, int], meta: dict) -> zarr.Group:
    """A fresh label store at the staging path ``tmp`` (committed onto the final path when complete);
    ``names``: the labels of an image, in store order (``LabelConfig.label_names``)."""
    attrs = {**meta, "image_ids": [prepared.ids[i] for i in rows], "source_indices": rows.tolist(),
             "augmentations": list(names), "metrics": metrics, "qtlib_version": __version__}
    tmp.parent.mkdir(parents=True, exist_ok=True)
    remove_path(tmp)
    return _create_store(tmp, len(rows), len(names), prepared.sizes[rows], metrics, grid, attrs)


class LabelMemoryError(MemoryError):
    """The ensemble could not score a batch of labels in memory; the message names the images and the fix."""


def _is_out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


@dataclass(frozen=True)
class _Shard:
    """What every batch of a shard shares: the teacher call, augmentations, ensemble, output store, metadata."""

    restore: Callable[[torch.Tensor], torch.Tensor]
    restore_tiled: Callable[[torch.Tensor], torch.Tensor]
    tile: int
    augs: list
    names: tuple[str, ...]
    """The labels of an image in store order: the views, then ``mean`` with ``label.mean_label``."""
    ensemble: Ensemble
    group: zarr.Group
    grid: tuple[int, int]
    meta: dict


def _label_batch(sh: _Shard, x: torch.Tensor, ids: list[str], src: np.ndarray, pos: np.ndarray) -> pd.DataFrame:
    """Restore ``x`` under every augmentation, score labels and blocks, write store rows ``pos``.

    Returns the batch's ledger rows.
    """
    check_image(x, "x", channels=3, value_range=(0.0, 1.0))
    views = restore_views(sh.restore, x, sh.augs, sh.tile, sh.restore_tiled)
    pls = pick_labels(views, [a.name for a in sh.augs], sh.names).clamp_(0, 1)
    nonfinite = ~torch.isfinite(pls).flatten(2).all(2).flatten()  # (B*K,): a NaN/inf teacher output
    q = quantize_uint8(pls)  # store and score the same pixels
    flat = q.flatten(0, 1).float().div_(255.0)
    try:
        scores = _mask_nonfinite(sh.ensemble.score(flat), nonfinite)
        blocks = _mask_nonfinite(sh.ensemble.score_blocks(flat), nonfinite)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one too
        if not _is_out_of_memory(exc):
            raise
        h, w = x.shape[-2:]
        raise LabelMemoryError(
            f"labeling {', '.join(ids)} ({w}x{h} px): the IQA ensemble ran out of memory scoring the whole labels "
            f"({str(exc).splitlines()[0][:160]}); NR metrics score whole images, so cap the size with "
            "data.max_side (e.g. 2048) or lower label.batch_size / iqa.batch_size") from None
    status = label_status(nonfinite, flat, sh.grid, scores, blocks)
    b, k, g = x.shape[0], len(sh.names), sh.group
    metrics = list(sh.ensemble.members)
    pixels = q.cpu().numpy()
    if isinstance(g["labels"], zarr.Group):
        for i, p in enumerate(pos.tolist()):
            g["labels"][str(p)][...] = pixels[i]
    else:
        g["labels"].set_orthogonal_selection((pos,), pixels)

    def put(name: str, values: torch.Tensor, shape: tuple[int, ...]) -> None:
        g[name].set_orthogonal_selection((pos,), values.cpu().numpy().reshape(b, *shape))

    put("S", scores.S.double(), (k,))
    put("raw", torch.stack([scores.raw[m] for m in metrics], -1).double(), (k, len(metrics)))
    put("blocks_S", blocks.S.float(), (k, *sh.grid))
    put("blocks_raw", torch.stack([blocks.raw[m] for m in metrics], 1).float(), (k, len(metrics), *sh.grid))
    return _ledger_rows(ids, src, pos, list(sh.names), scores, blocks, metrics, sh.meta, status)


@torch.no_grad()
def label_shard(
    teacher: str | Path,
    images: str | Path,
    shard: int,
    n_shards: int,
    out_store: str | Path,
    out_ledger: str | Path,
    round_: int,
    iqa_cfg: IQAConfig,
    label_cfg: LabelConfig,
    device: str = "auto",
    progress: bool = True,
) -> LabelResult:
    """Label one shard of the prepared unlabeled images with the teacher.

    Args:
        teacher: teacher checkpoint (its EMA weights are used when present).
        images: the prepared ``images.zarr`` (its ``manifest.parquet`` beside it).
        shard, n_shards: which shard of the rows (k of K).
        out_store: the label store to write (``Layout.label_store(r, k)``: the bank points into it by
            round and shard); out_ledger: the ledger shard to write (Parquet).
        round_: the round number r recorded in every row.
        iqa_cfg: the ensemble; label_cfg: batch size and augmentations.
        device: cpu, cuda or auto.

    Returns:
        :class:`LabelResult` with the written paths and counts.
    """
    dev = resolve_device(device)
    store_final, ledger_final = Path(out_store), Path(out_ledger)
    prepared = ImageStore(images)
    rows = shard_indices(len(prepared.ids), shard, n_shards)
    model = load_model(teacher, use_ema=True, device=str(dev))
    augs = get_augmentations(label_cfg.augmentations)
    ensemble = Ensemble(iqa_cfg, device=dev)
    metrics = list(ensemble.members)
    meta = {"round": round_, "shard": shard, "teacher_hash": file_hash(teacher),
            "metric_versions": json.dumps(ensemble.versions(), sort_keys=True)}
    tmp_store = staging_path(store_final)
    group = _open_staging_store(tmp_store, prepared, rows, label_cfg.label_names, metrics, iqa_cfg.blocks, meta)
    shard_ctx = _Shard(
        lambda x: model(x, model.top_score),
        lambda img: restore_tiled(model, img, model.top_score, label_cfg.tile, label_cfg.tile_overlap),
        label_cfg.tile, augs, label_cfg.label_names, ensemble, group, tuple(iqa_cfg.blocks), meta)
    n_nan = 0
    bs = label_cfg.batch_size
    position = {int(r): i for i, r in enumerate(rows)}  # source row -> index in this shard's store
    try:
        with LedgerWriter(ledger_final, metrics) as writer:
            for batch_rows, x in tqdm(prepared.batches(bs, rows), desc=f"label r{round_} shard {shard}/{n_shards}",
                                      disable=not progress, unit="batch"):
                pos = np.asarray([position[int(r)] for r in batch_rows], dtype=np.int64)
                frame = _label_batch(shard_ctx, x.to(dev), [prepared.ids[i] for i in batch_rows], batch_rows, pos)
                n_nan += int((frame["status"] != STATUS_OK).sum())
                writer.write(frame)
        commit_path(tmp_store, store_final)
    finally:
        remove_path(tmp_store)
    return LabelResult(store_final, ledger_final, len(rows), len(rows) * len(label_cfg.label_names), n_nan)
