from qtlib.data.leaks import check_leaks
from qtlib.layout import SPLITS
from qtlib.smk import job

with job(snakemake) as ctx:
    # input.manifests and params.sources are both in SPLITS order (data.smk)
    found = {s: (m, snakemake.params.sources[s]) for s, m in zip(SPLITS, snakemake.input.manifests, strict=True)}
    test = found.pop("test")
    leaks = check_leaks(test, found, snakemake.output.report, ctx.cfg.data.leaks)
    print(f"leak check: {len(leaks)} test file(s) also in the training data")
