"""The corpus of published config.json files (servematrix/data/configs/, index.yaml) is data the sweep
builds its twins from: every copy says where it was found, parses as the JSON it claims to be, is the
model_type its index entry says, and names a model_type transformers can build and an architecture the
vLLM beside servematrix registers. A copy that fails any of these would silently fall back to the
class defaults or build a twin of a family nobody ships."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest

from servematrix.paths import data_file
from servematrix.sweep import corpus

ENTRIES = corpus.entries()
HUB = re.compile(r"^[\w.-]+/[\w.-]+(@[0-9a-f]{7,40})?$")


@lru_cache(maxsize=1)
def _vllm_archs() -> frozenset[str]:
    from vllm.model_executor.models import ModelRegistry

    return frozenset(ModelRegistry.get_supported_archs())


def _architecture(entry) -> str:
    from servematrix.mirror.source import causal_lm_class

    return (entry.config().get("architectures") or [causal_lm_class(entry.model_type)])[0]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.file)
def test_every_copy_names_its_hub_repo_and_where_it_was_found(entry):
    assert HUB.match(entry.hub), f"{entry.file}: hub {entry.hub!r} is not ORG/NAME[@revision]"
    assert len(entry.found.split()) >= 4, f"{entry.file}: 'found' does not say where the copy came from"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.file)
def test_every_copy_is_a_json_object_of_the_model_type_its_entry_names(entry):
    config = entry.config()  # raises ConfigError where the file and the index disagree
    assert isinstance(config, dict) and config["model_type"] == entry.model_type
    # the corpus files sit under the model_type they are of, one directory per family
    assert entry.file.split("/")[0] == entry.model_type


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.complete], ids=lambda e: e.file)
def test_a_complete_copy_carries_what_every_published_config_json_does(entry):
    # transformers writes architectures on save_pretrained; a "complete" copy without it is not the file
    assert entry.config().get("architectures"), f"{entry.file} says complete but has no architectures"


def test_every_config_file_in_the_corpus_is_listed_in_the_index_once():
    root = data_file("configs")
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*.json"))
    listed = [e.file for e in ENTRIES]
    assert len(listed) == len(set(listed)), "an index entry is listed twice"
    assert sorted(listed) == on_disk


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.file)
def test_every_model_type_is_one_transformers_builds(entry):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert entry.model_type in CONFIG_MAPPING_NAMES, f"transformers knows no model_type {entry.model_type!r}"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.file)
def test_every_architecture_is_one_the_vllm_beside_servematrix_registers(entry):
    arch = _architecture(entry)
    assert arch in _vllm_archs(), f"{entry.file}: vLLM registers no {arch}"


def test_a_config_that_is_not_the_model_type_its_entry_names_is_refused(tmp_path, monkeypatch):
    from servematrix.errors import ConfigError

    (tmp_path / "qwen3").mkdir()
    (tmp_path / "qwen3" / "x.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setattr(corpus, "data_file", lambda name: tmp_path)
    entry = corpus.PublishedConfig(file="qwen3/x.json", model_type="qwen3", hub="a/b", found="a copy found somewhere",
                                   complete=True)
    with pytest.raises(ConfigError, match="model_type"):
        entry.config()
