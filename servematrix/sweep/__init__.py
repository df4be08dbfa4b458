"""`servematrix sweep`: vLLM's model zoo × layouts × quantizations on CPU, each cell a load check.

The data flows: registry.py (what the release registers, matched to transformers model_types and
classified) → cells.py (cells, ids, `-k`) → twins.py (one mirrored twin per model_type, by the
mirror's public functions) → the load check through serve/world.py's pool of persistent worlds
(vLLM imported once per release, each check's ranks forked fresh; Ray actors with `--backend ray`,
run/ray_tasks.py) or serve.loadcheck (one process per check) → serve.py (`--depth serve`: which
cells the pipeline's serve phase serves) → runner.py (cells into the pipeline's typed Parts, each
record published through run/lifecycle.py: run directory, records, interrupts, history) →
report.py (run's reports plus coverage).
A quantized cell's twin is the base twin re-forged as quant.py / data/sweep-quants.yaml say; with two or
more releases, regressions.py makes the regression list; bisect.py bisects one cell id.
"""
