# Data: the offline demo set (for each split whose folder is not configured) and image intake into Zarr.
# Each split's source is chosen on its own (common.smk: source_dir / source_input).


rule demo_data:
    output:
        directory(str(L.demo)),
    params:
        cfg=slice_json("demo", "degrade", "seed"),
    log:
        str(L.log("demo_data")),
    threads: 1
    script:
        "../scripts/demo_data.py"


rule prepare_unlabeled:
    input:
        src=source_input("unlabeled"),
    output:
        store=directory(str(L.unlabeled_images)),
        manifest=str(L.manifest("unlabeled")),
    params:
        src=source_dir("unlabeled"),
        out=str(L.prepared("unlabeled")),
        cfg=slice_json("data", split="unlabeled"),
    log:
        str(L.log("prepare_unlabeled")),
    threads: 1
    script:
        "../scripts/prepare.py"


rule prepare_paired:
    input:
        src=lambda w: source_input(w.split),
    output:
        degraded=directory(str(L.degraded("{split}"))),
        manifest=str(L.manifest("{split}")),
    params:
        src=lambda w: source_dir(w.split),
        out=lambda w: str(L.prepared(w.split)),
        cfg=lambda w: slice_json("data", split=w.split),
    wildcard_constraints:
        split="paired|test",
    log:
        str(L.log("prepare_{split}")),
    threads: 1
    script:
        "../scripts/prepare_paired.py"


# Before any training: no test file may be a paired or unlabeled file (qtlib.data.leaks). Training and
# evaluation take the report as ancient() input: they wait for the check, and a failed check stops them,
# but a check rerun because the test folder changed does not rerun pretraining.
rule leak_check:
    input:
        manifests=[str(L.manifest(s)) for s in SPLITS],
    output:
        report=str(L.leak_report),
    params:
        cfg=slice_json("data"),
        sources={s: source_dir(s) for s in SPLITS},
    log:
        str(L.log("leak_check")),
    threads: 1
    script:
        "../scripts/leak_check.py"
