# Input functions, paths, config slices and wildcard constraints shared by all rules.
import json

from qtlib.config import canonical_json, config_from_dict

CFG = config_from_dict(config, source="snakemake config")
RES = CFG.results_dir.rstrip("/")
R = CFG.rounds
K = CFG.label.shards
DATA = f"{RES}/data"


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
    return given if given else f"{DATA}/demo/{kind}"


def teacher_of(wildcards):
    """Round r labels with the teacher of round r-1; round 0 with the pretrained model."""
    r = int(wildcards.r)
    return f"{RES}/pretrain/model.pt" if r == 0 else f"{RES}/round_{r - 1}/teacher.pt"


def student_of(wildcards):
    r = int(wildcards.r)
    return f"{RES}/pretrain/model.pt" if r == 0 else f"{RES}/round_{r - 1}/student.pt"


def ledgers_of(wildcards):
    return [f"{RES}/round_{wildcards.r}/ledger/shard_{k}.parquet" for k in range(K)]


def previous_bank(wildcards):
    r = int(wildcards.r)
    return [] if r == 0 else [f"{RES}/round_{r - 1}/bank.parquet"]


def stores_upto(wildcards):
    """Every label store a round-r bank may point into (rounds 0..r)."""
    return [f"{RES}/round_{q}/labels/shard_{k}.zarr" for q in range(int(wildcards.r) + 1) for k in range(K)]


def final_outputs():
    outs = [f"{RES}/round_{r}/{name}" for r in range(R) for name in ("bank.parquet", "teacher.pt", "student.pt")]
    return outs + [f"{RES}/eval/metrics.parquet", f"{RES}/eval/summary.md"]
