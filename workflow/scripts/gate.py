from qtlib.gate import run_gate
from qtlib.smk import job

with job(snakemake) as ctx:
    prev = snakemake.input.bank_prev[0] if snakemake.input.bank_prev else None
    result = run_gate(list(snakemake.input.ledgers), prev, ctx.cfg.gate, snakemake.params.n_aug,
                      snakemake.output.gate, snakemake.output.bank)
    print(f"tau1={result.tau1:.4g} tau2={result.tau2:.4g} {result.counts}")
