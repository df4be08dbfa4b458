"""Property: whatever one input of `servematrix mirror` is mutated into — the source's config.json,
a safetensors header, the index weight map, a twin's mirror.json (read by --diff, and judged by
the owner check of --checkpoint) — the command exits 0 (or 1 for a --diff that differs) or 2
with one line; never a traceback or an "internal error"; it never deletes or changes a file it
did not write (the source is byte-for-byte the same, a user's file in a --checkpoint directory
survives); on 2 it writes no scenario; and each example ends in bounded time.

The source is a 2-layer Llama-shaped header-only checkpoint (tests/unit/mirror/sources.py).
Mutations: bytes (flip, insert, delete, invalid UTF-8, truncation, a 5000-digit number, deep
nesting, NaN) and typed values (any field replaced by a JSON value of another type, a huge,
negative or zero number, a list, an object, a path that climbs out; fields dropped or added)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servematrix.cli import main
from servematrix.mirror.inputs import LAYERS_MAX
from servematrix.mirror.layout import rules
from tests.unit.mirror.sources import add_embeddings, dense_layers, llama_like, quantized, write_checkpoint

# derandomized with fixed counts, so CI sees the same examples every time; ~0.1-0.5 s an example
# on an idle 2-core host (a plan of a 2-layer source), each test well under 20 s
EXAMPLES = int(os.environ.get("SERVEMATRIX_MIRROR_FUZZ_EXAMPLES", "30"))  # more, by hand, to hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 30, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SECONDS = 30  # one example, mirror end to end: far above the ~1 s one takes, far below a hang

EDGE_INTS = [0, -1, 1, 2, 3, 2**31, 2**63, 10**12, LAYERS_MAX, LAYERS_MAX + 1, 65537]
SCALARS = (st.none() | st.booleans() | st.sampled_from(EDGE_INTS) | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["../../etc/passwd", "/etc/passwd", "", "a/b.safetensors", "BF16", "llama", "\x1b[31m"]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=6)
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe9"]


@st.composite
def bytes_mutation(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "insert", "delete", "utf8", "truncate", "digits", "deep", "nan"]))
    at = draw(st.integers(0, len(raw)))
    if kind == "flip" and raw:
        at = min(at, len(raw) - 1)
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    if kind == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if kind == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 64)):]
    if kind == "utf8":
        return raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
    if kind == "digits":  # more digits than Python converts from text
        return raw.replace(b": 2,", b": " + b"9" * 5000 + b",", 1)
    if kind == "deep":
        return raw.replace(b"{", b'{"deep": ' + b"[" * 50000 + b"]" * 50000 + b", ", 1)
    if kind == "nan":
        return raw.replace(b": 2,", b": NaN,", 1)
    return raw[:at]


def _role_keys() -> list[str]:
    return sorted({k for keys in rules()["fields"].values() for k in keys})


@st.composite
def value_mutation(draw, data: dict, keys: list[str]) -> dict:
    """1-3 fields replaced by any JSON value, dropped, or added."""
    data = json.loads(json.dumps(data))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(set(data) | set(keys))))
        if draw(st.integers(0, 4)) == 0:
            data.pop(key, None)
        else:
            data[key] = draw(VALUES)
    return data


# --- the source and the run -----------------------------------------------------------------------

def _source(root: Path, shards: int = 1) -> Path:
    config = llama_like("llama", 2, 128, 2, 1, 64, 256, 300)
    tensors = add_embeddings(quantized(dense_layers(2, 128, 2, 1, 64, 256), "none", "F32"), 300, 128, "F32", False)
    return write_checkpoint(root / "src", config, tensors, shards=shards)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _mirror(*argv) -> tuple[int, list[str], float]:
    err, out = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["mirror", *map(str, argv)])
    return rc, err.getvalue().strip().splitlines(), time.monotonic() - start


def _judged(rc: int, err: list[str], seconds: float, ok=(0, 2)) -> None:
    assert rc in ok, (rc, err)
    if rc == 2:
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert "internal error" not in err[0] and "Traceback" not in err[0], err
    assert seconds < SECONDS, (seconds, err)


def _mirror_source(mutate) -> int:
    """Mutate a fresh copy of the source, mirror it; the source is never changed, and a refused
    mirror writes no scenario."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = mutate(root)
        before = _snapshot(src)
        out = root / "scenarios" / "t.yaml"
        rc, err, seconds = _mirror(src, "--out", out)
        _judged(rc, err, seconds)
        assert _snapshot(src) == before
        assert out.exists() == (rc == 0)
        return rc


