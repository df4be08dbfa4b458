"""vLLM's Transformers-backend wrappers (TransformersForCausalLM, TransformersMoEForCausalLM, the
embedding and classification ones) as sweep cells.

A wrapper is no architecture a checkpoint names: vLLM builds it for one its registry maps onto it,
or for any when asked `--model-impl transformers`. So a wrapper's cells are keyed by its name (as a
pooling or draft cell is), and its twin is the twin of an architecture that uses it
(data/sweep-wrappers.yaml `through`: llama's for TransformersForCausalLM) with `--model-impl
transformers` on the command line. Which class vLLM then built is in the load check's rank
records: a cell passes only where it is the wrapper (`built`), else vLLM checked something else
and the cell says so instead of passing.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from servematrix.config import packaged
from servematrix.paths import data_file
from servematrix.sweep import digests

FILE = data_file("sweep-wrappers.yaml")  # package data, so a wheel install carries it
ARGS = ["--model-impl", "transformers"]  # what makes vLLM build the wrapper for a model it implements itself
NOT_SERVED = "a pooling wrapper: its endpoint is served through its pooling architecture's own cells"


class Wrapper(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    through: str  # the sweep cell key whose twin the wrapper is checked through


class WrapperRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wrappers: dict[str, Wrapper]


def rules() -> WrapperRules:
    return packaged.load(FILE, WrapperRules)


def is_wrapper(key: str) -> bool:
    return key in rules().wrappers


def match(arch: str) -> tuple[str | None, str | None]:
    """(the key of the architecture it is checked through, None), or (None, why it is not checkable)."""
    w = rules().wrappers.get(arch)
    if w is None:
        return None, ("vLLM's Transformers-backend wrapper, not an architecture of its own; data/sweep-wrappers.yaml "
                      "names no architecture to check it through")
    return w.through, None


def build(key: str, directory: Path, max_pp: int, tps: list[int], align: dict[str, int] | None = None):
    """The wrapper's twin: its `through` architecture's, loaded with --model-impl transformers."""
    from servematrix.sweep import twins

    through = rules().wrappers[key].through
    base = twins.build(through, directory, max_pp, tps, align)
    origin = f"{base.origin}; {key} through {through}'s twin with {' '.join(ARGS)}"
    if not base.ok:
        return base.model_copy(update={"origin": origin})
    # a pooling wrapper's serve step would ask its endpoint, which the runner picks by the registry table of
    # the cell's architecture (the wrapper's is none of the pooling ones): its cells stop at the load check
    load_only = base.load_only or (NOT_SERVED if base.architecture else None)
    return base.model_copy(update={"server_args": [*base.server_args, *ARGS], "origin": origin, "load_only": load_only})


def built(key: str, check_dir: Path) -> str | None:
    """The class vLLM built on the load check's ranks, where it is not the wrapper `key` (None: it is)."""
    models = {r.get("model") for r in digests.ranks(check_dir)} - {None}
    other = sorted(models - {key})
    return ", ".join(other) if other else None
