"""The headroom stage: how much better than the teacher's plain output could a round's pseudo-labels be?

On the test images, which have ground truth, the teacher that labels round r
(``Layout.teacher_of(r)``: the pretrained model for r = 0, else round r-1's EMA
teacher) runs at its top score, exactly as the label stage runs it
(:func:`qtlib.augment.restore_views`, tiled above ``label.tile``). Per image:

- ``plain``: its output on the image itself (the identity view);
- each view of ``label.augmentations``: A^-1(f(A(x))), the label stage's pseudo-label;
- ``mean``: the pixel mean of the views (:func:`qtlib.augment.pick_labels`), a label of its
  own only with ``label.mean_label``, reported always;

every output quantized to uint8 and back (the label stage stores and scores those pixels),
scored by the labeling ensemble (S) and by pyiqa's PSNR against the clean image and against
the degraded input. ``s_first`` is the label S ranks first and ``gt_best`` the best by ground
truth, both among ``label.label_names``. If no label beats ``plain``, no training step can make
the student beat its teacher with these labels.

Output: ``round_{r}/headroom.parquet``, one row per test image (schema and summary:
:mod:`qtlib.headroom_table`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qtlib.augment import (
    AUGMENTATIONS,
    GeometricAug,
    get_augmentations,
    pick_labels,
    restore_views,
)
from qtlib.config import IQAConfig, LabelConfig
from qtlib.data import ImageStore
from qtlib.data.store import open_pair
from qtlib.headroom_table import (
    GT_BEST,
    MEAN,
    S_FIRST,
    Headroom,
    headroom_schema,
    labels_of,
    summarize,
)
from qtlib.imageio import quantize_uint8
from qtlib.iqa import Ensemble, create_metric
from qtlib.ledger import write_table
from qtlib.models import load_model
from qtlib.restore import restore_tiled
from qtlib.runtime import file_hash, resolve_device
from qtlib.util.checks import check_shape

log = logging.getLogger(__name__)

Restore = Callable[[torch.Tensor], torch.Tensor]
Psnr = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HeadroomResult:
    """What :func:`headroom` wrote: the table, its image count and its summary (:func:`summarize`)."""

    path: Path
    n_images: int
    summary: pd.DataFrame


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images as the label stage stores them (:func:`qtlib.imageio.quantize_uint8`), back in [0, 1]."""
    return quantize_uint8(images).float().div(255.0)


