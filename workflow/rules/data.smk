# Data: the offline demo set (when no data folders are configured) and image intake into Zarr.


rule demo_data:
    output:
        directory(f"{DATA}/demo"),
    params:
        cfg=slice_json("demo", "degrade", "seed"),
    log:
        f"{RES}/logs/demo_data.log",
    threads: 1
    script:
        "../scripts/demo_data.py"


rule prepare_unlabeled:
    input:
        src=lambda w: source_dir("unlabeled") if not use_demo() else f"{DATA}/demo",
    output:
        store=directory(f"{DATA}/unlabeled/images.zarr"),
        manifest=f"{DATA}/unlabeled/manifest.parquet",
    params:
        src=source_dir("unlabeled"),
        cfg=slice_json("data"),
    log:
        f"{RES}/logs/prepare_unlabeled.log",
    threads: 1
    script:
        "../scripts/prepare.py"


rule prepare_paired:
    input:
        src=lambda w: source_dir(w.split) if not use_demo() else f"{DATA}/demo",
    output:
        degraded=directory(f"{DATA}/{{split}}/degraded.zarr"),
        manifest=f"{DATA}/{{split}}/manifest.parquet",
    params:
        src=lambda w: source_dir(w.split),
        cfg=slice_json("data"),
    wildcard_constraints:
        split="paired|test",
    log:
        f"{RES}/logs/prepare_{{split}}.log",
    threads: 1
    script:
        "../scripts/prepare_paired.py"
