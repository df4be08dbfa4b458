"""Compare: the judgements that need two scenarios' results — greedy parity of a layout with its
scenario's baseline layout (smoke outputs, like vLLM's check_logprobs_close), agreement of their
gsm8k answers and the paired tests of each accuracy check over the questions both answered
(check.accuracy.paired). Made from the two records once both exist, so no scenario waits for another while
it runs and the dispatcher can pack them freely. Compare only adds results and, where one fails,
the failure; the verdict is decided after it, once (verdict.judge)."""

from __future__ import annotations

from collections.abc import Callable

from servematrix.check import accuracy
from servematrix.check import embedding
from servematrix.check import gsm8k
from servematrix.check.smoke import parity
from servematrix.config.references import Reference
from servematrix.config.scenario import Scenario
from servematrix.record import CheckResult, EntryOutcome, Failure, LoadParity, ScenarioRecord
from servematrix.record_gsm8k import protocol_note

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
    embedded, failure = embedding.compared(rec, base, scenario, failure)  # a pooling model's vectors
    update.update(embedded)
    agreement = _agreement(rec, base, scenario)
    pairs, unpaired = _paired_tests(rec, base, scenario)
    if agreement is not None or pairs or unpaired:
        protocol = rec.gsm8k.protocol if rec.gsm8k else None
        before = _beside(scenario, rec.accuracy)
        checks = []
        for c, r in before:
            if c.metric == AGREEMENT and agreement is not None:
                r = accuracy.judge(c, agreement, reference(c.metric), protocol)
            if unpaired:
                r = r.model_copy(update={"note": "; ".join(x for x in (r.note, f"paired: {unpaired}") if x)})
            checks.append(accuracy.with_paired(r, pairs.get(c.metric)))
        update["accuracy"] = checks
        if agreement is not None:
            update["metrics"] = {**rec.metrics, AGREEMENT: agreement}
        # a check this comparison failed (agreement, or a paired test) is the failure, if none was yet
        failed = [r for r, (_, old) in zip(checks, before) if r.status == "fail" and old.status != "fail"]
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
    if rec.gsm8k.questions and base.gsm8k.questions:
        return accuracy.agreement_metric({q.doc_id: q.answer for q in rec.gsm8k.questions},
                                         {q.doc_id: q.answer for q in base.gsm8k.questions})
    if not (rec.gsm8k.samples_path and base.gsm8k.samples_path):
        return None  # a record written before per-question results: its samples, where kept
    return accuracy.agreement_metric(gsm8k.answers(rec.gsm8k.samples_path), gsm8k.answers(base.gsm8k.samples_path))


def _paired_tests(rec: EntryOutcome, base: ScenarioRecord, scenario: Scenario) -> tuple[dict, str | None]:
    """metric -> the paired test of the layout's check against its baseline's per-question
    outcomes; and why none was made when both sides have them but measured differently."""
    if rec.gsm8k is None or base.gsm8k is None or not (rec.gsm8k.questions and base.gsm8k.questions):
        return {}, None
    differs = protocol_note(rec.gsm8k.protocol, base.gsm8k.protocol, base.id)
    if differs is not None:
        return {}, differs
    out = {}
    for c in scenario.accuracy.checks:
        pair = accuracy.paired(c, rec.gsm8k.questions, base.gsm8k.questions, base.id)
        if pair is not None:
            out[c.metric] = pair
    return out, None


def _beside(scenario: Scenario, results: list[CheckResult]):
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
