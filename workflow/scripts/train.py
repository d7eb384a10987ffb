from qtlib.smk import job
from qtlib.train import RoundPaths, train_one_round

with job(snakemake, gpus=snakemake.resources.gpu) as ctx:
    i, o = snakemake.input, snakemake.output
    paths = RoundPaths.of(teacher=i.teacher, student=i.student, bank=i.bank, images=i.images,
                          results_dir=snakemake.params.results_dir, out_student=o.student, out_teacher=o.teacher,
                          losses=o.losses, paired=snakemake.params.paired,
                          initial=i.initial)
    result = train_one_round(paths, int(snakemake.wildcards.r), ctx.cfg.train, ctx.cfg.iqa, ctx.cfg.compute, ctx.cfg.seed,
                             rounds=ctx.cfg.rounds,
                             device=ctx.device)
    print(result)
