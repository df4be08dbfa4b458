"""`servematrix mirror SOURCE`: a tiny forged twin of any checkpoint, from its metadata only.

source.py reads a local directory, a Hugging Face id or a transformers model_type (headers only);
layout.py types what was read; plan.py (with dims.py, schemes.py, tensors.py) shrinks it under
the invariants checks.py states and verifies; twin.py writes the twin, compares it with its source
(`--diff`) and describes it as a scenario YAML. The API lives in twin.py and is re-exported here.
"""

from servematrix.mirror.twin import (DiffReport, build_twin, cli_diff, cli_mirror, diff, infer_layer_map, plan_twin,
                                     post_process, read_source, scenario_yaml)

__all__ = ["DiffReport", "build_twin", "cli_diff", "cli_mirror", "diff", "infer_layer_map", "plan_twin",
           "post_process", "read_source", "scenario_yaml"]
