from qtlib.data import prepare_paired
from qtlib.smk import job

with job(snakemake) as ctx:
    # A test set may come without ground truth; a paired training set may not.
    require_clean = snakemake.wildcards.split == "paired"
    print(prepare_paired(snakemake.params.src, snakemake.params.out, ctx.cfg.data, require_clean=require_clean))
