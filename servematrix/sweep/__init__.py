"""`servematrix sweep`: vLLM's model zoo × layouts × quantizations on CPU, each cell a load check.

The data flows: registry.py (what the release registers, matched to transformers model_types and
classified) → cells.py (cells, ids, `-k`) → twins.py (one mirrored twin per model_type, by the
mirror's public functions) → worker.py + zygote.py (the persistent load-check worker: vLLM
imported once per release, each check's ranks forked fresh) or serve.loadcheck (one process per
check; ray_worlds.py: the same worlds as Ray actors, `--backend ray`) → serve.py (`--depth serve`: a
real server and one completion where the CPU can serve the cell) → runner.py (records, run directory,
history) → report.py (run's reports plus coverage).
A quantized cell's twin is the base twin re-forged as quant.py / data/sweep-quants.yaml say; with two or
more releases, regressions.py makes the regression list; bisect.py bisects one cell id.
"""
