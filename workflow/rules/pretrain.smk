# Stage 1: supervised pretraining of the (score-conditioned, zero-initialized) backbone.


rule pretrain:
    input:
        paired=f"{DATA}/paired/degraded.zarr",
    output:
        model=f"{RES}/pretrain/model.pt",
        log_table=f"{RES}/pretrain/losses.parquet",
    params:
        cfg=slice_json("model", "pretrain", "seed"),
        # pretraining also honours the determinism and bf16 switches of `train`
        runtime=canonical_json({"deterministic": CFG.train.deterministic, "bf16": CFG.train.bf16}),
    log:
        f"{RES}/logs/pretrain.log",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/pretrain.py"
