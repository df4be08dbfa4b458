"""Compare: the judgements that need two scenarios' results — greedy parity of a layout with its
scenario's baseline layout (smoke outputs, like vLLM's check_logprobs_close) and agreement of their
gsm8k answers. Made from the two records once both exist, so no scenario waits for another while
it runs and the dispatcher can pack them freely. Compare only adds results and, where one fails,
the failure; the verdict is decided after it, once (verdict.judge)."""

from __future__ import annotations

from collections.abc import Callable

from servematrix.check import accuracy
from servematrix.check import gsm8k
from servematrix.check.smoke import parity
from servematrix.config.references import Reference
from servematrix.config.scenario import Scenario
from servematrix.record import CheckResult, EntryOutcome, Failure, LoadParity, ScenarioRecord

AGREEMENT = "gsm8k.agreement"


def compare(rec: EntryOutcome, base: ScenarioRecord, scenario: Scenario,
            reference: Callable[[str], Reference | None]) -> EntryOutcome:
    """`rec` judged against its baseline's record `base`; returns the updated outcome."""
    update: dict = {}
    failure = rec.failure
    par = _parity(rec, base, scenario)
    if par is not None:
        update["smoke"] = rec.smoke.model_copy(update={"parity": par, "ok": rec.smoke.ok and par.ok})
        if not par.ok and failure is None:
            failure = Failure.of("check", f"parity with {base.id}: {par.details[0]}"[:400], "smoke")
    load_par = _load_parity(rec, base, scenario)
    if load_par is not None:
        update["load_check"] = rec.load_check.model_copy(update={"parity": load_par})
        if not load_par.ok and failure is None:
            failure = Failure.of("check", f"load parity with {base.id}: {load_par.details[0]}"[:400], "load")
    agreement = _agreement(rec, base, scenario)
    if agreement is not None:
        metrics = {**rec.metrics, AGREEMENT: agreement}
        checks = [accuracy.judge(c, agreement, reference(c.metric)) if c.metric == AGREEMENT else r
                  for c, r in _paired(scenario, rec.accuracy)]
        update.update(metrics=metrics, accuracy=checks)
        failed = [r for r in checks if r.metric == AGREEMENT and r.status == "fail"]
        if failed and failure is None:
            failure = Failure.of("check", failed[0].summary()[:400], "accuracy")
    if not update:
        return rec
    return rec.model_copy(update={**update, "failure": failure})


def _parity(rec: EntryOutcome, base: ScenarioRecord, scenario: Scenario):
    if not scenario.smoke.parity.enabled or rec.smoke is None or rec.smoke.error or not rec.smoke.prompts:
        return None
    if base.smoke is None or not base.smoke.ok:
        return None  # a baseline that failed its own smoke is no reference for greedy outputs
    generations = {p.name: p.generation for p in base.smoke.prompts if p.generation}
    return parity(rec.smoke.prompts, generations, base.id)


def _load_parity(rec: EntryOutcome, base: ScenarioRecord, scenario: Scenario):
    if not scenario.smoke.parity.enabled or rec.tp != base.tp:
        return None  # TP shards differ by design; PP only places whole layers
    if rec.load_check is None or base.load_check is None or not (rec.load_check.ok and base.load_check.ok):
        return None
    return load_parity(rec.load_check.digests, base.load_check.digests, base.id)


def _agreement(rec: EntryOutcome, base: ScenarioRecord, scenario: Scenario):
    if not scenario.gsm8k.agreement or rec.gsm8k is None or base.gsm8k is None:
        return None
    if not (rec.gsm8k.samples_path and base.gsm8k.samples_path):
        return None
    return accuracy.agreement_metric(gsm8k.answers(rec.gsm8k.samples_path), gsm8k.answers(base.gsm8k.samples_path))


def _paired(scenario: Scenario, results: list[CheckResult]):
    """The scenario's checks beside the results the record already has (same order)."""
    by_metric = {r.metric: r for r in results}
    return [(c, by_metric.get(c.metric)) for c in scenario.accuracy.checks if c.metric in by_metric]


def load_parity(digests: dict[str, str], baseline: dict[str, str], baseline_id: str, limit: int = 5) -> LoadParity:
    """Same parameters, bit for bit, as the baseline layout loaded (both loaded completely; the
    layouts must shard alike, i.e. the same TP: PP only places whole layers)."""
    details = [f"{n}: not loaded (baseline has it)" for n in sorted(baseline.keys() - digests.keys())]
    details += [f"{n}: loaded here, not in the baseline" for n in sorted(digests.keys() - baseline.keys())]
    details += [f"{n}: {digests[n]} != baseline {baseline[n]}" for n in sorted(digests.keys() & baseline.keys())
                if digests[n] != baseline[n]]
    return LoadParity(baseline=baseline_id, ok=not details, details=details[:limit])
