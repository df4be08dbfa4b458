"""vLLM's Transformers-backend sequence classifier and a decoder classifier's `score` head:
servematrix's own repair of a defect `servematrix sweep` found (docs/sweep-triage.md,
"Transformers-backend wrappers"); no open upstream issue was found (PR #27338 once handled both names).

transformers' decoder classifiers (Llama, Qwen2, Qwen3-MoE, Mistral, ... `*ForSequenceClassification`)
name their head `score` and save it as `score.weight`. vLLM's `SequenceClassificationMixin` (the
TransformersForSequenceClassification family, `--model-impl transformers`) finds that head on the
class built on the meta device with `getattr_iter(model, ["classifier", "score"])` and keeps it as
`self.classifier`; `Base._create_hf_to_vllm_mapper` maps base-model prefixes and `lm_head` only, so
the checkpoint's `score.weight` meets no parameter: `ValueError: There is no module or parameter
named 'score' in TransformersForSequenceClassification` at every layout (seen on 0.32.0 and
cpu-0.20.2). The repair: after the mixin's constructor, the instance's weights mapper also renames
the prefix `score.` to `classifier.` (the module that holds that head). A BERT-style head is already
named `classifier` and is untouched.
"""

from __future__ import annotations

import functools
import inspect

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_seqcls_score"


def _modules():
    from vllm.model_executor.models.transformers import base, pooling

    return base, pooling


def _bug(mixin_init: str, mapper: str) -> bool:
    """The mixin keeps a `score` head as `classifier`, and nothing maps the checkpoint's name onto it."""
    keeps_as_classifier = "self.classifier" in mixin_init and '"score"' in mixin_init
    return keeps_as_classifier and "score" not in mapper


class TransformersSeqClsScore(Fix):
    name = "transformers-seqcls-score"
    pr = None  # no open upstream issue or PR found: docs/sweep-triage.md has the write-up
    architectures = ("TransformersForSequenceClassification", "TransformersMoEForSequenceClassification",
                     "TransformersMultiModalForSequenceClassification")
    summary = "map a decoder classifier's score.* checkpoint tensors onto the Transformers backend's classifier"

    def detect(self) -> tuple[State, str]:
        try:
            base, pooling = _modules()
            mixin_init = inspect.getsource(pooling.SequenceClassificationMixin.__init__)
            mapper = inspect.getsource(base.Base._create_hf_to_vllm_mapper)
        except (ImportError, AttributeError, OSError) as exc:
            return "n/a", f"no Transformers-backend sequence classifier to read in this vLLM ({exc})"
        if "self.classifier" not in mixin_init:
            return "n/a", "SequenceClassificationMixin keeps no `classifier` module (not the layout this fix patches)"
        if _bug(mixin_init, mapper):
            return "bug", "SequenceClassificationMixin keeps a `score` head as `classifier`; no mapper renames score.*"
        return "fixed", "the Transformers backend maps a `score` head's checkpoint names"

    def apply(self) -> None:
        from vllm.model_executor.models.utils import WeightsMapper

        mixin = _modules()[1].SequenceClassificationMixin
        original = mixin.__init__
        if getattr(original, _MARK, False):
            return

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.hf_to_vllm_mapper = self.hf_to_vllm_mapper | WeightsMapper(orig_to_new_prefix={"score.": "classifier."})

        setattr(__init__, _MARK, True)
        mixin.__init__ = __init__


FIX = TransformersSeqClsScore()
