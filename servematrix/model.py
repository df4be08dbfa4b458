"""Resolve a scenario's model to something vLLM can load, without touching a hub at run time:
forge it (cached), take a local path, or find a Hugging Face id already in the local HF cache."""

from __future__ import annotations

from pathlib import Path

from servematrix import convert, forge
from servematrix.scenario import Scenario


class ModelUnavailable(Exception):
    """The scenario's model cannot be had here (missing path, not cached, forge failed)."""


def resolve(scenario: Scenario, base_dir: Path | None = None) -> str:
    src = scenario.model
    if src.forge is not None:
        try:
            return str(forge.forge(scenario.name, src.forge))
        except Exception as exc:  # noqa: BLE001 - any forge failure makes the model unavailable
            raise ModelUnavailable(f"scenario {scenario.name}: forging the checkpoint failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
    if src.gguf is not None:
        try:
            return str(convert.convert(scenario.name, src.gguf))
        except Exception as exc:  # noqa: BLE001
            raise ModelUnavailable(f"scenario {scenario.name}: converting {src.gguf.file} from "
                                   f"{src.gguf.package} failed: {type(exc).__name__}: {exc}") from exc
    if src.path is not None:
        path = Path(src.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not (path / "config.json").is_file() and not path.is_file():
            raise ModelUnavailable(f"scenario {scenario.name}: model path {path} has no config.json")
        return str(path)
    return _cached_hf(scenario.name, src.hf)


def _cached_hf(name: str, repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover
        raise ModelUnavailable(f"scenario {name}: huggingface_hub is not installed") from exc
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ModelUnavailable(
            f"scenario {name}: {repo_id} is not in the local Hugging Face cache and servematrix "
            "never downloads at run time; fetch it beforehand (huggingface-cli download) or use a path"
        ) from None
