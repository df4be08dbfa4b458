"""sweep/digests.py: a twin's tensor digested as the load check digests a parameter, in each dtype
vLLM may hold it in, so that a parameter vLLM cast still proves which tensor it read."""

import torch

from servematrix.serve.loadcheck_worker import _digest
from servematrix.sweep import digests


def test_a_float_tensor_is_digested_in_each_dtype_vllm_may_keep_it_in():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7
    out = digests.of(t)
    assert len(out) == len(digests.DTYPES)
    assert _digest(t) in out and _digest(t.bfloat16()) in out and _digest(t.half()) in out


def test_an_integer_tensor_is_also_digested_in_its_own_dtype():
    # a draft's vocabulary map (EAGLE-3's d2t, int64): vLLM keeps it as it is, not cast to float
    t = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int64)
    out = digests.of(t)
    assert out[-1] == _digest(t) and len(out) == len(digests.DTYPES) + 1


def test_one_value_repeated_is_not_distinctive():
    assert not digests.distinctive(torch.ones(4)) and digests.distinctive(torch.tensor([1.0, 2.0]))
    assert not digests.distinctive(torch.tensor([5.0]))
