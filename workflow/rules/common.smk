# Input functions, paths, config slices and wildcard constraints shared by all rules.
# Every path comes from qtlib.layout.Layout: the one definition of the results layout.
# CFG: the typed config, checked by the Snakefile before anything is included.
from qtlib.config import canonical_json
from qtlib.layout import Layout

L = Layout(CFG.results_dir)
RES = str(L.root)
R = CFG.rounds
K = CFG.label.shards


wildcard_constraints:
    r=r"0|[1-9][0-9]*",
    k=r"0|[1-9][0-9]*",


def slice_json(*names):
    """Canonical JSON of config sections: a rule's params, so editing them reruns exactly that rule."""
    return canonical_json({n: getattr(CFG, n) for n in names})


def use_demo():
    return not (CFG.data.paired and CFG.data.unlabeled and CFG.data.test)


def source_dir(kind):
    """Folder of raw images for paired / unlabeled / test: the user's, or the generated demo."""
    given = getattr(CFG.data, kind)
    return given if given else str(L.demo_split(kind))


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


def final_outputs():
    outs = [str(p) for r in range(R) for p in (L.bank(r), L.teacher(r), L.student(r))]
    return outs + [str(L.metrics), str(L.summary)]
