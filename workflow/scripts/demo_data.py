from qtlib.data import make_demo_data
from qtlib.smk import job

with job(snakemake) as ctx:
    result = make_demo_data(snakemake.output[0], ctx.cfg.demo, ctx.cfg.degrade.recipes, ctx.cfg.seed)
    print(result.counts)
