"""Plan: every rule that says which setting wins, decided here once. A setting given on the command
line beats the matrix file's, which beats the scenario's; a layout is compared with one baseline
entry; `--backend` names both who dispatches (this host or a Ray cluster) and what kind of server
each job starts. Everything else asks these functions instead of deciding again."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from servematrix.config.matrix_spec import Entry
from servematrix.config.scenario import Scenario

T = TypeVar("T")

# --backend -> (dispatcher, server kind): Ray places jobs on its nodes; each starts local processes
BACKENDS: dict[str, tuple[str, str]] = {
    "local": ("local", "local"),
    "docker": ("local", "docker"),
    "ray": ("ray", "local"),
}


def first(*values: T | None) -> T | None:
    """The most specific setting given: command line, then matrix, then scenario."""
    return next((v for v in values if v is not None), None)


def gsm8k_limit(cli: int | None, matrix: int | None, scenario: int | None) -> int | None:
    """Questions gsm8k asks (None: the whole test set)."""
    return first(cli, matrix, scenario)


def startup_timeout(cli: float | None, matrix: float | None, scenario: Scenario) -> float:
    return first(cli, matrix, scenario.server.startup_timeout)


def gsm8k_runs(cli: bool, matrix: bool, scenario: Scenario) -> bool:
    """gsm8k runs unless the command line (--no-gsm8k), the matrix or the scenario turns it off."""
    return cli and matrix and scenario.gsm8k.enabled


def dispatch(backend: str) -> tuple[str, str]:
    """(dispatcher, server kind) of a --backend value."""
    return BACKENDS[backend]


# --- baselines: the layout every other layout of a scenario is compared with ----------------------
def _baseline_key(entry: Entry, scenario: Scenario) -> tuple:
    par = scenario.smoke.parity
    return (entry.scenario, entry.vllm, entry.device, par.baseline_tp, par.baseline_pp,
            par.baseline_quant or scenario.default_quant)


def is_baseline(entry: Entry, scenario: Scenario) -> bool:
    """This entry has the layout its scenario's other layouts are compared with."""
    return (entry.tp, entry.pp, entry.quant) == _baseline_key(entry, scenario)[-3:]


def baseline_id(entry: Entry, scenario: Scenario, entries: list[Entry]) -> str | None:
    """The selected entry this one's parity/agreement compare with (itself for a baseline; None if
    none was selected): a baseline layout expected to pass before one expected to fail (an xfail
    reproduction is the reference only when it is the only one selected), then the one sharing the
    most fix modules with it, then the first listed."""
    if is_baseline(entry, scenario):
        return entry.id
    key = _baseline_key(entry, scenario)
    candidates = [(i, e) for i, e in enumerate(entries)
                  if e.scenario == entry.scenario and is_baseline(e, scenario) and _baseline_key(e, scenario) == key]
    ranked = sorted(candidates, key=lambda c: (c[1].expectation.expect != "pass",
                                               -len(set(c[1].fixes) & set(entry.fixes)), c[0]))
    return ranked[0][1].id if ranked else None


def baselines(scenario_of: Callable[[str], Scenario], entries: list[Entry]) -> dict[str, str | None]:
    """Entry id -> the id of its baseline among `entries` (see baseline_id)."""
    return {e.id: baseline_id(e, scenario_of(e.scenario), entries) for e in entries}
