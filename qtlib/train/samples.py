"""Training data: samples from the memory bank, epoch plans, and batch readers.

A *sample* is one row of the bank (one pseudo-label, PL) of the method's
selection (:func:`select_bank_rows`): the unlabeled image it restores, the
PL's score as the condition, the PL to regress to, the PL's block scores, and
the score of the image's poorest PL (for L2 of eq. 8). When the condition is
at the top level (S >= top_score) the target is the image's best PL instead
(paper, sec. 3.3), with that PL's block scores.

Every random choice of an epoch (order, patch positions, the y_l level of the
preference pair, the cropped-consistency window) is drawn once, up front, by
:func:`draw_epoch_plan` from a generator seeded by (seed, round, epoch), and
recorded in an :class:`EpochPlan`. A step then reads its slots of the plan, so
a resumed run and a data-parallel run see exactly the samples and crops that
an uninterrupted single-process run sees. Ranks take disjoint slices of each
global batch (:func:`rank_slots`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import zarr

from qtlib.train.losses import block_weight_map

Method = Literal["qualiteacher", "plain_mt", "filter_mt"]

_BANK_COLUMNS = ("image_id", "source_index", "rank", "store", "index", "aug_index", "S", "blocks_S")


def seed_for(*parts: int) -> np.random.Generator:
    """A numpy generator seeded by a tuple of non-negative ints (SeedSequence mixing, platform-independent)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def select_bank_rows(bank: pd.DataFrame, method: Method) -> pd.DataFrame:
    """The bank rows a method trains on, in a deterministic order (image_id, rank).

    * ``qualiteacher`` and ``plain_mt``: every row (every PL the gate kept).
      ``plain_mt`` trusts them all alike: the faithful "teacher's PL" baseline is
      this with a bank gated with ``gate.enabled: false``, no previous bank and
      ``bank_size`` >= the number of augmentations (the workflow's job).
    * ``filter_mt`` (Colabator-style): the rank-0 row of each image only. The
      rank-0 row of top-k(bank_{r-1} U candidates) is the best label seen so far,
      i.e. exactly the label Colabator keeps ("replaced only when better"), and the
      same row a gate with ``bank_size: 1`` would keep.
    """
    missing = [c for c in _BANK_COLUMNS if c not in bank.columns]
    if missing:
        raise ValueError(f"bank: missing columns {', '.join(missing)} (is this a bank.parquet from qt gate?)")
    rows = bank if method != "filter_mt" else bank[bank["rank"] == bank.groupby("image_id")["rank"].transform("min")]
    if method not in ("qualiteacher", "plain_mt", "filter_mt"):
        raise ValueError(f"method: got {method!r}, expected qualiteacher, plain_mt or filter_mt")
    return rows.sort_values(["image_id", "rank"], kind="mergesort").reset_index(drop=True)


@dataclass(frozen=True)
class TrainSamples:
    """One entry per training sample (numpy arrays of equal length n).

    Attributes:
        image_id: the unlabeled image.
        source_index: its row in the unlabeled ``images.zarr``.
        cond: the condition score (the PL's S; ``top_score`` when unconditioned).
        store, index, aug_index: where the target PL's pixels are (store relative to results_dir).
        blocks: (n, gh*gw) block scores of the target PL, row-major.
        s_poor, s_best: S of the image's poorest and best PL in the selection.
    """

    image_id: np.ndarray
    source_index: np.ndarray
    cond: np.ndarray
    store: np.ndarray
    index: np.ndarray
    aug_index: np.ndarray
    blocks: np.ndarray
    s_poor: np.ndarray
    s_best: np.ndarray

    def __len__(self) -> int:
        return len(self.image_id)


