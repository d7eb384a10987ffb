# Evaluation on the test set: degraded input, pretrained model (the reference), final EMA teacher,
# final student (student weights) at every condition level; the rounds' headroom tables into summary.md.


rule evaluate:
    input:
        pretrained=str(L.pretrained),
        student=str(L.student(R - 1)),
        teacher=str(L.teacher(R - 1)),
        test=str(L.degraded("test")),
        leaks=ancient(str(L.leak_report)),  # the leak check passed (see data.smk)
        ledgers=[str(L.ledger(r, k)) for r in range(R) for k in range(K)],
        gates=[str(L.gate(r)) for r in range(R)],
        banks=[str(L.bank(r)) for r in range(R)],
        headrooms=headrooms(),  # with evaluate.headroom: a last section of summary.md
        reward=final_reward(),  # the learned member, when the panel has it
    output:
        metrics=report(str(L.metrics), category="Evaluation", labels={"table": "all scores"}),
        summary=report(str(L.summary), category="Evaluation", labels={"table": "summary"}),
        plots=report(
            directory(str(L.plots)),
            patterns=["{name}.png"],
            category="Plots",
            labels={"figure": "{name}"},
        ),
    params:
        cfg=slice_json("evaluate", "iqa"),
        test=str(L.prepared("test")),
        out=str(L.eval_dir),
    log:
        str(L.log("evaluate")),
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/evaluate.py"
