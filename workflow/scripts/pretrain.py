from qtlib.smk import job
from qtlib.train import pretrain

with job(snakemake, gpus=1) as ctx:
    result = pretrain(snakemake.params.paired, snakemake.output.model, ctx.cfg.model, ctx.cfg.pretrain,
                      ctx.cfg.compute, ctx.cfg.seed,
                      losses=snakemake.output.losses, device=ctx.device)
    print(result)
