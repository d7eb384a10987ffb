"""Training data: samples from the memory bank, epoch plans, and batch readers.

A *sample* is one row of the bank (one pseudo-label, PL) of the method's
selection (:func:`select_bank_rows`): the unlabeled image it restores, the
PL's score as the condition, the PL to regress to, the PL's block scores, and
where the image's reference PL of L2 (eq. 8) is, whose window the reward scores
as it scores y_h. When the condition is
at the top level (S >= top_score) the target is the image's best PL instead
(paper, sec. 3.3), with that PL's block scores.

With ``train.input_labels`` an image also has an *input sample*
(:func:`add_input_labels`): its degraded input as the target, at the input's
own score, with uniform weights, a lower point on the quality ladder than its
PLs (which all come from one teacher and score nearly alike).

Every random choice of an epoch (order, patch positions, the y_l level of the
preference pair, the cropped-consistency window) is drawn once, up front, by
:func:`draw_epoch_plan` from a generator seeded by (seed, round, epoch), and
recorded in an :class:`EpochPlan`. A step then reads its slots of the plan, so
a resumed run and a data-parallel run see exactly the samples and crops that
an uninterrupted single-process run sees. Ranks take disjoint slices of each
global batch (:func:`rank_slots`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import zarr

from qtlib.augment import DIHEDRAL, dihedral
from qtlib.data.store import ImageStore, LabelStore, open_pair
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
        store, index, aug_index: where the target PL's pixels are (store relative to results_dir);
            unused ("", -1, -1) for input samples.
        blocks: (n, gh*gw) block scores of the target PL, row-major (ones for input samples).
        s_poor, s_best: S of the image's poorest and best PL in the selection.
        ref_store, ref_index, ref_aug_index: where the image's reference PL of L2 (eq. 8) is: its poorest
            PL (``l2_target: poorest``, the paper's text) or its best (``best``), whose window the reward
            scores exactly as it scores y_h.
        is_input: the target is the degraded input itself (:func:`add_input_labels`); default all False.
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
    ref_store: np.ndarray
    ref_index: np.ndarray
    ref_aug_index: np.ndarray
    is_input: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.is_input is None:  # frozen: set the default once, here
            object.__setattr__(self, "is_input", np.zeros(len(self.image_id), dtype=bool))

    def __len__(self) -> int:
        return len(self.image_id)


Condition = Literal["absolute", "relative"]


def relative_level(s: np.ndarray, s_best: np.ndarray, top_score: float) -> np.ndarray:
    """The condition of ``train.condition: relative``: ``top - (S_best - S)``, at least 0.

    The image's best PL is at the top level and every other target of the image (a poorer PL, its
    input with ``train.input_labels``) as far below it as it scores below that PL, so a level means
    the same quality gap on every image, whatever the image's content does to the absolute scores.
    """
    return np.maximum(0.0, top_score - (np.asarray(s_best, np.float64) - np.asarray(s, np.float64)))


def best_pl_level(top_score: float, margin: float) -> float:
    """The level of each image's best PL: the top, less ``train.relative_margin`` (which keeps the top
    for the labeled pairs' ground truth).

    Raises:
        ValueError: a margin that leaves no level for the PLs (``margin >= top_score``).
    """
    if not 0 <= margin < top_score:
        raise ValueError(f"train.relative_margin {margin}: must be >= 0 and below the top level "
                         f"model.conditioning.top_score {top_score}")
    return top_score - margin


L2Target = Literal["poorest", "best"]


def build_samples(bank: pd.DataFrame, method: Method, top_score: float, score_condition: bool,
                  condition: Condition = "absolute", l2_target: L2Target = "poorest") -> TrainSamples:
    """Turn a bank into training samples (see the module docstring for the rules).

    Args:
        bank: ``bank.parquet`` rows (schema :func:`qtlib.gate.bank_schema`).
        method: which rows to use (:func:`select_bank_rows`).
        top_score: the merged top level of the conditioning (``model.conditioning.top_score``).
        score_condition: condition on each PL's S; False = every sample gets ``top_score``
            and its own PL as target (the unconditioned ablation and the baselines).
        condition: ``absolute`` = the PL's S (clipped at the top; the paper), ``relative`` =
            :func:`relative_level` (``train.condition``).
        l2_target: the reference PL of L2 (``train.losses.pref.l2_target``): the image's poorest or best.
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
    ref = best if l2_target == "best" else groups["S"].transform("idxmin").to_numpy()
    s_best = groups["S"].transform("max").to_numpy(dtype=np.float64)
    level = np.minimum(s, top_score) if condition == "absolute" else relative_level(s, s_best, top_score)
    use_best = (level >= top_score) & score_condition
    target = np.where(use_best, best, np.arange(len(rows)))
    return TrainSamples(
        image_id=rows["image_id"].to_numpy(dtype=object),
        source_index=rows["source_index"].to_numpy(dtype=np.int64),
        cond=np.where(score_condition, level, top_score).astype(np.float32),
        store=rows["store"].to_numpy(dtype=object)[target],
        index=rows["index"].to_numpy(dtype=np.int64)[target],
        aug_index=rows["aug_index"].to_numpy(dtype=np.int64)[target],
        blocks=blocks[target],
        s_poor=groups["S"].transform("min").to_numpy(dtype=np.float32),
        s_best=s_best.astype(np.float32),
        ref_store=rows["store"].to_numpy(dtype=object)[ref],
        ref_index=rows["index"].to_numpy(dtype=np.int64)[ref],
        ref_aug_index=rows["aug_index"].to_numpy(dtype=np.int64)[ref],
    )


