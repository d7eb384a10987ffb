# Stage 1: supervised pretraining of the (score-conditioned, zero-initialized) backbone.


rule pretrain:
    input:
        paired=f"{DATA}/paired/degraded.zarr",
    output:
        model=f"{RES}/pretrain/model.pt",
        log_table=f"{RES}/pretrain/losses.parquet",
    params:
        cfg=slice_json("model", "pretrain", "seed"),
    log:
        f"{RES}/logs/pretrain.log",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/pretrain.py"