def restore_labels(restore: Restore, x: torch.Tensor, augs: Sequence[GeometricAug], tile: int = 0,
                   restore_tile: Restore | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's plain output and its labels of a batch of one size, quantized (:func:`quantize`).

    Args:
        restore: the teacher at its top score, ``(N, 3, H, W) -> (N, 3, H, W)``.
        x: ``(B, 3, H, W)`` degraded images in [0, 1].
        augs: the views (``label.augmentations``).
        tile, restore_tile: tiling above ``tile`` px, as in :func:`qtlib.augment.restore_views`.

    Returns:
        ``plain`` ``(B, 3, H, W)``; ``labels`` ``(B, K + 1, 3, H, W)``: the K views, then their mean.
    """
    plain = restore_views(restore, x, [AUGMENTATIONS["identity"]], tile, restore_tile)[:, 0]
    views = restore_views(restore, x, augs, tile, restore_tile)
    names = [a.name for a in augs]
    return quantize(plain), quantize(pick_labels(views, names, (*names, MEAN)))


def _argmax_named(values: np.ndarray, names: Sequence[str]) -> tuple[list[str | None], np.ndarray]:
    """Per row, the name of the largest finite value (None when there is none) and its column index (-1)."""
    finite = np.where(np.isfinite(values), values, -np.inf)
    idx = np.where(np.isfinite(values).any(axis=1), finite.argmax(axis=1), -1)
    return [names[i] if i >= 0 else None for i in idx], idx


def image_table(ids: Sequence[str], x: torch.Tensor, gt: torch.Tensor, plain: torch.Tensor, labels: torch.Tensor,
                scores: torch.Tensor, views: Sequence[str], candidates: Sequence[str], psnr: Psnr) -> pd.DataFrame:
    """The headroom rows of one batch (every column of :func:`headroom_schema` but ``round`` and ``teacher_hash``).

    Args:
        ids: the B image ids.
        x: ``(B, 3, H, W)`` degraded inputs; gt: the clean images; plain: the teacher's plain outputs.
        labels: ``(B, K, 3, H, W)`` in the order of ``labels_of(views)`` (the views, then the mean).
        scores: ``(B, K)`` ensemble S of each label.
        views: the view names; candidates: the labels ``s_first`` and ``gt_best`` choose among.
        psnr: ``(N, 3, H, W), (N, 3, H, W) -> (N,)``, e.g. pyiqa's ``psnr`` metric.

    Returns:
        One row per image.
    """
    names = labels_of(views)
    check_shape(labels, ["B", len(names), 3, "H", "W"], "labels")
    check_shape(scores, [labels.shape[0], len(names)], "scores")
    b, k = labels.shape[:2]
    flat = labels.flatten(0, 1)

    def db(a: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
        return psnr(a, ref).double().flatten().cpu().numpy()

    to_gt = db(flat, gt.repeat_interleave(k, 0)).reshape(b, k)
    to_input = db(flat, x.repeat_interleave(k, 0)).reshape(b, k)
    s = scores.double().cpu().numpy()
    frame = pd.DataFrame({"image_id": list(ids), "psnr_plain": db(plain, gt),
                          **{f"psnr_{n}": to_gt[:, j] for j, n in enumerate(names)}})
    cand = [names.index(c) for c in candidates]
    for name, values in ((S_FIRST, s[:, cand]), (GT_BEST, to_gt[:, cand])):
        chosen, idx = _argmax_named(values, candidates)
        frame[f"psnr_{name}"] = np.where(idx >= 0, to_gt[:, cand][np.arange(b), idx], np.nan)
        frame[name] = chosen
    frame = frame.assign(**{f"S_{n}": s[:, j] for j, n in enumerate(names)},
                         psnr_vs_input_plain=db(plain, x),
                         **{f"psnr_vs_input_{n}": to_input[:, j] for j, n in enumerate(names)})
    return frame


def open_test_set(test_dir: str | Path) -> tuple[ImageStore, ImageStore]:
    """The degraded and clean stores of a prepared test folder, checked to match.

    Raises:
        FileNotFoundError: no ``clean.zarr`` (the headroom table needs ground truth).
        ValueError: the two stores differ in ids or sizes, or hold no image.
    """
    try:
        degraded, clean = open_pair(test_dir, clean=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}: the headroom table scores the pseudo-labels against ground truth "
                                "(set evaluate.headroom: false)") from None
    return degraded, clean


@torch.no_grad()
def headroom(teacher: str | Path, test_dir: str | Path, out: str | Path, round_: int, iqa_cfg: IQAConfig,
             label_cfg: LabelConfig, device: str = "auto", batch_size: int = 4) -> HeadroomResult:
    """Write the headroom table of round ``round_``: the teacher's labels of the test images vs ground truth.

    Args:
        teacher: the checkpoint that labels the round (``Layout.teacher_of(r)``; EMA weights when present).
        test_dir: a prepared test folder with ``degraded.zarr`` and ``clean.zarr``.
        out: the table to write (``Layout.headroom(r)``), atomically.
        round_: r, recorded in every row.
        iqa_cfg: the labeling ensemble (S); label_cfg: views, ``mean_label``, tiling.
        device: cpu, cuda or auto.
        batch_size: test images per teacher call.

    Returns:
        :class:`HeadroomResult`.
    """
    degraded, clean = open_test_set(test_dir)
    dev = resolve_device(device)
    model = load_model(teacher, use_ema=True, device=str(dev))
    augs, views = get_augmentations(label_cfg.augmentations), tuple(label_cfg.augmentations)
    ensemble, psnr = Ensemble(iqa_cfg, device=dev), create_metric("psnr", dev)

    def restore(x: torch.Tensor) -> torch.Tensor:
        return model(x, model.top_score)

    def restore_one(img: torch.Tensor) -> torch.Tensor:
        return restore_tiled(model, img, model.top_score, label_cfg.tile, label_cfg.tile_overlap)

    parts = []
    for rows, x in degraded.batches(batch_size):
        x, gt = x.to(dev), clean.read_tensor(rows).to(dev)
        plain, labels = restore_labels(restore, x, augs, label_cfg.tile, restore_one)
        scores = ensemble.score(labels.flatten(0, 1)).S.view(len(rows), -1)
        parts.append(image_table([degraded.ids[int(r)] for r in rows], x, gt, plain, labels, scores, views,
                                 label_cfg.label_names, psnr))
    frame = pd.concat(parts, ignore_index=True).assign(round=round_, teacher_hash=file_hash(teacher))
    path = write_table(frame, out, headroom_schema(views, label_cfg.label_names))
    summary = summarize(Headroom(frame, views, label_cfg.label_names))
    best = summary.iloc[1:].sort_values("d_vs_plain").iloc[-1]
    log.info("headroom round %d: plain %.2f dB; best column %s %+.3f dB on %d images", round_,
             summary["psnr"].iloc[0], best["column"], best["d_vs_plain"], len(frame))
    return HeadroomResult(path, len(frame), summary)
