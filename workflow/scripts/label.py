from qtlib.label import label_shard
from qtlib.smk import job

with job(snakemake, gpus=1) as ctx:
    i, o, w = snakemake.input, snakemake.output, snakemake.wildcards
    label_shard(i.teacher, i.images, int(w.k), ctx.cfg.label.shards, o.store, o.ledger, int(w.r), ctx.cfg.iqa,
                ctx.cfg.label, device=ctx.device)
