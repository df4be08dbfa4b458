"""A deliberate fault, not a fix: scale one checkpoint tensor while vLLM loads it.

It exists to prove the accuracy gate catches a server that loads and answers but computes
slightly wrong (a wrong quantization scale, a mis-sharded norm): the model still serves, smoke
may still pass, but the gold-answer NLL and the agreement with the baseline move.

SERVEMATRIX_INJECT_SCALE="<tensor name>:<factor>". The default flips the sign of layer 25's MLP down
projection in SmolLM2-135M: it still answers "Paris", but (measured with transformers on 8 gsm8k
answers) the gold-answer NLL rises from 1.58 to 1.96 nats/token.
"""

from __future__ import annotations

import functools
import os

from servematrix_fixes.base import Fix, State

DEFAULT = "model.layers.25.mlp.down_proj.weight:-1.0"
_MARK = "_servematrix_inject_scale"


def target() -> tuple[str, float]:
    name, factor = os.environ.get("SERVEMATRIX_INJECT_SCALE", DEFAULT).rsplit(":", 1)
    return name, float(factor)


class InjectScale(Fix):
    name = "inject-scale"
    architectures = ("LlamaForCausalLM",)
    summary = "fault injection: scales one weight tensor at load time"

    def detect(self) -> tuple[State, str]:
        from vllm.model_executor.models import llama

        if not hasattr(llama.LlamaForCausalLM, "load_weights"):
            return "n/a", "LlamaForCausalLM has no load_weights"
        name, factor = target()
        return "bug", f"scaling {name} by {factor}"

    def apply(self) -> None:
        from vllm.model_executor.models import llama

        cls = llama.LlamaForCausalLM
        if getattr(cls.load_weights, _MARK, False):
            return
        original = cls.load_weights
        name, factor = target()

        @functools.wraps(original)
        def load_weights(self, weights):
            return original(self, ((n, t * factor if n == name else t) for n, t in weights))

        setattr(load_weights, _MARK, True)
        cls.load_weights = load_weights


FIX = InjectScale()
