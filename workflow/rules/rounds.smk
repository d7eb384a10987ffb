# Stage 2: rounds r = 0..R-1 of label (K shards) -> gate -> train.


rule label:
    input:
        teacher=teacher_of,
        images=str(L.unlabeled_images),
        reward=reward_of_round,  # the learned member, when the ensemble has it
    output:
        store=directory(str(L.label_store("{r}", "{k}"))),
        ledger=str(L.ledger("{r}", "{k}")),
    params:
        cfg=slice_json("iqa", "label"),
    log:
        str(L.log("round_{r}/label_{k}")),
    threads: 1
    # before the headroom table when both wait for a GPU: the shards are on the rounds' critical path
    priority: 1
    resources:
        gpu=1,
    script:
        "../scripts/label.py"


rule gate:
    input:
        ledgers=ledgers_of,
        bank_prev=previous_bank,
    output:
        gate=str(L.gate("{r}")),
        bank=str(L.bank("{r}")),
    params:
        cfg=slice_json("gate"),
        n_aug=len(CFG.label.label_names),  # the size of a complete set of labels (views, + mean)
    log:
        str(L.log("round_{r}/gate")),
    threads: 1
    script:
        "../scripts/gate.py"


rule train:
    input:
        bank=str(L.bank("{r}")),
        stores=stores_upto,
        images=str(L.unlabeled_images),
        teacher=teacher_of,
        student=student_of,
        paired=str(L.degraded("paired")),  # the supervised anchor's pairs (train.losses.sup)
        initial=str(L.pretrained),  # W_init of L_reg with train.losses.pref.reg_anchor: initial
        reward=reward_of_round,  # the learned member, when the ensemble or the reward has it
    output:
        student=str(L.student("{r}")),
        teacher=str(L.teacher("{r}")),
        losses=str(L.losses("{r}")),
    params:
        cfg=slice_json("train", "iqa", "compute", "seed", "rounds"),
        results_dir=RES,
        paired=str(L.prepared("paired")),
    log:
        str(L.log("round_{r}/train")),
    threads: workflow.cores
    resources:
        gpu=CFG.train.gpus,
    script:
        "../scripts/train.py"
