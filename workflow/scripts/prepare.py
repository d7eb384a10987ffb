from qtlib.data import prepare_images
from qtlib.smk import job

with job(snakemake) as ctx:
    result = prepare_images(snakemake.params.src, snakemake.params.out, ctx.cfg.data)
    print(result)
