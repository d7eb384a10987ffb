from pathlib import Path

from qtlib.evaluate import evaluate
from qtlib.smk import job

with job(snakemake, gpus=1) as ctx:
    i = snakemake.input
    evaluate(i.student, i.teacher, Path(i.test).parent, list(i.ledgers), list(i.gates), list(i.banks),
             Path(snakemake.output.metrics).parent, ctx.cfg.evaluate, device=ctx.device)
