# Data: the offline demo set (when no data folders are configured) and image intake into Zarr.


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
        src=lambda w: source_dir("unlabeled") if not use_demo() else str(L.demo),
    output:
        store=directory(str(L.unlabeled_images)),
        manifest=str(L.manifest("unlabeled")),
    params:
        src=source_dir("unlabeled"),
        out=str(L.prepared("unlabeled")),
        cfg=slice_json("data"),
    log:
        str(L.log("prepare_unlabeled")),
    threads: 1
    script:
        "../scripts/prepare.py"


rule prepare_paired:
    input:
        src=lambda w: source_dir(w.split) if not use_demo() else str(L.demo),
    output:
        degraded=directory(str(L.degraded("{split}"))),
        manifest=str(L.manifest("{split}")),
    params:
        src=lambda w: source_dir(w.split),
        out=lambda w: str(L.prepared(w.split)),
        cfg=slice_json("data"),
    wildcard_constraints:
        split="paired|test",
    log:
        str(L.log("prepare_{split}")),
    threads: 1
    script:
        "../scripts/prepare_paired.py"
