from qtlib.reward_fit import fit_reward
from qtlib.smk import job

with job(snakemake, gpus=1) as ctx:
    i, o = snakemake.input, snakemake.output
    refresh = "student" in i.keys()  # reward_refresh: the student's restorations join the ladders
    fit_reward(snakemake.params.paired, i.pretrained, o.model, ctx.cfg.reward, ctx.cfg.seed,
               report=None if refresh else o.report, table=None if refresh else o.table,
               students=[(i.student, ctx.cfg.reward.refresh_levels)] if refresh else (), device=ctx.device)
