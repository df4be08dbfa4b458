"""Whether a load check's parameters hold a twin's tensors bit for bit: the twin's tensors digested
as the load check digests a parameter (serve/loadcheck_worker._digest), in each dtype vLLM may keep
it in, against the digests each rank recorded. Shared by the pooling heads (sweep/pooling.py) and
the speculative drafts (sweep/drafts.py)."""

from __future__ import annotations

import json
from pathlib import Path

# vLLM may keep a tensor in another dtype than the checkpoint's (Jamba's score in float32 under a
# bfloat16 model; a draft in the model's dtype): the twin's values are compared in each, as vLLM's
# copy_ would cast them
DTYPES = ("float32", "bfloat16", "float16")


def of(tensor) -> tuple[str, ...]:
    """`tensor`'s digests in each of DTYPES, in that order, and in its own dtype after them where
    that is none of them (an integer tensor, a draft's vocabulary map: vLLM keeps it as it is)."""
    import torch

    from servematrix.serve.loadcheck_worker import _digest

    out = tuple(_digest(tensor.to(getattr(torch, d))) for d in DTYPES)
    return out if tensor.is_floating_point() else (*out, _digest(tensor))


def distinctive(tensor) -> bool:
    """Not one value repeated (a LayerNorm's ones, a zero bias): only such a tensor's digest proves
    which parameter read it, as any parameter of its shape holds the same bytes otherwise."""
    return tensor.numel() > 1 and bool((tensor != tensor.reshape(-1)[0]).any())


def ranks(check_dir: Path) -> list[dict]:
    """The load check's per-rank results (rank<N>.json), in rank order."""
    return [json.loads(p.read_text()) for p in sorted(Path(check_dir).glob("rank*.json"))]


def recorded(check_dir: Path, field: str = "digests") -> dict[str, str]:
    """Parameter name -> digest over every rank (`field`: the model's or the draft's)."""
    return {n: d for r in ranks(check_dir) for n, d in (r.get(field) or {}).items()}
