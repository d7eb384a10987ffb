from pathlib import Path

from qtlib.smk import job
from qtlib.train import pretrain

with job(snakemake, gpus=1) as ctx:
    paired = Path(snakemake.input.paired).parent
    result = pretrain(paired, snakemake.output.model, ctx.cfg, log=snakemake.output.log_table, device=ctx.device)
    print(result)
