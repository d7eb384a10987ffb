# Evaluation of the final student (every condition level) and its teacher on the test set.


rule evaluate:
    input:
        student=f"{RES}/round_{R - 1}/student.pt",
        teacher=f"{RES}/round_{R - 1}/teacher.pt",
        test=f"{DATA}/test/degraded.zarr",
        ledgers=[f"{RES}/round_{r}/ledger/shard_{k}.parquet" for r in range(R) for k in range(K)],
        gates=[f"{RES}/round_{r}/gate.parquet" for r in range(R)],
        banks=[f"{RES}/round_{r}/bank.parquet" for r in range(R)],
    output:
        metrics=report(f"{RES}/eval/metrics.parquet", category="Evaluation", labels={"table": "all scores"}),
        summary=report(f"{RES}/eval/summary.md", category="Evaluation", labels={"table": "summary"}),
        plots=report(
            directory(f"{RES}/eval/plots"),
            patterns=["{name}.png"],
            category="Plots",
            labels={"figure": "{name}"},
        ),
    params:
        cfg=slice_json("evaluate", "iqa"),
    log:
        f"{RES}/logs/evaluate.log",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/evaluate.py"
