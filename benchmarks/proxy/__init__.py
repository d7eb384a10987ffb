"""The ground-truth proxy benchmark: ``python -m benchmarks.proxy.run`` (see README.md beside this file)."""
