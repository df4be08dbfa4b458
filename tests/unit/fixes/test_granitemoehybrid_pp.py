"""The #50962 backport: vLLM's own GraniteMoeHybridModel.load_weights, run on the module layout of
PP rank 1 of 2 (layer 0 is a PPMissingLayer), raises the KeyError of #50961;
wrapped, it loads exactly the parameters this rank holds. detect() reads the `_load` helper."""

import pytest
import torch
from torch import nn

from vllm.model_executor.models import granitemoehybrid, utils
from vllm.model_executor.models.utils import PPMissingLayer

from servematrix_fixes import granitemoehybrid_pp

H = 4


def _weight(*shape):
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class _Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = _weight(H)


class _Layer(nn.Module):
    """The parameters of one mamba layer that reach `_load`: both of its paths (gate rename and the
    unstacked fallback, A_log -> A)."""

    def __init__(self):
        super().__init__()
        self.input_layernorm = _Norm()
        self.mamba = nn.Module()
        self.mamba.A = _weight(2)
        self.block_sparse_moe = nn.Module()
        self.block_sparse_moe.gate = nn.Module()
        self.block_sparse_moe.gate.weight = _weight(3, H)


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = _weight(8, H)


class _Rank1Of2(nn.Module):
    """The module tree GraniteMoeHybridModel builds on the last of two PP ranks: make_layers puts a
    PPMissingLayer where layer 0 was; the embedding and the final norm exist on every rank."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = _Embed()
        self.layers = nn.ModuleList([PPMissingLayer(), _Layer()])
        self.norm = _Norm()

    def get_expert_mapping(self):
        return []  # no expert tensors in this stream: the expert helpers are guarded upstream


def checkpoint():
    """Every tensor of the two-layer checkpoint, as every rank iterates it (in name order, as the
    safetensors files list them)."""
    stream = [("embed_tokens.weight", torch.ones(8, H)), ("norm.weight", torch.full((H,), 7.0))]
    for i in range(2):
        stream += [
            (f"layers.{i}.input_layernorm.weight", torch.full((H,), float(i + 1))),
            (f"layers.{i}.mamba.A_log", torch.full((2,), float(i + 2))),
            (f"layers.{i}.block_sparse_moe.router.layer.weight", torch.full((3, H), float(i + 3))),
        ]
    return sorted(stream, key=lambda t: t[0])


@pytest.fixture
def model_cls(monkeypatch):
    cls = granitemoehybrid.GraniteMoeHybridModel
    monkeypatch.setattr(cls, "load_weights", cls.load_weights)  # restored after the test
    monkeypatch.setattr(utils, "_model_to_pp_missing_layer_names", {})  # keyed by id(): no stale entries
    return cls


def test_vllms_own_loader_raises_the_50961_keyerror_on_pp_rank_1(model_cls):
    assert granitemoehybrid_pp.FIX.detect()[0] == "bug"
    with pytest.raises(KeyError, match=r"'layers\.0\.block_sparse_moe\.gate\.weight'"):
        model_cls.load_weights(_Rank1Of2(), checkpoint())


def test_wrapped_loader_loads_exactly_this_ranks_parameters(model_cls):
    original = model_cls.load_weights
    granitemoehybrid_pp.FIX.apply()
    granitemoehybrid_pp.FIX.apply()  # idempotent: wrapped once
    patched = model_cls.load_weights
    assert patched is not original and patched.__wrapped__ is original
    assert granitemoehybrid_pp.FIX.detect()[0] == "bug"  # reads vLLM's code, not the wrapper
    model = _Rank1Of2()
    loaded = patched(model, checkpoint())
    assert loaded == set(dict(model.named_parameters()))
    assert loaded == {"embed_tokens.weight", "norm.weight", "layers.1.input_layernorm.weight", "layers.1.mamba.A",
                      "layers.1.block_sparse_moe.gate.weight"}
    assert torch.equal(model.layers[1].input_layernorm.weight, torch.full((H,), 2.0))  # layer 1's, not 0's
    assert torch.equal(model.layers[1].mamba.A, torch.full((2,), 3.0))
    assert torch.equal(model.layers[1].block_sparse_moe.gate.weight, torch.full((3, H), 4.0))
    assert torch.equal(model.norm.weight, torch.full((H,), 7.0))


def test_a_layer_this_rank_holds_still_fails_loudly(model_cls):
    """The wrapper skips other ranks' layers only: a name this rank should hold but lacks is vLLM's
    KeyError as before, not silently dropped."""
    granitemoehybrid_pp.FIX.apply()
    stream = checkpoint() + [("layers.1.no_such.weight", torch.ones(H))]
    with pytest.raises(KeyError, match=r"'layers\.1\.no_such\.weight'"):
        model_cls.load_weights(_Rank1Of2(), stream)


def upstream_guarded(self, weights):  # the shape of #50962: _load consults the PP-missing check
    params_dict = dict(self.named_parameters())

    def _load(n, p):
        if utils.is_pp_missing_parameter(n, self):
            return
        params_dict[n].copy_(p)

    for n, p in weights:
        _load(n, p)


def upstream_membership(self, weights):  # the other way vLLM writes the guard
    params_dict = dict(self.named_parameters())

    def _load(n, p):
        if n not in params_dict:
            return
        params_dict[n].copy_(p)

    for n, p in weights:
        _load(n, p)


def refactored(self, weights):  # no _load helper at all: not the layout this fix patches
    return set()


@pytest.mark.parametrize(("loader", "state"), [(upstream_guarded, "fixed"), (upstream_membership, "fixed"),
                                               (refactored, "n/a")])
def test_detect_reads_the_load_helper(model_cls, monkeypatch, loader, state):
    monkeypatch.setattr(model_cls, "load_weights", loader)
    assert granitemoehybrid_pp.FIX.detect()[0] == state
