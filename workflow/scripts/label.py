from pathlib import Path

from qtlib.label import label_shard
from qtlib.smk import job

with job(snakemake, gpus=1) as ctx:
    out = Path(snakemake.output.ledger).parents[1]
    label_shard(snakemake.input.teacher, snakemake.input.images, int(snakemake.wildcards.k), ctx.cfg.label.shards,
                out, int(snakemake.wildcards.r), ctx.cfg.iqa, ctx.cfg.label, device=ctx.device)
