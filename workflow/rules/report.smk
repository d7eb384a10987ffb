# The HTML report: `snakemake --report results/report.html` gathers everything marked with report().

report: "../report/workflow.rst"