def _input_scores(input_scores: Mapping[str, float] | pd.Series) -> pd.Series:
    scores = pd.Series(input_scores, dtype=np.float64)
    if scores.index.has_duplicates:
        raise ValueError(f"input_scores: image {scores.index[scores.index.duplicated()][0]} is scored twice")
    return scores


def input_label_kept(samples: TrainSamples, input_scores: Mapping[str, float] | pd.Series,
                     top_score: float, condition: Condition = "absolute") -> pd.Series:
    """Which scored inputs become input samples: S finite, below the image's poorest PL and the top level.

    An input that scores at or above its own restorations is no lower anchor, and one at the top
    level would teach the top condition to copy the input. Compared as float32, the type of ``cond``.

    Args:
        samples: the PL samples (:func:`build_samples`), no input samples yet.
        input_scores: ensemble S (0..10) of each image's degraded input, by image id.
        top_score: the merged top level of the conditioning.
        condition: ``relative`` needs no top-level check (an input below its poorest PL is below the top).

    Returns:
        bool per image of ``input_scores`` (same index).

    Raises:
        ValueError: an image id twice or without a PL sample, or samples that already hold input samples.
    """
    scores = _input_scores(input_scores)
    if samples.is_input.any():
        raise ValueError("samples: input labels were added already")
    poorest = pd.Series(samples.s_poor, index=samples.image_id).groupby(level=0).first()
    unknown = scores.index.difference(poorest.index)
    if len(unknown):
        raise ValueError(f"input_scores: images {', '.join(map(str, unknown[:5]))} have no PL sample")
    s32 = scores.to_numpy(dtype=np.float32)
    kept = np.isfinite(s32) & (s32 < poorest.loc[scores.index].to_numpy())
    if condition == "absolute":
        kept &= s32 < np.float32(top_score)
    return pd.Series(kept, index=scores.index, dtype=bool)


