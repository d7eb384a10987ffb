from qtlib.evaluate import evaluate
from qtlib.smk import job

with job(snakemake, gpus=1) as ctx:
    i, p = snakemake.input, snakemake.params
    evaluate(i.pretrained, i.teacher, i.student, p.test, p.out, ctx.cfg.evaluate, iqa=ctx.cfg.iqa,
             ledgers=list(i.ledgers), gates=list(i.gates), banks=list(i.banks), headrooms=list(i.headrooms),
             device=ctx.device)
