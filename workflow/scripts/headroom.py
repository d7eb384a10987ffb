from qtlib.headroom import headroom
from qtlib.smk import job

with job(snakemake, gpus=1) as ctx:
    i, p = snakemake.input, snakemake.params
    headroom(i.teacher, p.test, snakemake.output[0], int(snakemake.wildcards.r), ctx.cfg.iqa, ctx.cfg.label,
             device=ctx.device, batch_size=ctx.cfg.label.batch_size)
