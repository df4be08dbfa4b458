"""Backport of vLLM PR #38191: MiniMax-M2 `k_norm` sharding when total_num_kv_heads < TP.

With fewer KV heads than TP ranks the KV heads are replicated, so each rank holds head_dim of k;
`MiniMaxText01RMSNormTP` still sized and sharded the k_norm weight by the TP world
(head_dim * kv_heads / tp), and the first forward died with "The size of tensor a (64) must match
the size of tensor b (32)". The fix shards k_norm by the KV-head count, each rank taking the
weight slice of the KV head it replicates. Fixed upstream in 0.21.0, where the norm takes
`weight_shard_world_size` (the detection signal).
"""

from __future__ import annotations

import functools
import inspect

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_38191"


def _classes():
    from vllm.model_executor.models import minimax_m2

    return minimax_m2.MiniMaxM2Attention, minimax_m2.MiniMaxText01RMSNormTP


class MiniMaxKNorm(Fix):
    name = "minimax-k-norm-38191"
    pr = "https://github.com/vllm-project/vllm/pull/38191"
    architectures = ("MiniMaxM2ForCausalLM",)
    summary = "shard MiniMax-M2 k_norm by KV heads when they are replicated across TP ranks"

    def detect(self) -> tuple[State, str]:
        try:
            attention, norm = _classes()
        except (ImportError, AttributeError) as exc:
            return "n/a", f"no MiniMax-M2 attention in this vLLM ({exc})"
        if "weight_shard_world_size" in inspect.signature(norm.__init__).parameters:
            return "fixed", "MiniMaxText01RMSNormTP takes weight_shard_world_size"
        return "bug", "MiniMaxText01RMSNormTP shards every weight by the TP world"

    def apply(self) -> None:
        import torch
        from torch import nn
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        attention, _ = _classes()
        if getattr(attention.__init__, _MARK, False):
            return
        original = attention.__init__

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            tp = get_tensor_model_parallel_world_size()
            kv = self.total_num_kv_heads
            if kv >= tp:
                return
            shard_rank = get_tensor_model_parallel_rank() // (tp // kv)
            old = self.k_norm.weight
            weight = nn.Parameter(torch.ones(self.head_dim, dtype=old.dtype, device=old.device))

            def weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
                size = loaded_weight.shape[0] // kv
                param.data.copy_(loaded_weight[shard_rank * size:(shard_rank + 1) * size])

            weight.weight_loader = weight_loader
            self.k_norm.weight = weight

        setattr(__init__, _MARK, True)
        attention.__init__ = __init__


FIX = MiniMaxKNorm()
