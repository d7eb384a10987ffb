"""The results layout: every path under the results folder, defined once.

The stages, the CLI and the workflow (``workflow/rules/common.smk``) all ask
:class:`Layout` where a file lives, so a path is written in exactly one place.
Methods accept an ``int`` or a string, so the workflow can build its patterns
with Snakemake wildcards (``layout.label_store("{r}", "{k}")``).

Paths stored inside artifacts (the bank's ``store`` column) are relative to
the results folder (:data:`LABEL_STORE`), so a results folder can move.

::

    <root>/data/demo/{paired,unlabeled,test}/      generated demo images
    <root>/data/<split>/{images,degraded,clean}.zarr, manifest.parquet
    <root>/data/leak_check.parquet                 test files found in paired/unlabeled
    <root>/pretrain/model.pt, losses.parquet
    <root>/round_<r>/labels/shard_<k>.zarr         pseudo-labels + block score maps
    <root>/round_<r>/ledger/shard_<k>.parquet      the score ledger
    <root>/round_<r>/{gate,bank,losses}.parquet, student.pt, teacher.pt
    <root>/round_<r>/input_labels.parquet          input scores, with train.input_labels (not a rule output)
    <root>/round_<r>/headroom.parquet              its teacher's labels of the test images vs ground truth
    <root>/reward/{model.pt,report.md,report.parquet}  the learned member (liteiqa), fitted on the pairs
    <root>/round_<r>/reward.pt                     refitted against round r-1's student (reward.refresh)
    <root>/eval/{metrics.parquet,summary.md,plots/}
    <root>/logs/
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Index = int | str

ROUND = "round_{r}"
#: Inside a round folder: label store and ledger of shard k.
ROUND_LABEL_STORE = "labels/shard_{k}.zarr"
ROUND_LEDGER = "ledger/shard_{k}.parquet"
#: A round's label store, relative to the results folder (the form the bank records).
LABEL_STORE = f"{ROUND}/{ROUND_LABEL_STORE}"
#: A round's ledger shard, relative to the results folder.
LEDGER = f"{ROUND}/{ROUND_LEDGER}"
#: Suffix of a stage's step checkpoint beside its final checkpoint (``student.pt.partial``).
STEP_CHECKPOINT_SUFFIX = ".partial"
#: Beside a round's student: the scores of its input labels (``train.input_labels``).
INPUT_LABELS = "input_labels.parquet"

SPLITS = ("paired", "unlabeled", "test")
MANIFEST = "manifest.parquet"
#: The two stores of a prepared paired or test folder (``qt prepare --paired``).
DEGRADED_STORE = "degraded.zarr"
CLEAN_STORE = "clean.zarr"


def manifest_in(prepared_dir: str | Path) -> Path:
    """The manifest of a prepared split folder (``qt prepare``'s ``manifest.parquet``: every source file's sha256)."""
    return Path(prepared_dir) / MANIFEST


def step_checkpoint(final: str | Path) -> Path:
    """The step checkpoint of an unfinished training stage: ``<final>.partial`` beside ``final``."""
    final = Path(final)
    return final.with_name(final.name + STEP_CHECKPOINT_SUFFIX)


def input_labels_beside(student: str | Path) -> Path:
    """The input-label scores of a round: ``input_labels.parquet`` beside its student checkpoint."""
    return Path(student).with_name(INPUT_LABELS)


def portable(path: str | Path, base: str | Path) -> str:
    """``path`` relative to ``base`` (with ``..`` where needed): what fingerprints record, so a moved
    results folder, or the same run in another folder, gives the same bytes."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def label_store_in(round_dir: str | Path, k: Index) -> Path:
    """Shard k's label store inside a round folder (``qt label --out ROUND_DIR``)."""
    return Path(round_dir) / ROUND_LABEL_STORE.format(k=k)


def ledger_in(round_dir: str | Path, k: Index) -> Path:
    """Shard k's ledger inside a round folder."""
    return Path(round_dir) / ROUND_LEDGER.format(k=k)


def label_store_column(rounds: np.ndarray, shards: np.ndarray) -> np.ndarray:
    """:data:`LABEL_STORE` for many (round, shard) pairs at once (the bank's ``store`` column)."""
    r = np.asarray(rounds).astype(str).astype(object)
    k = np.asarray(shards).astype(str).astype(object)
    head, mid = LABEL_STORE.split("{r}")
    mid, tail = mid.split("{k}")
    return head + r + mid + k + tail


