"""Sweep cells: one architecture under one layout and quantization on one release, with an id that
reads like a run id, `<key>/<layout>-<quant>[-<release>]` (the key: a generative architecture's
model_type, else the architecture's name, pooling ones included: registry.Arch.key), and `-k` selection exactly as
`run -k` selects entries (config.expand.select: substring, glob, `tag:NAME`, comma = or)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from servematrix.errors import ArgumentError
from servematrix.serve.envs import CURRENT
from servematrix.sweep.registry import Arch

LAYOUTS = ("tp1", "tp2", "pp2", "tp2pp2")
# ASCII digits, the whole name: \d also takes '٢' (which int() reads as 2), and $ a trailing newline
_LAYOUT = re.compile(r"(?:tp(?P<tp>[1-9][0-9]?))?(?:pp(?P<pp>[1-9][0-9]?))?")


class Layout(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    tp: int
    pp: int


def layout(name: str) -> Layout:
    """`tp2`, `pp2`, `tp2pp2`, … (TP and PP up to 99; an absent one is 1)."""
    m = _LAYOUT.fullmatch(name)
    if not name or not m:
        raise ArgumentError("--layouts", f"{name!r} is not a layout: tp<T>, pp<P> or tp<T>pp<P> (e.g. {','.join(LAYOUTS)})")
    return Layout(name=name, tp=int(m["tp"] or 1), pp=int(m["pp"] or 1))


def layouts(text: str) -> list[Layout]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ArgumentError("--layouts", "at least one layout")
    return list({layout(n).name: layout(n) for n in names}.values())


def quants(text: str) -> list[str]:
    """`none` and the layouts data/sweep-quants.yaml defines (fp8-block, fp8-kv, awq, gptq; nvfp4: not yet)."""
    from servematrix.sweep.quant import names as known

    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in known()]
    if not names or bad:
        raise ArgumentError("--quant", f"{', '.join(bad) or 'nothing'}: this sweep checks {', '.join(known())}")
    return names


class Cell(BaseModel):
    """One architecture × layout × quantization × release."""

    model_config = ConfigDict(frozen=True)

    arch: Arch
    layout: Layout
    quant: str
    release: str = CURRENT
    tags: list[str] = Field(default_factory=list)

    @property
    def id(self) -> str:
        suffix = "" if self.release == CURRENT else f"-{self.release}"
        return f"{self.arch.key}/{self.layout.name}-{self.quant}{suffix}"

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp


def cells(archs: list[Arch], lays: list[Layout], qs: list[str], releases: list[str]) -> list[Cell]:
    """Every cell, releases outermost (a release's cells share its persistent worker), then
    architectures, quantizations and layouts."""
    out = []
    for rel in releases:
        for a in archs:
            tags = [a.kind, a.arch] + ([a.model_type] if a.model_type else []) + (["pooling"] if a.pooling else []) + \
                   (["draft"] if a.draft else []) + (["native"] if a.native else []) + \
                   (["forgeable"] if a.forgeable else ["not-checkable"])
            out += [Cell(arch=a, layout=lay, quant=q, release=rel, tags=tags) for q in qs for lay in lays]
    return out


def select(all_cells: list[Cell], pattern: str | None) -> list[Cell]:
    """`-k`, as `run -k`: the very function run uses (it reads only `.id` and `.tags`)."""
    from servematrix.config.expand import select as select_entries

    return select_entries(all_cells, pattern)  # type: ignore[arg-type] - duck-typed on id and tags
