"""`servematrix mirror` as a user runs it, at the boundary: a --checkpoint directory is replaced
only when it is a twin mirror wrote (one owner check, before anything is written), a failed
mirror leaves nothing written (no scenario without its twin), and every refusal is exit 2 with
one line naming the argument it is about."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from servematrix.cli import main
from tests.unit.mirror.sources import add_embeddings, dense_layers, llama_like, quantized, write_checkpoint


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _run(capsys, *argv) -> tuple[int, list[str]]:
    rc = main(["mirror", *map(str, argv)])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("setup, checkpoint, said", [
    # a mirror.json of {} beside the user's files used to be enough to have them deleted
    ({"ckpt/mirror.json": "{}", "ckpt/notes.txt": "mine"}, "ckpt", "holds 1 file(s) a twin does not, e.g. 'notes.txt'"),
    # a twin's file names, but a mirror.json mirror did not write
    ({"ckpt/mirror.json": "{}", "ckpt/config.json": "{}"}, "ckpt", "its mirror.json is not one mirror wrote"),
    # --checkpoint . emptied the working directory
    ({"mirror.json": "{}", "notes.txt": "mine"}, ".", "is the working directory or holds it"),
    ({"notes.txt": "mine"}, "..", "is the working directory or holds it"),
    ({"ckpt": "a file"}, "ckpt", "exists and is not a directory"),
    ({"ckpt/notes.txt": "mine"}, "ckpt", "is not a twin written by mirror (no mirror.json)"),
    ({"ckpt/sub/x.txt": "mine", "ckpt/mirror.json": "{}"}, "ckpt", "a twin does not, e.g. 'sub'"),
])
def test_a_checkpoint_dir_that_is_not_a_twin_is_refused_before_anything_is_written(work, capsys, setup, checkpoint, said):
    for rel, text in setup.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    before = _tree(work)
    rc, err = _run(capsys, "model_type:llama", "--out", "scenarios/t.yaml", "--checkpoint", checkpoint)
    assert rc == 2 and len(err) == 1 and said in err[0], err
    assert err[0].startswith(f"error: {checkpoint}: ")
    assert _tree(work) == before  # nothing deleted, nothing written (no scenario either)


def test_a_symlinked_checkpoint_dir_and_one_holding_the_scenario_are_refused(work, capsys):
    (work / "real").mkdir()
    (work / "real" / "notes.txt").write_text("mine")
    os.symlink(work / "real", work / "link")
    before = _tree(work)
    rc, err = _run(capsys, "model_type:llama", "--out", "t.yaml", "--checkpoint", "link")
    assert rc == 2 and len(err) == 1 and "is a symbolic link" in err[0]
    # the scenario inside the directory the twin replaces would be deleted with it
    (work / "ck").mkdir()
    rc, err = _run(capsys, "model_type:llama", "--out", "ck/t.yaml", "--checkpoint", "ck")
    assert rc == 2 and len(err) == 1 and "holds ck/t.yaml" in err[0]
    assert _tree(work) == {**before, "ck": b"<dir>"}


def test_a_twin_mirror_wrote_is_replaced_and_a_failed_twin_leaves_no_scenario(cache, work, capsys, monkeypatch):
    rc, err = _run(capsys, "model_type:llama", "--out", "t.yaml", "--checkpoint", "ck")
    assert rc == 0, err
    first = json.loads((work / "ck" / "mirror.json").read_text())
    assert first["source"] == "model_type:llama"
    (work / "t.yaml").unlink()
    rc, err = _run(capsys, "model_type:llama", "--out", "t.yaml", "--checkpoint", "ck", "--tp", "1,2,4")
    assert rc == 0, err  # its own twin: replaced
    # the forge fails: the scenario that would name the twin is not written either
    from servematrix.mirror import twin

    def broken(name, spec):
        raise RuntimeError("disk full")

    monkeypatch.setattr(twin, "forge", broken)
    rc, err = _run(capsys, "model_type:llama", "--out", "u.yaml", "--checkpoint", "ck2")
    assert rc == 2 and len(err) == 1 and "forging the twin failed: RuntimeError: disk full" in err[0]
    assert not (work / "u.yaml").exists() and not (work / "ck2").exists()


def test_refusals_name_the_argument_they_are_about(work, capsys):
    config = llama_like("llama", 2, 128, 2, 1, 64, 256, 300)
    tensors = add_embeddings(quantized(dense_layers(2, 128, 2, 1, 64, 256), "none", "F32"), 300, 128, "F32", False)
    src = write_checkpoint(work / "src", config, tensors)
    (work / "twin.txt").write_text("hi")
    rc, err = _run(capsys, src, "--diff", "twin.txt")  # used to blame SOURCE
    assert rc == 2 and err == [f"error: --diff: 'twin.txt' is a file, not a checkpoint directory, its config.json, "
                               "hf:ORG/NAME (read from the local Hugging Face cache; hub ids are never fetched) or "
                               "model_type:NAME"]
    rc, err = _run(capsys, src, "--diff", "nosuch/dir")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --diff: 'nosuch/dir': no such file or directory")
    # a missing local path used to be reported by a Hugging Face repo-id rule (and fetched for 45 s)
    rc, err = _run(capsys, "./models/llama-8b", "--out", "t.yaml")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: SOURCE: './models/llama-8b': no such file or directory")
    rc, err = _run(capsys, "myorg/mymodel", "--out", "t.yaml")
    assert rc == 2 and len(err) == 1 and "no such file or directory" in err[0] and "never fetched" in err[0]
    assert not (work / "t.yaml").exists()