def add_input_labels(samples: TrainSamples, input_scores: Mapping[str, float] | pd.Series,
                     top_score: float, condition: Condition = "absolute") -> TrainSamples:
    """``samples`` plus one input sample per image that :func:`input_label_kept` keeps, appended.

    An input sample has the condition = the input's S (``relative``: :func:`relative_level`), the target = the degraded input itself
    (``is_input``; no label store), uniform block scores (a weight map of ones) and the image's
    ``s_poor`` / ``s_best`` unchanged. Images come in the order of ``samples``.

    Args:
        samples: the PL samples (:func:`build_samples`).
        input_scores: ensemble S (0..10) of each image's degraded input, by image id.
        top_score: the merged top level of the conditioning.
        condition: how S becomes the condition (:func:`build_samples`).

    Returns:
        The PL samples, unchanged and first, then the input samples.

    Raises:
        ValueError: as :func:`input_label_kept`.
    """
    scores = _input_scores(input_scores)
    kept = input_label_kept(samples, scores, top_score, condition)
    ids, first = np.unique(samples.image_id, return_index=True)
    order = np.sort(first[np.isin(ids, kept.index[kept].to_numpy())])  # each kept image's first PL row
    n = len(order)
    s_in = scores.loc[samples.image_id[order]].to_numpy(dtype=np.float64)
    extra = TrainSamples(
        image_id=samples.image_id[order],
        source_index=samples.source_index[order],
        cond=(s_in if condition == "absolute" else relative_level(s_in, samples.s_best[order], top_score)
              ).astype(np.float32),
        store=np.full(n, "", dtype=object),
        index=np.full(n, -1, dtype=np.int64),
        aug_index=np.full(n, -1, dtype=np.int64),
        blocks=np.ones((n, samples.blocks.shape[1]), dtype=np.float32),
        s_poor=samples.s_poor[order],
        s_best=samples.s_best[order],
        ref_store=samples.ref_store[order],
        ref_index=samples.ref_index[order],
        ref_aug_index=samples.ref_aug_index[order],
        is_input=np.ones(n, dtype=bool),
    )
    return TrainSamples(**{f.name: np.concatenate([getattr(samples, f.name), getattr(extra, f.name)])
                           for f in fields(TrainSamples)})


@dataclass(frozen=True)
class EpochPlan:
    """The random draws of one epoch, one entry per slot (``steps * global_batch`` slots).

    Attributes:
        sample: sample index per slot (a permutation, wrapped round to fill the last global batch).
        patch_yx: (slots, 2) top-left of the training patch in the full image.
        low_level: the condition of y_l per slot (drawn from ``low_levels``).
        crop_yx: (slots, 2) top-left of the cropped-consistency crop inside the reward window.
        window_yx: (slots, 2) top-left of the reward window (``train.reward_window``) in the full image.
        turn: (slots,) element of the dihedral group (:func:`qtlib.augment.dihedral`) of each slot's
            patch, target, weights and windows, read only with ``train.geometric`` (drawn last, so the
            other draws are those of a plan without it).
    """

    epoch: int
    steps: int
    global_batch: int
    sample: np.ndarray
    patch_yx: np.ndarray
    low_level: np.ndarray
    crop_yx: np.ndarray
    window_yx: np.ndarray
    turn: np.ndarray