def build_samples(bank: pd.DataFrame, method: Method, top_score: float, score_condition: bool) -> TrainSamples:
    """Turn a bank into training samples (see the module docstring for the rules).

    Args:
        bank: ``bank.parquet`` rows (schema :func:`qtlib.gate.bank_schema`).
        method: which rows to use (:func:`select_bank_rows`).
        top_score: the merged top level of the conditioning (``model.conditioning.top_score``).
        score_condition: condition on each PL's S; False = every sample gets ``top_score``
            and its own PL as target (the unconditioned ablation and the baselines).
    """
    rows = select_bank_rows(bank, method)
    if rows.empty:
        raise ValueError("bank: no rows to train on (did the gate drop every image?)")
    s = rows["S"].to_numpy(dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError("bank: non-finite S in the bank")
    blocks = np.stack([np.asarray(b, dtype=np.float32) for b in rows["blocks_S"]])
    groups = rows.groupby("image_id", sort=False)
    best = groups["S"].transform("idxmax").to_numpy()  # row label of each image's best PL (index is 0..n-1)
    use_best = (s >= top_score) & score_condition
    target = np.where(use_best, best, np.arange(len(rows)))
    return TrainSamples(
        image_id=rows["image_id"].to_numpy(dtype=object),
        source_index=rows["source_index"].to_numpy(dtype=np.int64),
        cond=np.where(score_condition, np.minimum(s, top_score), top_score).astype(np.float32),
        store=rows["store"].to_numpy(dtype=object)[target],
        index=rows["index"].to_numpy(dtype=np.int64)[target],
        aug_index=rows["aug_index"].to_numpy(dtype=np.int64)[target],
        blocks=blocks[target],
        s_poor=groups["S"].transform("min").to_numpy(dtype=np.float32),
        s_best=groups["S"].transform("max").to_numpy(dtype=np.float32),
    )


@dataclass(frozen=True)
class EpochPlan:
    """The random draws of one epoch, one entry per slot (``steps * global_batch`` slots).

    Attributes:
        sample: sample index per slot (a permutation, wrapped round to fill the last global batch).
        patch_yx: (slots, 2) top-left of the training patch in the full image.
        low_level: the condition of y_l per slot (drawn from ``low_levels``).
        crop_yx: (slots, 2) top-left of the cropped-consistency window inside the patch.
    """

    epoch: int
    steps: int
    global_batch: int
    sample: np.ndarray
    patch_yx: np.ndarray
    low_level: np.ndarray
    crop_yx: np.ndarray


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """Optimizer steps in an epoch: every sample once, the last global batch filled by wrapping round."""
    return max(1, -(-n_samples // global_batch))


def draw_epoch_plan(
    n_samples: int, global_batch: int, image_size: tuple[int, int], patch: int, crop: int,
    low_levels: Sequence[float], seed: int, round_: int, epoch: int,
) -> EpochPlan:
    """Draw all random choices of an epoch from a generator seeded by (seed, round, epoch)."""
    h, w = image_size
    if patch > min(h, w):
        raise ValueError(f"patch_size: {patch} px does not fit the {h}x{w} images")
    if not 0 < crop <= patch:
        raise ValueError(f"cropped window: expected 0 < {crop} <= patch {patch}")
    if not low_levels:
        raise ValueError("low_levels: expected at least one level")
    rng = seed_for(seed, round_, epoch, 7)
    steps = steps_per_epoch(n_samples, global_batch)
    slots = steps * global_batch
    perm = rng.permutation(n_samples)
    sample = np.resize(perm, slots)  # repeats the permutation's head to fill the last batch
    patch_yx = np.stack([rng.integers(0, h - patch + 1, slots), rng.integers(0, w - patch + 1, slots)], 1)
    low = np.asarray(low_levels, dtype=np.float32)[rng.integers(0, len(low_levels), slots)]
    crop_yx = rng.integers(0, patch - crop + 1, (slots, 2))
    return EpochPlan(epoch, steps, global_batch, sample, patch_yx, low, crop_yx)


def rank_slots(step_in_epoch: int, rank: int, world: int, batch: int) -> np.ndarray:
    """Slots of one rank in one step: a disjoint slice of that step's global batch."""
    start = step_in_epoch * batch * world + rank * batch
    return np.arange(start, start + batch)


@dataclass(frozen=True)
class Batch:
    """One rank's mini-batch (tensors on CPU; the loop moves them).

    Shape:
        x, target: (B, 3, P, P) in [0, 1]; weight: (B, 1, P, P), mean 1 over each full image;
        cond, s_poor, s_best, low: (B,); crop_yx: (B, 2) int64;
        sup_x, sup_y: (B_sup, 3, P, P) labeled pairs of the supervised anchor, or None.
    """

    x: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    cond: torch.Tensor
    s_poor: torch.Tensor
    low: torch.Tensor
    crop_yx: torch.Tensor
    s_best: torch.Tensor | None = None
    sup_x: torch.Tensor | None = None
    sup_y: torch.Tensor | None = None


def open_uint8(path: str | Path, ndim: int, what: str) -> zarr.Array:
    """Open a uint8 Zarr array of ``ndim`` dims with 3 channels in dim ``ndim - 3``, or raise naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p}: not found")
    arr = zarr.open_array(str(p), mode="r")
    if arr.ndim != ndim or arr.shape[-3] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{what} {p}: expected a uint8 array of {ndim} dims with 3 channels, got "
                         f"{arr.shape} {arr.dtype}")
    return arr


def _to_float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float().div_(255.0)


class BankReader:
    """Reads batches of (degraded input patch, PL patch, weight patch) for plan slots.

    Args:
        samples: the training samples.
        images: the unlabeled ``images.zarr`` (N x 3 x H x W uint8).
        results_dir: the folder the bank's ``store`` paths are relative to.
        patch: patch side P.
    """

    def __init__(self, samples: TrainSamples, images: str | Path, results_dir: str | Path, patch: int) -> None:
        self.samples = samples
        self.images = open_uint8(images, 4, "images")
        self.results_dir = Path(results_dir)
        self.patch = patch
        self._labels: dict[str, zarr.Array] = {}
        if int(samples.source_index.max()) >= self.images.shape[0]:
            raise ValueError(f"bank: source_index {int(samples.source_index.max())} is beyond the "
                             f"{self.images.shape[0]} rows of {images}")
        self.grid = {}
        for store in sorted(set(samples.store)):
            labels = self._store(store)
            if labels.shape[-2:] != self.images.shape[-2:]:
                raise ValueError(f"label store {store}: labels are {labels.shape[-2:]} px, the images "
                                 f"{self.images.shape[-2:]}")
            self.grid[store] = tuple(zarr.open_group(str(self.results_dir / store), mode="r")["blocks_S"].shape[-2:])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def _store(self, store: str) -> zarr.Array:
        if store not in self._labels:
            path = self.results_dir / store
            if not path.is_dir():
                raise FileNotFoundError(f"label store {path}: not found (bank 'store' paths are relative to "
                                        f"--results-dir {self.results_dir})")
            self._labels[store] = open_uint8(path / "labels", 5, "label store")
        return self._labels[store]

    def read(self, plan: EpochPlan, slots: np.ndarray) -> Batch:
        """The batch of the given plan slots."""
        p = self.patch
        s = self.samples
        idx = plan.sample[slots]
        xs, ts, ws = [], [], []
        for i, (top, left) in zip(idx, plan.patch_yx[slots], strict=True):
            win = (slice(top, top + p), slice(left, left + p))
            xs.append(self.images[int(s.source_index[i]), :, win[0], win[1]])
            ts.append(self._store(s.store[i])[int(s.index[i]), int(s.aug_index[i]), :, win[0], win[1]])
            gh, gw = self.grid[s.store[i]]
            full = block_weight_map(torch.from_numpy(s.blocks[i].reshape(1, gh, gw)), self.image_size)
            ws.append(full[0, :, win[0], win[1]])
        return Batch(
            x=_to_float(np.stack(xs)),
            target=_to_float(np.stack(ts)),
            weight=torch.stack(ws),
            cond=torch.from_numpy(s.cond[idx].copy()),
            s_poor=torch.from_numpy(s.s_poor[idx].copy()),
            s_best=torch.from_numpy(s.s_best[idx].copy()),
            low=torch.from_numpy(plan.low_level[slots].copy()),
            crop_yx=torch.from_numpy(plan.crop_yx[slots].astype(np.int64)),
        )


class PairedReader:
    """Random aligned crops from a prepared paired folder (``degraded.zarr`` + ``clean.zarr``)."""

    def __init__(self, paired_dir: str | Path, patch: int) -> None:
        paired_dir = Path(paired_dir)
        self.degraded = open_uint8(paired_dir / "degraded.zarr", 4, "paired")
        self.clean = open_uint8(paired_dir / "clean.zarr", 4, "paired")
        if self.degraded.shape != self.clean.shape:
            raise ValueError(f"{paired_dir}: degraded.zarr {self.degraded.shape} and clean.zarr "
                             f"{self.clean.shape} differ")
        h, w = self.degraded.shape[-2:]
        if patch > min(h, w):
            raise ValueError(f"patch_size: {patch} px does not fit the {h}x{w} paired images")
        self.patch = patch

    def __len__(self) -> int:
        return int(self.degraded.shape[0])

    def read(self, seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of pretraining step ``step``: rows and offsets drawn from (seed, step) alone."""
        rng = seed_for(seed, step, 11)
        n, p = len(self), self.patch
        h, w = self.degraded.shape[-2:]
        rows = rng.permutation(n)[:batch] if batch <= n else rng.integers(0, n, batch)
        tops, lefts = rng.integers(0, h - p + 1, batch), rng.integers(0, w - p + 1, batch)
        xs, ys = [], []
        for r, t, left in zip(rows, tops, lefts, strict=True):
            xs.append(self.degraded[int(r), :, t:t + p, left:left + p])
            ys.append(self.clean[int(r), :, t:t + p, left:left + p])
        return _to_float(np.stack(xs)), _to_float(np.stack(ys))
