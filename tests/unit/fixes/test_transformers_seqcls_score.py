"""transformers-seqcls-score: detect() reads this vLLM's Transformers-backend sequence classifier (it
keeps a `score` head as `classifier`) and its weights mapper (which renames no `score.`): the bug is
in 0.32.0 (registry and detection: test_registry.py); a mapper that names score reads as fixed; apply() is idempotent. The repair runs in real
rank processes in tests/integration/test_sweep_wrappers.py."""

import inspect

from vllm.model_executor.models.transformers import base, pooling

from servematrix_fixes import transformers_seqcls_score as fix


def test_a_mapper_that_renames_score_reads_as_fixed():
    mixin = inspect.getsource(pooling.SequenceClassificationMixin.__init__)
    mapper = inspect.getsource(base.Base._create_hf_to_vllm_mapper)
    assert fix._bug(mixin, mapper)
    assert not fix._bug(mixin, mapper + '\n        orig_to_new_prefix = {"score.": "classifier."}')


def test_apply_wraps_the_constructor_once(monkeypatch):
    cls = pooling.SequenceClassificationMixin
    monkeypatch.setattr(cls, "__init__", cls.__init__)  # restored after the test
    fix.FIX.apply()
    wrapped = cls.__init__
    fix.FIX.apply()
    assert cls.__init__ is wrapped and getattr(wrapped, fix._MARK)
