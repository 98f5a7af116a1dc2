"""Measurements of the model and its deployed forms: `scan bench`'s harness and the scripts whose
results go to `benchmarks/results/` and docs/performance.md."""