# --- config.json ---------------------------------------------------------------------------------

def test_fuzzed_config_json_exits_0_or_2_with_one_line():
    seen: Counter = Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        kind = data.draw(st.sampled_from(["values", "bytes", "config-only"]))

        def mutate(root: Path) -> Path:
            src = _source(root)
            path = src / "config.json"
            config = json.loads(path.read_text())
            if kind == "bytes":
                path.write_bytes(data.draw(bytes_mutation(json.dumps(config, indent=1).encode())))
                return src
            if kind == "config-only":  # no shard: the layout comes from the config's class
                (src / "model.safetensors").unlink()
            path.write_text(json.dumps(data.draw(value_mutation(config, _role_keys() + [
                "model_type", "architectures", "auto_map", "quantization_config", "torch_dtype", "rope_scaling",
                "layer_types", "mlp_only_layers"])), indent=1))
            return src

        seen[_mirror_source(mutate)] += 1

    run()
    assert seen[0] and seen[2], seen  # both sides of the boundary were reached


# --- safetensors headers -------------------------------------------------------------------------

def _rewrite_header(path: Path, header_bytes: bytes, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes)


def test_fuzzed_safetensors_header_exits_0_or_2_with_one_line():
    seen: Counter = Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        kind = data.draw(st.sampled_from(["entry", "field", "name", "bytes", "length"]))

        def mutate(root: Path) -> Path:
            src = _source(root)
            path = src / "model.safetensors"
            raw = path.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
            names = sorted(k for k in header if k != "__metadata__")
            name = data.draw(st.sampled_from(names + ["__metadata__"]))
            if kind == "entry":
                header[name] = data.draw(VALUES)
            elif kind == "field":
                entry = dict(header[name]) if isinstance(header[name], dict) else {}
                field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
                if data.draw(st.booleans()):
                    entry.pop(field, None)
                else:
                    entry[field] = data.draw(VALUES)
                header[name] = entry
            elif kind == "name":  # a tensor under another name: huge layer indices, odd characters
                new = data.draw(st.sampled_from(["model.layers.99999999999.mlp.up_proj.weight", "", "model.layers.-1.x",
                                                 "model.layers.1.experts.99999999.w1.weight", "\x1b]0;x\x07",
                                                 "a" * 5000]) | st.text(max_size=40))
                header[new] = header.pop(data.draw(st.sampled_from(names)))
            if kind == "bytes":
                _rewrite_header(path, data.draw(bytes_mutation(json.dumps(header).encode())))
            elif kind == "length":
                blob = json.dumps(header).encode()
                _rewrite_header(path, blob, data.draw(st.sampled_from([0, 1, len(blob) - 1, len(blob) + 1, 2**63,
                                                                       2**64 - 1])))
            else:
                _rewrite_header(path, json.dumps(header).encode())
            return src

        seen[_mirror_source(mutate)] += 1

    run()
    assert seen[0] and seen[2], seen


# --- index weight map ----------------------------------------------------------------------------