@dataclass(frozen=True)
class Layout:
    """Paths of one results folder.

    Args:
        root: the results folder (``results_dir`` of the config).
    """

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(str(root).rstrip("/") or "."))

    # ---------------------------------------------------------------- data
    @property
    def demo(self) -> Path:
        return self.root / "data" / "demo"

    def demo_split(self, split: str) -> Path:
        return self.demo / split

    def prepared(self, split: str) -> Path:
        """The prepared folder of a split (``paired``, ``unlabeled``, ``test``)."""
        return self.root / "data" / split

    @property
    def unlabeled_images(self) -> Path:
        return self.prepared("unlabeled") / "images.zarr"

    def degraded(self, split: str) -> Path:
        return self.prepared(split) / DEGRADED_STORE

    def clean(self, split: str) -> Path:
        return self.prepared(split) / CLEAN_STORE

    def manifest(self, split: str) -> Path:
        return manifest_in(self.prepared(split))

    @property
    def leak_report(self) -> Path:
        """Test files that are also training files (``qtlib.data.leaks``); empty when there are none."""
        return self.root / "data" / "leak_check.parquet"

    # ---------------------------------------------------------------- pretraining
    @property
    def pretrained(self) -> Path:
        return self.root / "pretrain" / "model.pt"

    @property
    def pretrain_losses(self) -> Path:
        return self.root / "pretrain" / "losses.parquet"

    # ---------------------------------------------------------------- rounds
    def round_dir(self, r: Index) -> Path:
        return self.root / ROUND.format(r=r)

    def label_store(self, r: Index, k: Index) -> Path:
        return label_store_in(self.round_dir(r), k)

    def ledger(self, r: Index, k: Index) -> Path:
        return ledger_in(self.round_dir(r), k)

    def gate(self, r: Index) -> Path:
        return self.round_dir(r) / "gate.parquet"

    def bank(self, r: Index) -> Path:
        return self.round_dir(r) / "bank.parquet"

    def student(self, r: Index) -> Path:
        return self.round_dir(r) / "student.pt"

    def teacher(self, r: Index) -> Path:
        return self.round_dir(r) / "teacher.pt"

    def losses(self, r: Index) -> Path:
        return self.round_dir(r) / "losses.parquet"

    def headroom(self, r: Index) -> Path:
        """The headroom table of round r: the PSNR of its teacher's pseudo-labels of the test images."""
        return self.round_dir(r) / "headroom.parquet"

    def input_labels(self, r: Index) -> Path:
        return input_labels_beside(self.student(r))

    def teacher_of(self, r: int) -> Path:
        """The teacher that labels round r: the EMA teacher of round r-1, or the pretrained model."""
        return self.pretrained if r == 0 else self.teacher(r - 1)

    def student_of(self, r: int) -> Path:
        """The student round r starts from: round r-1's, or the pretrained model."""
        return self.pretrained if r == 0 else self.student(r - 1)

    # ---------------------------------------------------------------- evaluation and logs
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval_dir / "metrics.parquet"

    @property
    def summary(self) -> Path:
        return self.eval_dir / "summary.md"

    @property
    def plots(self) -> Path:
        return self.eval_dir / "plots"

    # ---------------------------------------------------------------- the learned reward
    @property
    def reward_dir(self) -> Path:
        return self.root / "reward"

    @property
    def reward_model(self) -> Path:
        """The learned member fitted on the paired data (``reward_fit``)."""
        return self.reward_dir / "model.pt"

    @property
    def reward_report(self) -> Path:
        return self.reward_dir / "report.md"

    @property
    def reward_table(self) -> Path:
        return self.reward_dir / "report.parquet"

    def reward_refit(self, r: Index) -> Path:
        """Round r's reward refitted with round r-1's student (``reward.refresh``)."""
        return self.round_dir(r) / "reward.pt"

    def reward_of(self, r: int, refresh: bool) -> Path:
        """The learned member that round r's label, train and headroom jobs use."""
        return self.reward_refit(r) if refresh and r > 0 else self.reward_model

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        """A job's log file, e.g. ``log("round_1/train")`` -> ``logs/round_1/train.log``."""
        return self.logs / f"{name}.log"
