# Stage 2: rounds r = 0..R-1 of label (K shards) -> gate -> train.


rule label:
    input:
        teacher=teacher_of,
        images=f"{DATA}/unlabeled/images.zarr",
    output:
        store=directory(f"{RES}/round_{{r}}/labels/shard_{{k}}.zarr"),
        ledger=f"{RES}/round_{{r}}/ledger/shard_{{k}}.parquet",
    params:
        cfg=slice_json("iqa", "label"),
    log:
        f"{RES}/logs/round_{{r}}/label_{{k}}.log",
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/label.py"


rule gate:
    input:
        ledgers=ledgers_of,
        bank_prev=previous_bank,
    output:
        gate=f"{RES}/round_{{r}}/gate.parquet",
        bank=f"{RES}/round_{{r}}/bank.parquet",
    params:
        cfg=slice_json("gate"),
        n_aug=len(CFG.label.augmentations),
    log:
        f"{RES}/logs/round_{{r}}/gate.log",
    threads: 1
    script:
        "../scripts/gate.py"


rule train:
    input:
        bank=f"{RES}/round_{{r}}/bank.parquet",
        stores=stores_upto,
        images=f"{DATA}/unlabeled/images.zarr",
        teacher=teacher_of,
        student=student_of,
    output:
        student=f"{RES}/round_{{r}}/student.pt",
        teacher=f"{RES}/round_{{r}}/teacher.pt",
        losses=f"{RES}/round_{{r}}/losses.parquet",
    params:
        cfg=slice_json("train", "iqa", "seed"),
    log:
        f"{RES}/logs/round_{{r}}/train.log",
    threads: workflow.cores
    resources:
        gpu=CFG.train.gpus,
    script:
        "../scripts/train.py"