def test_fuzzed_index_weight_map_exits_0_or_2_with_one_line():
    seen: Counter = Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        kind = data.draw(st.sampled_from(["values", "entries", "bytes", "no-shards"]))

        def mutate(root: Path) -> Path:
            src = _source(root, shards=2)
            path = src / "model.safetensors.index.json"
            index = json.loads(path.read_text())
            if kind == "values":
                index = data.draw(value_mutation(index, ["weight_map", "metadata"]))
            elif kind == "entries":
                index["weight_map"] = data.draw(value_mutation(index["weight_map"], ["model.layers.0.x.weight"]))
            elif kind == "no-shards":  # the index alone: its names keep the class's layout
                for shard in src.glob("*.safetensors"):
                    shard.unlink()
                if data.draw(st.booleans()):
                    index["weight_map"] = data.draw(value_mutation(index["weight_map"], ["lm_head.weight"]))
            if kind == "bytes":
                path.write_bytes(data.draw(bytes_mutation(json.dumps(index, indent=1).encode())))
            else:
                path.write_text(json.dumps(index, indent=1))
            return src

        seen[_mirror_source(mutate)] += 1

    run()
    assert seen[0] and seen[2], seen


# --- mirror.json ---------------------------------------------------------------------------------

ORIGIN = {"source": "src", "layer_map": {"0": 0, "1": 1}, "experts": None, "not_mirrored": [], "post_processed": []}


def _origin_text(data) -> bytes:
    if data.draw(st.booleans()):
        return data.draw(bytes_mutation(json.dumps(ORIGIN, indent=1).encode()))
    return json.dumps(data.draw(value_mutation(ORIGIN, ["layer_map", "experts"]))).encode()


def test_fuzzed_mirror_json_of_a_diffed_twin_exits_0_1_or_2_with_one_line():
    seen: Counter = Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            src = _source(root)
            twin = root / "twin"
            shutil.copytree(src, twin)
            (twin / "mirror.json").write_bytes(_origin_text(data))
            before = _snapshot(root)
            rc, err, seconds = _mirror(src, "--diff", twin)
            _judged(rc, err, seconds, ok=(0, 1, 2))
            assert _snapshot(root) == before  # --diff writes nothing
            seen[rc] += 1

    run()
    assert seen[2] and (seen[0] or seen[1]), seen


def test_fuzzed_checkpoint_dir_is_replaced_only_when_it_is_a_twin(cache):
    """The owner check of --checkpoint: whatever mirror.json says and whatever else the directory
    holds, a user's file in it survives; a run that replaces it exits 0 and leaves a twin."""
    seen: Counter = Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            src = _source(root)
            target = root / "ck"
            target.mkdir()
            (target / "mirror.json").write_bytes(_origin_text(data))
            foreign = data.draw(st.sampled_from([None, None, "notes.txt", "sub/x.txt", "model.bin", ".hidden"]))
            if data.draw(st.booleans()):
                (target / "config.json").write_text("{}")
            if foreign:
                (target / foreign).parent.mkdir(parents=True, exist_ok=True)
                (target / foreign).write_text("the user's")
            rc, err, seconds = _mirror(src, "--out", root / "t.yaml", "--checkpoint", target)
            _judged(rc, err, seconds)
            if foreign:
                assert rc == 2 and (target / foreign).read_text() == "the user's", err
            if rc == 0:
                assert json.loads((target / "mirror.json").read_text())["source"] == str(src)
            assert (root / "t.yaml").exists() == (rc == 0)
            seen[rc] += 1

    run()
    assert seen[0] and seen[2], seen


@pytest.fixture(scope="module", autouse=True)
def _warm(tmp_path_factory):
    # the first mirror of a process imports torch and transformers' classes (~15-30 s on a loaded
    # host): done once here, so an example's time measures the mirror, not the imports
    from servematrix.mirror.plan import plan_twin
    from servematrix.mirror.source import read_source

    src = _source(tmp_path_factory.mktemp("warm"))
    plan_twin(read_source(str(src)), 2, [1, 2])
    (src / "model.safetensors").unlink()
    plan_twin(read_source(str(src)), 2, [1, 2])  # the config-only path: the class built on meta


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # nothing here may reach a hub: the mirror never asks one, and a test that did would hang
    import huggingface_hub

    def refuse(*a, **kw):
        raise AssertionError("a hub was asked")

    monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata", refuse)
