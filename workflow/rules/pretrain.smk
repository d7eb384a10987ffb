# Stage 1: supervised pretraining of the (score-conditioned, zero-initialized) backbone.


rule pretrain:
    input:
        paired=str(L.degraded("paired")),
        leaks=ancient(str(L.leak_report)),  # the leak check passed (see data.smk)
    output:
        model=str(L.pretrained),
        losses=str(L.pretrain_losses),
    params:
        cfg=slice_json("model", "pretrain", "compute", "seed"),
        paired=str(L.prepared("paired")),
    log:
        str(L.log("pretrain")),
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/pretrain.py"
