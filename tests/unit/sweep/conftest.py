"""Shared by the sweep's unit tests."""

from pathlib import Path

from servematrix.sweep import twins


def base_twin_built(monkeypatch, base: Path, **fields) -> list[str]:
    """twins.build replaced by one that returns the checkpoint at `base` for any key, as the sweep builds a
    target's or a base model's twin (a draft's, a head's); the keys asked for are recorded in the list returned."""
    asked: list[str] = []

    def build(key, directory, max_pp, tps, align=None):
        asked.append(key)
        return twins.Twin(model_type=key, path=str(base), server_args=["--dtype", "bfloat16"], origin="twin from X",
                          **fields)

    monkeypatch.setattr(twins, "build", build)
    return asked
