"""Audit trail: from an image to every score, decision and pixel the run made of it.

Two functions answer the questions a reviewer of a run asks about one image::

    trace(results_dir, image_id) -> DataFrame          # every ledger row of the image, in every round,
                                                       # with its gate decision and bank entries
    pseudo_label(results_dir, r, image_id, aug) -> np.ndarray   # the stored label pixels, H x W x 3 uint8

Everything is read from the artifacts a run leaves (ledgers, ``gate.parquet``,
``bank.parquet``, the label stores); nothing is recomputed. An image may be
named by its id or by its path in the unlabeled manifest (``results/data/
unlabeled/manifest.parquet``), so a user can start from a file name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qtlib.data.store import LabelStore
from qtlib.layout import Layout
from qtlib.ledger import load as load_ledger

#: Gate columns joined to each ledger row, renamed ``gate_<name>`` (the numbers behind the decision).
GATE_COLUMNS = ("decision", "reason", "var_metrics_max", "var_aug_max", "tau1", "tau2", "pass_metrics", "pass_aug")
#: The ledger columns that identify one stored label.
LABEL_KEY = ["round", "shard", "index", "aug_index"]


def resolve_image_id(results_dir: str | Path, image: str) -> str:
    """The image id of ``image``: an id as is, or the id of a path in the unlabeled manifest.

    Raises:
        KeyError: neither an id nor a path of the unlabeled manifest (the message names both tries).
    """
    manifest_path = Layout(results_dir).manifest("unlabeled")
    if not manifest_path.exists():
        return image
    manifest = pd.read_parquet(manifest_path, columns=["id", "path", "status"])
    if (manifest["id"] == image).any():
        return image
    by_path = manifest[manifest["path"] == image]
    if by_path.empty:
        raise KeyError(f"{image!r}: neither an image id nor a path in {manifest_path}")
    return str(by_path["id"].iloc[0])


def _round_tables(layout: Layout, name: str, rounds: list[int]) -> pd.DataFrame:
    paths = [layout.gate(r) if name == "gate" else layout.bank(r) for r in rounds]
    frames = [pd.read_parquet(p).assign(**({"bank_round": r} if name == "bank" else {}))
              for r, p in zip(rounds, paths, strict=True) if p.exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _bank_entries(banks: pd.DataFrame, image_id: str) -> pd.DataFrame:
    """Per label (LABEL_KEY): the bank rounds that held it and its rank in each, as lists."""
    if banks.empty:
        return pd.DataFrame(columns=[*LABEL_KEY, "banked_in", "bank_rank"])
    mine = banks[banks["image_id"] == image_id].sort_values("bank_round")
    grouped = mine.groupby(LABEL_KEY, sort=False)
    return pd.DataFrame({"banked_in": grouped["bank_round"].agg(list),
                         "bank_rank": grouped["rank"].agg(lambda s: [int(v) for v in s])}).reset_index()


def trace(results_dir: str | Path, image_id: str) -> pd.DataFrame:
    """Every ledger row of one image in every round, with its gate decision and bank entries.

    Args:
        results_dir: the run's results folder.
        image_id: an unlabeled image id, or its path in the unlabeled manifest.

    Returns:
        One row per (round, augmentation), sorted by round then augmentation: the ledger's
        columns (scores raw and normalized, ``S``, ``blocks_S``, ``teacher_hash``, ``status``, ...),
        ``gate_<c>`` for each of :data:`GATE_COLUMNS` (the image's decision in that round, with
        its variances and thresholds), ``banked_in`` (the rounds whose memory bank held this
        label, empty when none), ``bank_rank`` (its rank there) and ``label_store`` (the label
        store, relative to ``results_dir``).

    Raises:
        KeyError: the image has no ledger row.
    """
    layout = Layout(results_dir)
    image_id = resolve_image_id(results_dir, image_id)
    ledger = load_ledger(results_dir)
    rows = ledger[ledger["image_id"] == image_id].copy()
    if rows.empty:
        raise KeyError(f"{image_id!r}: no ledger row in {results_dir} (is it an unlabeled image id?)")
    rows["augmentation"] = rows["augmentation"].astype(str)
    rounds = sorted(int(r) for r in ledger["round"].unique())
    gates = _round_tables(layout, "gate", rounds)
    if not gates.empty:
        gate = gates[gates["image_id"] == image_id][["round", *GATE_COLUMNS]]
        rows = rows.merge(gate.rename(columns={c: f"gate_{c}" for c in GATE_COLUMNS}), on="round", how="left")
    bank = _bank_entries(_round_tables(layout, "bank", rounds), image_id)
    rows = rows.merge(bank, on=LABEL_KEY, how="left")
    for col in ("banked_in", "bank_rank"):
        rows[col] = [v if isinstance(v, list) else [] for v in rows[col]]
    rows["label_store"] = [layout.label_store(r, k).relative_to(layout.root).as_posix()
                           for r, k in zip(rows["round"], rows["shard"], strict=True)]
    return rows.sort_values(["round", "aug_index"], ignore_index=True)


def read_label(store: str | Path, index: int, aug_index: int) -> np.ndarray:
    """The pixels of one label in a label store: ``(H, W, 3)`` uint8 (only that image's chunk is read)."""
    labels = LabelStore(store)
    h, w = labels.size_of(index)
    return np.ascontiguousarray(labels.window(index, aug_index, 0, 0, h, w).transpose(1, 2, 0))


def pseudo_label(results_dir: str | Path, round_: int, image_id: str, augmentation: str | int) -> np.ndarray:
    """The stored pseudo-label of one image in one round under one augmentation.

    Args:
        results_dir: the run's results folder.
        round_: the round r.
        image_id: an unlabeled image id, or its path in the unlabeled manifest.
        augmentation: its name (``hflip``, ``vflip``, ``rot90``) or index.

    Returns:
        ``(H, W, 3)`` uint8: exactly the pixels that were scored and trained on, in the
        orientation of the input image (augmentations are inverted before storing).

    Raises:
        KeyError: no such label (the message lists the augmentations the round has for the image).
    """
    image_id = resolve_image_id(results_dir, image_id)
    layout = Layout(results_dir)
    ledger = load_ledger(results_dir)
    mine = ledger[(ledger["image_id"] == image_id) & (ledger["round"] == round_)]
    column = "aug_index" if isinstance(augmentation, (int, np.integer)) else "augmentation"
    row = mine[mine[column].astype(type(augmentation)) == augmentation]
    if row.empty:
        have = ", ".join(mine["augmentation"].astype(str)) or "none"
        raise KeyError(f"{image_id!r}: no label in round {round_} for augmentation {augmentation!r} (has: {have})")
    r = row.iloc[0]
    return read_label(layout.label_store(int(r["round"]), int(r["shard"])), int(r["index"]), int(r["aug_index"]))
