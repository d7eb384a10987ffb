from qtlib.smk import job
from qtlib.train import train_one_round

with job(snakemake, gpus=snakemake.resources.gpu) as ctx:
    i, o = snakemake.input, snakemake.output
    result = train_one_round(ctx.cfg, int(snakemake.wildcards.r), i.teacher, i.student, i.bank, i.images,
                             ctx.cfg.results_dir, o.student, o.teacher, o.losses, device=ctx.device)
    print(result)
