"""Matrix files: scenarios × axes (tp, pp, quant, vllm, device) with include/exclude, tags and
expected outcomes. `load_matrix` validates a file completely (every scenario it names is loaded
too) and `expand` turns it into a list of concrete, stably named entries.

What a file may say is matrix_spec.py and the expansion into entries is expand.py; Entry and
Expectation are importable from here, where most code meets them.
"""

from __future__ import annotations

import re
from pathlib import Path

from servematrix.config.power import detectable, needed_n, paired_mde, uninformative
from servematrix.config.references import References
from servematrix.config import plan
from servematrix.config.expand import expand
from servematrix.config.matrix_spec import Entry, Expectation, MatrixFile
from servematrix.config.scenario import MAX_NAME, NAME_RE, Scenario, ScenarioStore
from servematrix.config.yamlio import ConfigError, Located, is_file, load_yaml, not_a_file, validate
from servematrix.errors import UserError
from servematrix.paths import GSM8K_TEST_ROWS

__all__ = ["Entry", "Expectation", "Matrix", "load_matrix", "validate_files"]


class Matrix:
    """A validated matrix file with its scenarios loaded and its entries expanded."""

    def __init__(self, path: Path, spec: MatrixFile, store: ScenarioStore, entries: list[Entry],
                 references: References | None = None, located: Located | None = None):
        self.path, self.spec, self.store, self.entries = path, spec, store, entries
        self.references = references or References([], [])
        self._located = located

    def gsm8k_limit(self, scenario: Scenario, override: int | None = None) -> int | None:
        return plan.gsm8k_limit(override, self.spec.gsm8k.limit, scenario.gsm8k.limit)

    def check_power(self, override: int | None = None, entries: list[Entry] | None = None) -> None:
        """Refuse a gsm8k limit too small for an accuracy check to detect the effect it claims
        (at load: the file's own limits over every entry; with --limit: over the selected ones),
        and a check that no outcome at that n could fail (or pass) against its reference."""
        for e, scn, limit, i, check, ref in self.judged_checks(override, entries):
            why = uninformative(check, ref, limit) if ref is not None else None
            if why is not None:
                at = f" (with --limit {override})" if override is not None else ""
                raise load_yaml(self.store.path(e.scenario)).error(("accuracy", "checks", i), f"{e.id}{at}: {why}")
            need = needed_n(check, ref)
            if limit < need:
                msg = (f"{e.id}: gsm8k limit {limit} cannot detect a {check.effect} change of {check.metric} "
                       f"at alpha={check.alpha}, beta={check.beta}: it needs n >= {need}")
                if override is not None or self._located is None or self.spec.gsm8k.limit is None:
                    where = self.store.path(e.scenario) if override is None else "--limit"
                    raise ConfigError(where, None, "gsm8k.limit", msg)
                raise self._located.error(("gsm8k", "limit"), msg)

    def power_lines(self) -> list[str]:
        """Per entry and check, the smallest effect it detects at α and β with the entry's n, and
        for a layout the paired test against its baseline over the same questions."""
        base_of = plan.baselines(self.scenario, self.entries)
        out = []
        for e, scn, n, i, check, ref in self.judged_checks():
            base = base_of.get(e.id)
            if check.metric == "gsm8k.agreement" and base == e.id:
                continue  # agreement is a layout's, with its baseline: never judged on the baseline
            line = f"{e.id} {check.metric}: {detectable(check, ref, n)}"
            if base is not None and base != e.id:
                line += f"; paired with {base} over the same {n} questions"
                if ref is not None and ref.paired_sigma is not None:
                    line += f", MDE {paired_mde(check, ref.paired_sigma, n):.4g}"
                else:
                    line += " (MDE once a reference records their spread)"
            out.append(line)
        return out

    def judged_checks(self, override: int | None = None, entries: list[Entry] | None = None):
        """(entry, scenario, n, index, check, reference) for every check gsm8k will judge."""
        for e in self.entries if entries is None else entries:
            scn = self.scenario(e.scenario)
            if not scn.gsm8k.enabled or not self.spec.gsm8k.enabled:
                continue
            limit = self.gsm8k_limit(scn, override) or GSM8K_TEST_ROWS
            for i, check in enumerate(scn.accuracy.checks):
                yield e, scn, limit, i, check, self.references.find(check.metric, e.scenario, e.quant, e.tp, e.pp,
                                                                     e.device, None)

    def scenario(self, name: str) -> Scenario:
        return self.store.get(name)


def load_matrix(path: Path | str) -> Matrix:
    located = load_yaml(path)
    try:
        spec = validate(located, MatrixFile)
    except ConfigError:
        _remember_named_credentials(located)
        raise
    store = ScenarioStore((located.path.parent / spec.scenario_dir).resolve())
    for i, name in enumerate(spec.scenarios):
        _require_scenario(located, store, name, ("scenarios", i))
    for i, inc in enumerate(spec.include):
        _require_scenario(located, store, inc.scenario, ("include", i, "scenario"))
    entries = expand(located, spec, store)
    references = References.load((located.path.parent / spec.references_dir).resolve())
    matrix = Matrix(located.path, spec, store, entries, references, located)
    matrix.check_power()
    return matrix


def _remember_named_credentials(located: Located) -> None:
    """Before a matrix's own error is printed: the credentials of the scenarios it names, registered
    with redact as reading them would (config/scenario.py), so that one of them the error quotes (a
    token pasted into a wrong field, `got '...'`, or as a key) is masked like everywhere else. The
    names come from the raw data, since the file did not validate; whatever cannot be read is left."""
    data = located.data if isinstance(located.data, dict) else {}
    directory = data.get("scenario_dir", MatrixFile.model_fields["scenario_dir"].default)
    names = [*(data.get("scenarios") or [])] if isinstance(data.get("scenarios"), list) else []
    names += [i.get("scenario") for i in data.get("include") or [] if isinstance(i, dict)] \
        if isinstance(data.get("include"), list) else []
    if not isinstance(directory, str):
        return
    try:
        store = ScenarioStore((located.path.parent / directory).resolve())
    except (OSError, ValueError):
        return
    for name in names:
        if isinstance(name, str) and len(name) <= MAX_NAME and re.fullmatch(NAME_RE, name):  # never a path
            try:
                store.get(name)  # registers its credentials as it reads them
            except (KeyError, UserError, OSError, ValueError):
                continue


def _require_scenario(located: Located, store: ScenarioStore, name: str, loc) -> Scenario:
    try:
        return store.get(name)
    except KeyError:
        known = ", ".join(store.names()) or "none"
        raise located.error(loc, f"unknown scenario {name!r}: no {store.path(name)} (known: {known})") from None


def validate_files(paths: list[Path]) -> list[Matrix]:
    """Load every file, raising the first ConfigError (file:line: field: problem)."""
    out = []
    for p in paths:
        if not is_file(Path(p)):
            raise ConfigError(p, None, None, not_a_file(Path(p)) or "no such matrix file")
        out.append(load_matrix(p))
    return out