def reward_side(reward_window: int, patch: int, smallest_side: int | None = None) -> int:
    """Side of the reward window (``train.reward_window``): the setting, capped at the smallest image side;
    0 = the training patch."""
    side = reward_window or patch
    return side if smallest_side is None else min(side, int(smallest_side))


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """Optimizer steps in an epoch: every sample once, the last global batch filled by wrapping round."""
    return max(1, -(-n_samples // global_batch))


def _positions(rng: np.random.Generator, sizes: np.ndarray, sample: np.ndarray, side: int) -> np.ndarray:
    """(slots, 2) top-left corners of a ``side`` px window, uniform over each slot's image."""
    slots = len(sample)
    if sizes.ndim == 2:  # uniform over each sample's own image: floor(u * number of positions)
        room = sizes[sample] - side + 1
        return np.minimum(np.floor(rng.random((slots, 2)) * room).astype(np.int64), room - 1)
    h, w = (int(v) for v in sizes)  # one size for all: the draws of fixed-size runs, unchanged
    return np.stack([rng.integers(0, h - side + 1, slots), rng.integers(0, w - side + 1, slots)], 1)


def draw_epoch_plan(
    n_samples: int, global_batch: int, image_size: tuple[int, int] | np.ndarray, patch: int, crop: int,
    low_levels: Sequence[float], seed: int, round_: int, epoch: int, window: int | None = None,
) -> EpochPlan:
    """Draw all random choices of an epoch from a generator seeded by (seed, round, epoch).

    Args:
        image_size: ``(H, W)`` of every image, or an ``(n_samples, 2)`` array of each sample's
            image size (native-size data); a patch position is then uniform over its own image.
        patch: the training patch side; crop: the cropped-consistency crop side (inside the window).
        window: the reward window side (:func:`reward_side`; None = ``patch``).
    """
    window = patch if window is None else window
    sizes = np.asarray(image_size, dtype=np.int64)
    per_sample = sizes.ndim == 2
    if per_sample and sizes.shape != (n_samples, 2):
        raise ValueError(f"image_size: expected (H, W) or ({n_samples}, 2) sizes, got {sizes.shape}")
    small = int(sizes.min()) if sizes.size else 0
    if patch > small:
        where = "the smallest image side" if per_sample else f"the {sizes[0]}x{sizes[1]} images"
        raise ValueError(f"patch_size: {patch} px does not fit {where} ({small} px)")
    if window > small:
        raise ValueError(f"reward window: {window} px does not fit the smallest image side ({small} px)")
    if not 0 < crop <= window:
        raise ValueError(f"cropped window: expected 0 < {crop} <= reward window {window}")
    if not low_levels:
        raise ValueError("low_levels: expected at least one level")
    rng = seed_for(seed, round_, epoch, 7)
    steps = steps_per_epoch(n_samples, global_batch)
    slots = steps * global_batch
    perm = rng.permutation(n_samples)
    sample = np.resize(perm, slots)  # repeats the permutation's head to fill the last batch
    patch_yx = _positions(rng, sizes, sample, patch)
    low = np.asarray(low_levels, dtype=np.float32)[rng.integers(0, len(low_levels), slots)]
    crop_yx = rng.integers(0, window - crop + 1, (slots, 2))
    window_yx = _positions(rng, sizes, sample, window)
    turn = rng.integers(0, DIHEDRAL, slots)
    return EpochPlan(epoch, steps, global_batch, sample, patch_yx, low, crop_yx, window_yx, turn)


def rank_slots(step_in_epoch: int, rank: int, world: int, batch: int) -> np.ndarray:
    """Slots of one rank in one step: a disjoint slice of that step's global batch."""
    start = step_in_epoch * batch * world + rank * batch
    return np.arange(start, start + batch)


@dataclass(frozen=True)
class Batch:
    """One rank's mini-batch (tensors on CPU; the loop moves them).

    Shape:
        x, target: (B, 3, P, P) in [0, 1]; weight: (B, 1, P, P), mean 1 over each full image;
        cond, low: (B,); crop_yx: (B, 2) int64, inside the reward window;
        window: (B, 3, W, W) the reward window of each input (y_h, y_l and the crops are restored from it),
        or None when no reward term reads it;
        ref: (B, 3, W, W) the same window of each image's reference PL of L2 (eq. 8), or None;
        pl: (B,) bool, the sample is a pseudo-label sample (False: an input sample), or None = all;
        sup_x, sup_y: (B_sup, 3, P, P) labeled pairs of the supervised anchor, or None.
    """

    x: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    cond: torch.Tensor
    low: torch.Tensor
    crop_yx: torch.Tensor
    window: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    pl: torch.Tensor | None = None
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


def _nearest_index(start: int, length: int, n_in: int, n_out: int) -> np.ndarray:
    """Source indices of output pixels ``start .. start+length-1`` of a nearest upsampling ``n_in -> n_out``,
    computed as PyTorch's ``interpolate(mode="nearest")`` does (float32 scale, floor, clamp)."""
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(start, start + length, dtype=np.float32)
    return np.minimum(np.floor(dst * scale).astype(np.int64), n_in - 1)


def block_weight_window(blocks: np.ndarray, size: tuple[int, int], top: int, left: int, patch: int) -> torch.Tensor:
    """The ``(1, patch, patch)`` window at (top, left) of :func:`block_weight_map` of one image of ``size``.

    Equal to cropping the full-size map, without building it (a native image may have 10^7 pixels).

    Args:
        blocks: ``(gh, gw)`` block scores of one label.
        size: (H, W) of the full image.
    """
    gh, gw = blocks.shape
    w = block_weight_map(torch.from_numpy(np.asarray(blocks, dtype=np.float32)[None]), (gh, gw))[0, 0]
    rows = _nearest_index(top, patch, gh, size[0])
    cols = _nearest_index(left, patch, gw, size[1])
    return w[torch.from_numpy(rows)][:, torch.from_numpy(cols)][None]


def _turned(x: torch.Tensor, turn: np.ndarray | None) -> torch.Tensor:
    """Each item of a (B, C, S, S) batch turned by its element of the dihedral group; ``turn`` None = unchanged."""
    if turn is None:
        return x
    return torch.stack([dihedral(v, int(k)) for v, k in zip(x, turn, strict=True)])


class BankReader:
    """Reads batches of (degraded input patch, PL patch, weight patch) for plan slots.

    Images may differ in size (native-size data): each sample's patch is cut at the same
    place from its image, its PL (stored at the image's size) and its block-weight map.
    An input sample's target is the input patch itself and its weight is 1 everywhere.

    Args:
        samples: the training samples.
        images: the unlabeled ``images.zarr`` (either layout of :mod:`qtlib.data.store`).
        results_dir: the folder the bank's ``store`` paths are relative to.
        patch: patch side P.
        window: the reward window side W, capped at the smallest image side (0 = the reward terms are off:
            no window is read).
        ref: also read the window of each sample's reference PL (L2 of eq. 8 is on).
        geometric: turn each slot's input patch, target, weights and windows alike by the plan's element
            of the dihedral group (``train.geometric``), so that the pseudo-label terms, like the anchor,
            train every view the teacher labels with.
    """

    def __init__(self, samples: TrainSamples, images: str | Path, results_dir: str | Path, patch: int,
                 window: int = 0, ref: bool = False, geometric: bool = False) -> None:
        self.samples = samples
        self.geometric = geometric
        self.images = ImageStore(images)
        self.results_dir = Path(results_dir)
        self.patch = patch
        self._labels: dict[str, LabelStore] = {}
        if int(samples.source_index.max()) >= len(self.images):
            raise ValueError(f"bank: source_index {int(samples.source_index.max())} is beyond the "
                             f"{len(self.images)} rows of {images}")
        self.sizes = self.images.sizes[samples.source_index]
        self.window = reward_side(window, patch, int(self.sizes.min())) if window > 0 else 0
        self.ref = ref and self.window > 0
        pl = ~samples.is_input
        for i in np.flatnonzero(pl):  # an input sample's target is its image: nothing to check
            got = self._store(samples.store[i]).size_of(int(samples.index[i]))
            if got != tuple(int(v) for v in self.sizes[i]):
                raise ValueError(f"label store {samples.store[i]}: label {int(samples.index[i])} is {got} px, its "
                                 f"image {samples.image_id[i]} {tuple(self.sizes[i])}")
        self.grid = {store: self._store(store).grid for store in sorted(set(samples.store[pl]))}
        if self.ref:
            for store in sorted(set(samples.ref_store)):
                self._store(store)  # a missing store fails here, not mid-round

    @property
    def image_size(self) -> tuple[int, int] | np.ndarray:
        """(H, W) when every image has one size, else each sample's (H, W) as an ``(n, 2)`` array."""
        if (self.sizes == self.sizes[0]).all():
            return tuple(int(v) for v in self.sizes[0])
        return self.sizes

    def _store(self, store: str) -> LabelStore:
        if store not in self._labels:
            path = self.results_dir / store
            if not path.is_dir():
                raise FileNotFoundError(f"label store {path}: not found (bank 'store' paths are relative to "
                                        f"--results-dir {self.results_dir})")
            self._labels[store] = LabelStore(path)
        return self._labels[store]

    def read(self, plan: EpochPlan, slots: np.ndarray) -> Batch:
        """The batch of the given plan slots."""
        p = self.patch
        s = self.samples
        idx = plan.sample[slots]
        xs, ts, ws = [], [], []
        for i, (top, left) in zip(idx, plan.patch_yx[slots], strict=True):
            top, left = int(top), int(left)
            xs.append(self.images.read_window(int(s.source_index[i]), top, left, p, p))
            if s.is_input[i]:  # the degraded input is its own target, every pixel weighted alike
                ts.append(xs[-1])
                ws.append(torch.ones(1, p, p))
                continue
            ts.append(self._store(s.store[i]).window(int(s.index[i]), int(s.aug_index[i]), top, left, p, p))
            gh, gw = self.grid[s.store[i]]
            size = (int(self.sizes[i][0]), int(self.sizes[i][1]))
            ws.append(block_weight_window(s.blocks[i].reshape(gh, gw), size, top, left, p))
        turn = plan.turn[slots] if self.geometric else None
        return Batch(
            x=_turned(_to_float(np.stack(xs)), turn),
            target=_turned(_to_float(np.stack(ts)), turn),
            weight=_turned(torch.stack(ws), turn),
            cond=torch.from_numpy(s.cond[idx].copy()),
            low=torch.from_numpy(plan.low_level[slots].copy()),
            crop_yx=torch.from_numpy(plan.crop_yx[slots].astype(np.int64)),
            window=_turned(self._windows(idx, plan.window_yx[slots]), turn) if self.window else None,
            ref=_turned(self._ref_windows(idx, plan.window_yx[slots]), turn) if self.ref else None,
            pl=torch.from_numpy(~s.is_input[idx]),
        )

    def _windows(self, idx: np.ndarray, yx: np.ndarray) -> torch.Tensor:
        w = self.window
        return _to_float(np.stack([self.images.read_window(int(self.samples.source_index[i]), int(t), int(left), w, w)
                                   for i, (t, left) in zip(idx, yx, strict=True)]))

    def _ref_windows(self, idx: np.ndarray, yx: np.ndarray) -> torch.Tensor:
        s, w = self.samples, self.window
        return _to_float(np.stack([self._store(s.ref_store[i]).window(int(s.ref_index[i]), int(s.ref_aug_index[i]),
                                                                      int(t), int(left), w, w)
                                   for i, (t, left) in zip(idx, yx, strict=True)]))


class PairedReader:
    """Random aligned crops from a prepared paired folder (``degraded.zarr`` + ``clean.zarr``, either layout).

    Args:
        paired_dir: the prepared paired folder.
        patch: crop side.
        geometric: also turn each pair by a random element of the dihedral group (flips and quarter
            turns, :func:`qtlib.augment.dihedral`), the same transform on both images, so that the model
            learns every view the teacher labels with (``pretrain.geometric``, ``train.losses.sup.geometric``).
    """

    def __init__(self, paired_dir: str | Path, patch: int, geometric: bool = False) -> None:
        self.degraded, clean = open_pair(paired_dir, clean=True)
        self.clean: ImageStore = clean  # type: ignore[assignment]  (required above)
        small = int(self.degraded.sizes.min())
        if patch > small:
            raise ValueError(f"patch_size: {patch} px does not fit the paired images (smallest side {small} px)")
        self.patch = patch
        self.uniform = self.degraded.uniform
        self.geometric = geometric

    def __len__(self) -> int:
        return len(self.degraded)

    def read(self, seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of pretraining step ``step``: rows and offsets drawn from (seed, step) alone."""
        rng = seed_for(seed, step, 11)
        n, p = len(self), self.patch
        rows = rng.permutation(n)[:batch] if batch <= n else rng.integers(0, n, batch)
        if self.uniform:  # the draws of fixed-size runs, unchanged
            h, w = self.degraded.size_of(0)
            tops, lefts = rng.integers(0, h - p + 1, batch), rng.integers(0, w - p + 1, batch)
        else:  # uniform over each row's own image
            room = self.degraded.sizes[rows] - p + 1
            yx = np.minimum(np.floor(rng.random((batch, 2)) * room).astype(np.int64), room - 1)
            tops, lefts = yx[:, 0], yx[:, 1]
        xs, ys = [], []
        for r, t, left in zip(rows, tops, lefts, strict=True):
            xs.append(self.degraded.read_window(int(r), int(t), int(left), p, p))
            ys.append(self.clean.read_window(int(r), int(t), int(left), p, p))
        x, y = _to_float(np.stack(xs)), _to_float(np.stack(ys))
        if self.geometric:  # drawn after the crops, so the crops are those of geometric: false
            ks = rng.integers(0, DIHEDRAL, batch)
            x = torch.stack([dihedral(v, int(k)) for v, k in zip(x, ks, strict=True)])
            y = torch.stack([dihedral(v, int(k)) for v, k in zip(y, ks, strict=True)])
        return x, y
