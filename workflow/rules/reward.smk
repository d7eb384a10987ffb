# The learned member liteiqa (qtlib/reward_fit.py): fitted on the paired data after pretraining, and with
# reward.refresh refitted every round r >= 1 against round r-1's student. Scheduled only when a member of
# iqa.ensemble, train.reward_ensemble or evaluate.panel is liteiqa and iqa.learned.path names no file.


rule reward_fit:
    input:
        paired=str(L.degraded("paired")),
        pretrained=str(L.pretrained),
    output:
        model=str(L.reward_model),
        report=report(str(L.reward_report), category="Reward", labels={"table": "fit report"}),
        table=str(L.reward_table),
    params:
        cfg=slice_json("reward", "seed"),
        paired=str(L.prepared("paired")),
    log:
        str(L.log("reward_fit")),
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/reward_fit.py"


rule reward_refresh:
    input:
        paired=str(L.degraded("paired")),
        pretrained=str(L.pretrained),
        student=previous_student,
    output:
        model=str(L.reward_refit("{r}")),
    params:
        cfg=slice_json("reward", "seed"),
        paired=str(L.prepared("paired")),
    log:
        str(L.log("round_{r}/reward_refresh")),
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/reward_fit.py"
