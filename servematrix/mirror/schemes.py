"""The shape expressions of mirror-families.yaml's quantization schemes: a quantized linear's
tensors for given widths, and a scheme's parameters solved from a source linear's tensors. The
expressions are evaluated by config/quantize.py, which writes the same layouts in the forge."""

from __future__ import annotations

import ast
import itertools
from typing import Any

from servematrix.config.quantize import NotWhole, evaluate
from servematrix.errors import ConfigError
from servematrix.mirror.layout import TensorMeta, rules

__all__ = ["NotWhole", "evaluate", "infer_params", "scheme_shapes"]


def _names(expr: Any) -> set[str]:
    return set() if isinstance(expr, int) else {n.id for n in ast.walk(ast.parse(str(expr), mode="eval"))
                                                if isinstance(n, ast.Name) and n.id != "ceil"}


def scheme_shapes(scheme: str, out: int, in_: int, params: dict[str, int], source_leaves: dict[str, TensorMeta],
                  source_dims: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape for a linear [out, in] under `scheme` (optional leaves only where the source
    has them); `source` shapes keep the source's dims, its out/in-sized ones swapped for ours."""
    env = {**params, "n": out, "k": in_}
    shapes = {}
    for leaf, spec in rules()["schemes"][scheme]["tensors"].items():
        if leaf not in source_leaves:
            if spec.get("optional"):
                continue
            raise ConfigError("mirror-families.yaml", None, f"schemes.{scheme}", f"the source lacks leaf {leaf!r}")
        if spec["shape"] == "source":
            so, si = source_dims or (None, None)
            shapes[leaf] = tuple(out if d == so else in_ if d == si else d for d in source_leaves[leaf].shape)
        else:
            shapes[leaf] = tuple(evaluate(e, env) for e in spec["shape"])
    return shapes


def infer_params(scheme: str, leaves: dict[str, TensorMeta], known: dict[str, int]) -> tuple[dict[str, int], tuple[int, int]] | None:
    """The scheme's parameters and [out, in] of one source linear, solved from its tensors' shapes
    (a config may omit group_size or weight_block_size); None if no values reproduce them."""
    spec = rules()["schemes"][scheme]["tensors"]
    dims: dict[str, int] = {}
    for leaf, t in spec.items():  # out and in from dims that are `out`, `in` or `in / 2`
        if leaf in leaves and t["shape"] != "source":
            for expr, d in zip(t["shape"], leaves[leaf].shape):
                node = ast.parse(str(expr), mode="eval").body
                if isinstance(node, ast.Name) and node.id in ("n", "k"):
                    dims.setdefault(node.id, d)
                elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.Name)
                      and node.left.id in ("n", "k") and isinstance(node.right, ast.Constant)):
                    dims.setdefault(node.left.id, d * node.right.value)
    if set(dims) != {"n", "k"}:
        return None
    needed = set().union(*(_names(e) for t in spec.values() if t["shape"] != "source" for e in t["shape"]))
    needed -= {"n", "k"}
    candidates = {"pack": [8, 4, 2, 1]}
    missing = sorted(p for p in needed if not known.get(p))
    fixed = {p: known[p] for p in needed if known.get(p)}
    for values in itertools.product(*(candidates.get(p, [128, 64, 32, 16, 256]) for p in missing)):
        trial = {**fixed, **dict(zip(missing, values))}
        if _reproduces(scheme, leaves, trial, dims):
            return trial, (dims["n"], dims["k"])
    return None


def _reproduces(scheme, leaves, params, dims) -> bool:
    env = {**params, "n": dims["n"], "k": dims["k"]}
    for leaf, t in rules()["schemes"][scheme]["tensors"].items():
        if leaf not in leaves or t["shape"] == "source":
            continue
        try:
            if tuple(evaluate(e, env) for e in t["shape"]) != tuple(leaves[leaf].shape):
                return False
        except (NotWhole, KeyError):
            return False
    return True
