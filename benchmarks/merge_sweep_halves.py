"""The regression list of two single-release sweeps of the same cells (the interrupted two-release run's
cpu-0.20.2 half and a separate run of current), by the sweep's own rule (servematrix/sweep/regressions.py):

    python benchmarks/merge_sweep_halves.py OLD_RUN_DIR NEW_RUN_DIR OLD_RELEASE > regressions-full.md
"""

import sys
from pathlib import Path

from servematrix.report.gate import load_summary
from servematrix.serve.envs import CURRENT
from servematrix.sweep.regressions import pairs, regressions_md

old_dir, new_dir, old_release = sys.argv[1:4]
old, new = load_summary(Path(old_dir)), load_summary(Path(new_dir))
merged = new.model_copy(update={"scenarios": [r for r in old.scenarios if r.vllm == old_release] +
                                             [r for r in new.scenarios if r.vllm == CURRENT]})
found = pairs(merged, [old_release, CURRENT], {CURRENT: new.vllm_version})
print(regressions_md(found))
