# Input functions, paths, config slices and wildcard constraints shared by all rules.
# Every path comes from qtlib.layout.Layout: the one definition of the results layout.
# CFG: the typed config, checked by the Snakefile before anything is included.
from pathlib import Path

from qtlib.config import canonical_json, config_from_dict
from qtlib.data.prepare import paired_layout
from qtlib.iqa.catalog import CATALOG, get_info
from qtlib.config.loader import to_dict
from qtlib.layout import SPLITS, Layout

L = Layout(CFG.results_dir)
RES = str(L.root)
R = CFG.rounds
K = CFG.label.shards


wildcard_constraints:
    r=r"0|[1-9][0-9]*",
    k=r"0|[1-9][0-9]*",


def slice_json(*names, split=None):
    """Canonical JSON of config sections: a rule's params, so editing them reruns exactly that rule.

    With ``split`` (paired, unlabeled or test), the ``data`` section keeps that split's source folder
    and drops the other two, so a new path for one split reruns only that split's prepare.
    """
    sections = {n: to_dict(getattr(CFG, n)) for n in names}
    if split is not None and "data" in sections:
        sections["data"] = {k: v for k, v in sections["data"].items() if k not in SPLITS or k == split}
    return canonical_json(sections)


def uses_demo(split):
    """True when ``data.<split>`` is empty: that split (and only it) comes from the generated demo."""
    return not getattr(CFG.data, split)


def source_dir(split):
    """Folder of raw images for paired / unlabeled / test: the user's, or the generated demo's."""
    return str(L.demo_split(split)) if uses_demo(split) else getattr(CFG.data, split)


def source_input(split):
    """A prepare rule's input: the user's folder (a new path or new files rerun it), or the whole demo
    folder, which is the output of rule demo_data (so the demo is built only when a split needs it)."""
    return str(L.demo) if uses_demo(split) else getattr(CFG.data, split)


def teacher_of(wildcards):
    """Round r labels with the teacher of round r-1; round 0 with the pretrained model."""
    return str(L.teacher_of(int(wildcards.r)))


def student_of(wildcards):
    return str(L.student_of(int(wildcards.r)))


def ledgers_of(wildcards):
    return [str(L.ledger(wildcards.r, k)) for k in range(K)]


def previous_bank(wildcards):
    r = int(wildcards.r)
    return [] if r == 0 else [str(L.bank(r - 1))]


def stores_upto(wildcards):
    """Every label store a round-r bank may point into (rounds 0..r)."""
    return [str(L.label_store(q, k)) for q in range(int(wildcards.r) + 1) for k in range(K)]


def test_has_ground_truth():
    """The test set has clean images: the demo's always; a user's folder when it has its clean/ folder."""
    if uses_demo("test"):
        return True
    folder = Path(CFG.data.test)
    try:
        return (folder / paired_layout(folder)[1]).is_dir()
    except (FileNotFoundError, ValueError):
        return False  # the preflight check has reported it


def headrooms():
    """Every round's headroom table, with evaluate.headroom and a test set with ground truth; else none."""
    return [str(L.headroom(r)) for r in range(R)] if CFG.evaluate.headroom and test_has_ground_truth() else []


def learned_in(names):
    """The workflow fits the learned member for these metrics: one is qtlib's own and iqa.learned.path is empty."""
    return not CFG.iqa.learned.path and any(get_info(n).source == "qtlib" for n in names if n in CATALOG)


def reward_of_round(wildcards):
    """The learned member round r's label, train and headroom jobs use, when S or the reward has it."""
    names = [m.metric for m in (*CFG.iqa.ensemble, *CFG.train.reward_ensemble)]
    return [str(L.reward_of(int(wildcards.r), CFG.reward.refresh))] if learned_in(names) else []


def final_reward():
    """The learned member of the last round, for the evaluation's panel, when the panel has it."""
    return [str(L.reward_of(R - 1, CFG.reward.refresh))] if learned_in(CFG.evaluate.panel) else []


def previous_student(wildcards):
    return str(L.student(int(wildcards.r) - 1))


def final_outputs():
    outs = [str(p) for r in range(R) for p in (L.bank(r), L.teacher(r), L.student(r))]
    return outs + [str(L.metrics), str(L.summary)]
