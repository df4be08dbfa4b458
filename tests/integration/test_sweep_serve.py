"""`servematrix sweep --depth serve` on real vLLM (the CPU build): after its load check, a cell's twin
is served on the same command line and asked what its kind answers — a causal LM one greedy
completion, an embedding model (vLLM's embedding table) one /v1/embeddings request whose vectors are
as wide as the twin's hidden size; a classifier stops at its load check and says why."""

import json
import math

import pytest

from .conftest import sweep, twin_of

pytestmark = pytest.mark.integration


def test_a_served_embedding_cell_answers_v1_embeddings_and_a_causal_lm_a_completion(tmp_path, shared_cache):
    proc, by_id = sweep(tmp_path / "run", "tp1", "llama/*,BertModel/*,BertForSequenceClassification/*",
                        shared_cache, "--depth", "serve")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lm, emb, cls = by_id["llama/tp1-none"], by_id["BertModel/tp1-none"], by_id["BertForSequenceClassification/tp1-none"]
    assert lm["verdict"] == "pass" and "one greedy completion" in lm["note"]
    assert lm["smoke"]["ok"] and lm["smoke"]["prompts"][0]["text"], lm["smoke"]
    assert emb["verdict"] == "pass" and "one /v1/embeddings request" in emb["note"] and emb["smoke"] is None
    hidden = json.loads((twin_of(emb) / "config.json").read_text())["hidden_size"]
    vectors = emb["embedding"]["vectors"]
    assert len(vectors) == 2 and all(v["dimension"] == hidden for v in vectors)
    assert all(math.isfinite(x) for v in vectors for x in v["vector"])
    assert cls["verdict"] == "pass" and "not served: a pooling model of vLLM's classification table" in cls["note"]
    assert (tmp_path / "run" / "BertModel" / "tp1-none" / "serve.log").is_file()
