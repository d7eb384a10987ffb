"""qtlib.layout: the one definition of the results layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtlib.layout import LABEL_STORE, Layout, input_labels_beside, label_store_column, portable, step_checkpoint


def test_round_paths_and_wildcards() -> None:
    lay = Layout("res/")
    assert lay.label_store(1, 0) == Path("res/round_1/labels/shard_0.zarr")
    assert lay.ledger("{r}", "{k}") == Path("res/round_{r}/ledger/shard_{k}.parquet")  # Snakemake patterns
    assert lay.teacher_of(0) == lay.pretrained and lay.teacher_of(2) == Path("res/round_1/teacher.pt")
    assert lay.student_of(1) == Path("res/round_0/student.pt")
    assert step_checkpoint(lay.student(0)) == Path("res/round_0/student.pt.partial")
    assert lay.input_labels(0) == Path("res/round_0/input_labels.parquet") == input_labels_beside(lay.student(0))
    assert lay.root / LABEL_STORE.format(r=3, k=1) == lay.label_store(3, 1)


def test_label_store_column_matches_the_scalar_form() -> None:
    col = label_store_column(np.array([0, 2]), np.array([1, 0]))
    assert list(col) == [LABEL_STORE.format(r=0, k=1), LABEL_STORE.format(r=2, k=0)]


def test_portable_paths_survive_a_move(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "results", tmp_path / "elsewhere" / "b"
    for root in (a, b):
        (root / "data" / "unlabeled").mkdir(parents=True)
    rel = [portable(r / "data" / "unlabeled" / "images.zarr", r) for r in (a, b)]
    assert rel[0] == rel[1] == "data/unlabeled/images.zarr"
    assert portable(a / "data" / "paired", a / "pretrain") == "../data/paired"
