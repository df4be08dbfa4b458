"""`servematrix mirror SOURCE`: a tiny forged twin of any checkpoint, from its metadata only.

The question it answers on a laptop: will vLLM X load THIS checkpoint at TP=t / PP=p, before its
700 GB are downloaded. source.py reads a local directory (safetensors headers, or a config.json
alone and its index), a Hugging Face id from the local HF cache (never the network) or a
transformers model_type; inputs.py types every file it reads at the boundary (config.json,
safetensors headers, index maps, mirror.json: a bad value is one located line, exit 2) and
source.check_twin_target is the one owner check before a --checkpoint directory is replaced;
layout.py types what was read; plan.py (with plan_config.py,
plan_models.py, dims.py, schemes.py, tensors.py, spec_parts.py) shrinks it under the invariants
checks.py states and verifies; twin.py writes the twin; diff.py compares it with its source
(`--diff`); cli.py describes it as a scenario YAML and renders what the CLI prints.

API, re-exported here: read_source(source) -> SourceLayout; plan_twin(layout, max_pp, tp_values)
-> Plan; plan_composite(config, parts, max_pp, tp_values, source) -> Plan (a multimodal composite:
composite.py); build_twin(plan, name, directory) -> Path; diff(source_layout, twin_layout) -> DiffReport;
scenario_yaml(plan, name, layout) -> str; cli_mirror(...) -> str and cli_diff(source, twin) ->
(str, equal) for the CLI to print.
"""

from servematrix.mirror.cli import cli_diff, cli_mirror, scenario_yaml
from servematrix.mirror.composite import plan_composite
from servematrix.mirror.diff import DiffReport, diff, infer_layer_map
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.source import read_source
from servematrix.mirror.twin import build_twin, post_process

__all__ = ["DiffReport", "build_twin", "cli_diff", "cli_mirror", "diff", "infer_layer_map", "plan_composite",
           "plan_twin", "post_process", "read_source", "scenario_yaml"]
