"""Input labels (``train.input_labels``): each image's degraded input, scored as its PLs are.

A round with the switch on scores the degraded input of every image of its
selection with the IQA ensemble of the label stage (:class:`qtlib.iqa.Ensemble`:
the same members and normalization, on the same uint8 pixels, whole images of one
size per call) and adds an input sample where the input scores below the image's
poorest PL (:func:`qtlib.train.samples.add_input_labels`). The scores are written
to ``input_labels.parquet`` beside the round's student
(:func:`qtlib.layout.input_labels_beside`): an audit trail, not a workflow output,
since declaring one would make existing runs out of date. The scores are a pure
function of the images and the ensemble, so a resumed round recomputes the same
samples. Under DDP rank 0 scores and the other ranks receive its scores, so every
rank holds the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from qtlib.config.types import IQAConfig
from qtlib.data.store import ImageStore
from qtlib.ledger import metric_columns, metrics_of, write_table
from qtlib.train.samples import Condition, TrainSamples, add_input_labels, input_label_kept

if TYPE_CHECKING:
    from qtlib.iqa import Ensemble


def input_labels_schema(metrics: Sequence[str]) -> pa.Schema:
    """Schema of ``input_labels.parquet``: one row per scored input, ``kept`` = it became a sample."""
    _, norm = metric_columns(metrics)
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("source_index", pa.int32(), nullable=False),
            pa.field("S", pa.float64()),
            *[pa.field(c, pa.float64()) for c in norm],
            pa.field("kept", pa.bool_(), nullable=False),
        ],
        metadata={"qtlib.table": "input_labels", "qtlib.metrics": ",".join(metrics)},
    )


@torch.no_grad()
def score_inputs(ensemble: Ensemble, images: ImageStore, rows: Sequence[int] | np.ndarray,
                 batch_size: int) -> pd.DataFrame:
    """Ensemble scores of the given rows of an image store, as the label stage scores its PLs.

    Images of one size are scored together (:meth:`ImageStore.batches`), ``batch_size`` per call;
    nothing is resized or padded.

    Args:
        ensemble: the labelling ensemble (``Ensemble(cfg.iqa, device)``).
        images: the unlabeled ``images.zarr``.
        rows: the store rows to score.
        batch_size: images per ensemble call (``iqa.batch_size``).

    Returns:
        One row per store row, in row order: ``image_id`` (the store's), ``source_index``, ``S``
        (0..10; NaN where unscorable) and ``norm_<metric>`` per member.
    """
    parts = []
    for batch_rows, x in images.batches(batch_size, np.asarray(rows, dtype=np.int64)):
        scores = ensemble.score(x.to(ensemble.device))
        part = pd.DataFrame({"image_id": [images.ids[int(r)] for r in batch_rows],
                             "source_index": np.asarray(batch_rows, dtype=np.int64),
                             "S": scores.S.double().cpu().numpy()})
        for m, col in zip(ensemble.members, metric_columns(ensemble.members)[1], strict=True):
            part[col] = scores.normalized[m].double().cpu().numpy()
        parts.append(part)
    return pd.concat(parts).sort_values("source_index", kind="mergesort").reset_index(drop=True)


@dataclass(frozen=True)
class InputLabels:
    """The samples of a round with its input samples, and the scores they came from.

    Attributes:
        samples: the PL samples, then the input samples (:func:`add_input_labels`).
        scores: one row per scored image (:func:`input_labels_schema`).
    """

    samples: TrainSamples
    scores: pd.DataFrame

    @property
    def kept(self) -> pd.DataFrame:
        return self.scores[self.scores["kept"]]


def with_input_labels(samples: TrainSamples, scores: pd.DataFrame, top_score: float,
                      images: str | Path, condition: Condition = "absolute") -> InputLabels:
    """Add the input samples that ``scores`` allow (pure: no IQA), checking the scores fit the samples.

    Args:
        samples: the PL samples (:func:`qtlib.train.samples.build_samples`).
        scores: :func:`score_inputs` of the images of ``samples``.
        top_score: the merged top level of the conditioning.
        images: the store the scores came from (named in errors).
        condition: how S becomes the condition (``train.condition``).

    Raises:
        ValueError: a store row whose image id is not the one the bank gives it.
    """
    bank_ids = pd.Series(samples.image_id, index=samples.source_index).groupby(level=0).first()
    wrong = scores[scores["image_id"].to_numpy() != bank_ids.loc[scores["source_index"]].to_numpy()]
    if len(wrong):
        row = wrong.iloc[0]
        raise ValueError(f"{images}: row {row['source_index']} is image {row['image_id']!r}, the bank says "
                         f"{bank_ids.loc[row['source_index']]!r} (bank and images.zarr of different data?)")
    by_id = scores.set_index("image_id")["S"]
    kept = input_label_kept(samples, by_id, top_score, condition)
    table = scores.assign(kept=kept.loc[scores["image_id"]].to_numpy())
    return InputLabels(add_input_labels(samples, by_id, top_score, condition), table)


def score_sample_inputs(samples: TrainSamples, images: str | Path, iqa: IQAConfig,
                        device: torch.device) -> pd.DataFrame:
    """:func:`score_inputs` of every image of ``samples``, with the labelling ensemble built from ``iqa``.

    Args:
        samples: the PL samples of the round.
        images: the unlabeled ``images.zarr``.
        iqa: the ``iqa`` section (the ensemble the label stage scores PLs with).
        device: where the ensemble runs.
    """
    from qtlib.iqa import Ensemble  # the round needs pyiqa's metrics only with the switch on

    rows = np.unique(samples.source_index)
    return score_inputs(Ensemble(iqa, device), ImageStore(images), rows, iqa.batch_size)


def write_input_labels(scores: pd.DataFrame, path: str | Path) -> Path:
    """Write the scores table (:func:`input_labels_schema`) atomically to ``path``."""
    return write_table(scores, path, input_labels_schema(metrics_of(scores.columns)))


def describe(labels: InputLabels) -> str:
    """One line for the log: how many input samples were added, and the range of their S."""
    kept, n = labels.kept, len(labels.scores)
    if kept.empty:
        return f"input labels: none of {n} inputs scores below its poorest PL; no input sample added"
    return (f"input labels: {len(kept)} of {n} inputs added as samples, S {kept['S'].min():.3f}.."
            f"{kept['S'].max():.3f}")
