"""Where the sweep's twins live: a directory named by what decides the twin's bytes, so a sweep of
other layouts (or a second sweep at the same time) builds beside a twin another sweep is loading
instead of replacing it, and a twin that exists is reused, not rewritten. Real mirror and forge
(transformers' llama class from its defaults), into a temporary cache."""

from servematrix.sweep import twins


def test_twins_of_other_layouts_live_apart_and_an_existing_one_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    where = tmp_path / "sweep-twins"
    tp1 = twins.build("llama", where, 1, [1])
    pp2 = twins.build("llama", where, 2, [1])
    assert tp1.ok and pp2.ok and tp1.path != pp2.path
    assert {p.name.split("-")[0] for p in where.iterdir()} == {"llama"} and len(list(where.iterdir())) == 2
    weights = next(p for p in (where / tp1.path).iterdir() if p.suffix == ".safetensors")
    before = weights.stat().st_mtime_ns, weights.stat().st_ino
    again = twins.build("llama", where, 1, [1])
    assert again.path == tp1.path
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before  # reused, not rebuilt in place
