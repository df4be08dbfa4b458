"""Part of the record (servematrix/record.py re-exports it; split off to keep that module small):
what a gsm8k result was measured with (its protocol fingerprint), its per-question outcomes, and a
layout's paired test against its baseline. Imports no stage, like record.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Protocol(BaseModel):
    """What a gsm8k number was measured with: two numbers compare only when these are equal (a
    different slice, few-shot set, prompt, generation setting, seed, tokenizer or harness measures
    something else). Written by check.gsm8k on every result; references carry the one they were
    recorded with."""

    dataset: str  # sha256 of the test split's file (first 16 hex digits)
    question_ids: str  # the documents asked, as ranges: "0-23"
    n: int
    fewshot_ids: list[str]  # sha256[:8] of each exemplar's question, in prompt order
    template: str  # sha256[:16] of the task (prompt, delimiters, filters, metric) without local paths
    max_gen_toks: int
    temperature: float | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int
    tokenizer: str | None = None  # sha256[:16] of the checkpoint's tokenizer files (None: not read)
    lm_eval: str | None = None
    servematrix: str

    def differences(self, other: "Protocol") -> list[str]:
        """`field a → b` for every field that differs (empty: the two are comparable)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{k} {_short(mine[k])} → {_short(theirs[k])}" for k in mine if mine[k] != theirs[k]]


def _short(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def protocol_note(mine: Protocol | None, theirs: Protocol | None, what: str) -> str | None:
    """Why a number measured under `mine` cannot be compared with `what`'s (under `theirs`), or
    None when it can. A side without a fingerprint (written before fingerprints) is compared as
    before and said so by the caller; only two different fingerprints are refused."""
    if mine is None or theirs is None:
        return None
    diff = theirs.differences(mine)  # theirs → mine: the reference's (or baseline's) value first
    return f"not comparable with {what}: " + "; ".join(diff) if diff else None


class QuestionResult(BaseModel):
    """One gsm8k question: the extracted answer, its correctness under both filters, and the gold
    answer's per-token NLL (None without the NLL task). Kept per question so a layout can be
    tested against its baseline on the same questions (paired tests, check.compare)."""

    doc_id: int
    answer: str = ""  # flexible-extract
    strict: bool = False
    flexible: bool = False
    nll: float | None = None



class PairedResult(BaseModel):
    """A layout against its baseline on the same questions: McNemar's exact test on the
    discordant pairs of a 0/1 outcome, or a one-sided paired t-test on per-question values."""

    test: Literal["mcnemar", "ttest_rel"]
    baseline: str
    n: int  # questions both answered
    worse: int | None = None  # mcnemar: baseline right, layout wrong
    better: int | None = None  # mcnemar: baseline wrong, layout right
    shift: float  # mean per-question change, in the worse direction (layout - baseline for NLL)
    sigma: float  # per-question spread of the differences (mcnemar: √ of the flip rate, Laplace's rule)
    tolerance: float = 0.0
    p_value: float
    mde: float  # the smallest shift this n detects at α with power 1-β (normal approximation)
    needed_n: int  # questions the paired test needs to detect the check's effect
    status: Literal["pass", "fail"]

    def summary(self) -> str:
        what = (f"{self.worse} worse / {self.better} better of {self.n}" if self.test == "mcnemar"
                else f"shift {self.shift:+.4g} (sd {self.sigma:.3g}, tolerance {self.tolerance:g}, n={self.n})")
        return (f"paired vs {self.baseline} ({self.test}): {what}; MDE {self.mde:.4g}; p={self.p_value:.3g}; "
                f"needs n >= {self.needed_n} → {self.status}")
