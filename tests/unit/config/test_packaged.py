"""Packaged data (servematrix/data/*.yaml) is read through one typed loader and, damaged, stops with
the `file:line: field: why` a user's YAML gets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from servematrix.check.gsm8k import Exemplars, LmEvalTask
from servematrix.config import devices, packaged
from servematrix.config.devices import DeviceProfile, DevicesFile
from servematrix.config.mirror_families import MirrorFamilies
from servematrix.config.releases import ReleasesFile
from servematrix.errors import ConfigError
from servematrix.sweep.drafts import DraftRules
from servematrix.sweep.filled import FilledRules
from servematrix.sweep.heads import HeadRules
from servematrix.sweep.multimodal import MultimodalRules
from servematrix.sweep.native import NativeRules
from servematrix.sweep.rules import SweepRules
from servematrix.sweep.wrappers import WrapperRules
from servematrix.paths import data_file

# every packaged YAML file and the model it is read as
MODELS = {
    "devices.yaml": DevicesFile,
    "gsm8k-fewshot.yaml": Exemplars,
    "gsm8k-task.yaml": LmEvalTask,
    "mirror-families.yaml": MirrorFamilies,
    "vllm-releases.yaml": ReleasesFile,
    "sweep-quants.yaml": SweepRules,
    "sweep-drafts.yaml": DraftRules,
    "sweep-filled.yaml": FilledRules,
    "sweep-heads.yaml": HeadRules,
    "sweep-multimodal.yaml": MultimodalRules,
    "sweep-native.yaml": NativeRules,
    "sweep-wrappers.yaml": WrapperRules,
}


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """A copy of servematrix/data the loader reads instead of the package's."""
    copy = tmp_path / "data"
    shutil.copytree(data_file("."), copy, ignore=shutil.ignore_patterns("configs"))
    monkeypatch.setattr(packaged, "data_file", lambda name: copy / name)
    return copy


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_packaged_yaml_file_validates_as_its_model(name):
    assert packaged.load(name, MODELS[name]) is not None


def test_every_packaged_yaml_file_has_a_model():
    shipped = {p.name for p in data_file(".").glob("*.yaml")}
    assert shipped == set(MODELS)


def test_devices_yaml_loads_into_the_device_profile_model():
    cpu, gpu = devices.device("cpu"), devices.device("gpu")
    assert isinstance(cpu, DeviceProfile) and devices.device_names() == ("cpu", "gpu")
    assert cpu.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and cpu.bind_threads and not cpu.uses_gpus
    assert cpu.load_check is not None and cpu.load_check.attention == {"mla": "TRITON_MLA", "sparse": "FLASHMLA_SPARSE"}
    assert gpu.uses_gpus and gpu.load_check is None and devices.uses_gpus("gpu")
    with pytest.raises(KeyError, match="unknown device 'tpu' \\(known: cpu, gpu\\)"):
        devices.device("tpu")


def test_a_misspelled_field_in_the_packaged_devices_file_is_refused_at_its_line(data_copy):
    path = data_copy / "devices.yaml"
    path.write_text(path.read_text().replace("  bind_threads: true", "  bind_thread: true"))
    with pytest.raises(ConfigError) as exc:
        devices.device_names()
    assert str(exc.value) == f"{path}:{_line_of(path, 'bind_thread:')}: cpu.bind_thread: unknown field"


def test_a_value_of_the_wrong_type_in_the_packaged_devices_file_is_refused_at_its_line(data_copy):
    path = data_copy / "devices.yaml"
    path.write_text(path.read_text().replace('VLLM_CPU_KVCACHE_SPACE: "1"', "VLLM_CPU_KVCACHE_SPACE: 1"))
    with pytest.raises(ConfigError) as exc:
        devices.uses_gpus("cpu")
    assert exc.value.path == str(path) and exc.value.line == _line_of(path, "VLLM_CPU_KVCACHE_SPACE:")
    assert exc.value.field == "cpu.env.VLLM_CPU_KVCACHE_SPACE"


def test_malformed_yaml_in_a_packaged_file_is_refused_at_its_line(data_copy):
    path = data_copy / "gsm8k-task.yaml"
    lines = path.read_text().splitlines()
    at = _line_of(path, "test_split:")
    lines[at - 1] = "test_split: [test"  # an unclosed flow sequence
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: malformed YAML") as exc:
        packaged.load_raw("gsm8k-task.yaml", LmEvalTask)
    assert exc.value.line >= at


@pytest.mark.parametrize("name, anchor, broken, field", [
    ("gsm8k-fewshot.yaml", "- question:", "- question: [not, text]", "0.question"),
    ("mirror-families.yaml", "layer_containers:", "layer_container: [layers, layer, h, blocks]", "layer_container"),
    ("vllm-releases.yaml", "resolve:", "resolv:", "resolv"),
])
def test_each_packaged_file_damaged_names_the_file_line_and_field(data_copy, name, anchor, broken, field):
    path = data_copy / name
    lines = path.read_text().splitlines()
    at = _line_of(path, anchor)
    lines[at - 1] = broken
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as exc:
        packaged.load(name, MODELS[name])
    assert (exc.value.path, exc.value.line, exc.value.field) == (str(path), at, field), str(exc.value)


def test_a_packaged_file_edited_in_place_is_read_again(data_copy):
    path = data_copy / "devices.yaml"
    assert devices.device("cpu").bind_threads
    text = path.read_text().replace("  bind_threads: true", "  bind_threads: false")
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not devices.device("cpu").bind_threads


def test_load_raw_hands_out_a_copy_the_caller_may_fill_in():
    task = packaged.load_raw("gsm8k-task.yaml", LmEvalTask)
    task["fewshot_config"]["samples"] = []
    assert "samples" not in packaged.load_raw("gsm8k-task.yaml", LmEvalTask)["fewshot_config"]
