"""Embedding smoke: a pooling model's /v1/embeddings through the `openai` client, the scenario's
expectations on the vectors (dimension, unit norm, which pairs are closer), and parity of each
input's vector with the baseline layout's.

Parity is judged like vLLM's own `check_embeddings_close` (tests/models/utils.py): per input the
two vectors must have the same length and a cosine similarity of at least 1 - tol (tol 1e-3 there;
`min_cosine` in the scenario). A sharding bug that loads fine but computes wrong moves vectors far
more than that; float32 reductions split over TP ranks move them by ~1e-7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from servematrix.config.embedding_spec import EmbeddingSmoke
from servematrix.config.scenario import Scenario, SmokeSpec
from servematrix.record import (EmbeddingResult, EmbeddingVector, EntryOutcome, Failure, ParityResult,
                                ScenarioRecord)

NORM_TOLERANCE = 1e-3  # |norm - 1| a normalizing model may show (float32 gives ~1e-7)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; NaN when either vector is zero (no direction: no similarity to claim)."""
    na, nb = math.sqrt(math.fsum(x * x for x in a)), math.sqrt(math.fsum(y * y for y in b))
    if na == 0 or nb == 0:
        return math.nan
    return math.fsum(x * y for x, y in zip(a, b)) / (na * nb)


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def vectors_of(spec: EmbeddingSmoke, data: list[list[float]]) -> list[EmbeddingVector]:
    """The response's vectors named by the inputs they embed (the response keeps the input order)."""
    return [EmbeddingVector(name=x.name, dimension=len(v), norm=math.sqrt(math.fsum(c * c for c in v)),
                            vector=list(v))
            for x, v in zip(spec.inputs, data)]


def judge(spec: EmbeddingSmoke, vectors: list[EmbeddingVector]) -> tuple[dict[str, float], list[str]]:
    """The cosines the expectations compare and the expectations the vectors do not meet."""
    problems = []
    if len(vectors) != len(spec.inputs):
        problems.append(f"expected {len(spec.inputs)} vectors, got {len(vectors)}")
    for v in vectors:
        if not all(math.isfinite(c) for c in v.vector):
            problems.append(f"{v.name}: vector has non-finite values")
        elif spec.dimension is not None and v.dimension != spec.dimension:
            problems.append(f"{v.name}: dimension {v.dimension}, expected {spec.dimension}")
        elif spec.normalized and abs(v.norm - 1) > NORM_TOLERANCE:
            problems.append(f"{v.name}: norm {v.norm:.6f}, expected unit norm (±{NORM_TOLERANCE})")
    by_name = {v.name: v.vector for v in vectors}
    cosines: dict[str, float] = {}
    for c in spec.closer:
        for a, b in (c.pair, c.than):
            if a in by_name and b in by_name:
                cosines[pair_key(a, b)] = cosine(by_name[a], by_name[b])
        near, far = cosines.get(pair_key(*c.pair)), cosines.get(pair_key(*c.than))
        if near is None or far is None:
            continue  # already said: a vector is missing
        if not near > far:  # NaN (a zero vector) fails too
            problems.append(f"expected cos({', '.join(c.pair)}) = {near:.4f} > cos({', '.join(c.than)}) = {far:.4f}")
    return cosines, problems


def run_embedding_smoke(base_url: str, model: str, spec: SmokeSpec) -> EmbeddingResult:
    """Every input in one /v1/embeddings request, judged; parity is compared() afterwards."""
    import openai  # paid by the process that sends requests, not by every reader of records

    emb = spec.embedding
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="servematrix",
                           timeout=spec.request_timeout, max_retries=0)
    try:
        # float, not the client's default base64: the JSON numbers are what the record keeps
        r = client.embeddings.create(model=model, input=[x.text for x in emb.inputs], encoding_format="float")
    except (openai.APIError, openai.APIConnectionError) as exc:
        return EmbeddingResult(ok=False, error=f"embeddings request failed: {exc}")
    data = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
    vectors = vectors_of(emb, data)
    cosines, problems = judge(emb, vectors)
    return EmbeddingResult(ok=not problems, vectors=vectors, cosines=cosines, problems=problems)


def embedding_failure(result: EmbeddingResult) -> Failure | None:
    """The failure an embedding result stands for: a transport error (the pipeline first asks
    whether the server died), else its first problem or parity's."""
    if result.error:
        return Failure.of("exception", result.error[:400], "smoke")
    if result.ok:
        return None
    problems = list(result.problems)
    if result.parity is not None and not result.parity.ok:
        problems += [f"embedding parity with {result.parity.baseline}: {d}" for d in result.parity.details]
    return Failure.of("check", problems[0][:400] if problems else "embedding smoke failed", "smoke")


def embeddings_close(vectors: list[EmbeddingVector], baseline: list[EmbeddingVector], baseline_id: str,
                     min_cosine: float) -> tuple[ParityResult, dict[str, float]]:
    """vLLM's check_embeddings_close over the inputs by name: the parity result and each input's
    cosine with the baseline's vector."""
    base = {v.name: v for v in baseline}
    details, cosines = [], {}
    for v in vectors:
        b = base.get(v.name)
        if b is None:
            details.append(f"{v.name}: no baseline vector to compare")
        elif v.dimension != b.dimension:
            details.append(f"{v.name}: dimension {v.dimension} vs baseline {b.dimension}")
        else:
            cosines[v.name] = sim = cosine(v.vector, b.vector)
            if not sim >= min_cosine:
                details.append(f"{v.name}: cosine with baseline {sim:.6f} < {min_cosine}")
    if not vectors:
        details.append("no vectors to compare")
    return ParityResult(ok=not details, baseline=baseline_id, details=details), cosines


def compared(rec: EntryOutcome, base: ScenarioRecord, scenario: Scenario,
             failure: Failure | None) -> tuple[dict, Failure | None]:
    """compare.compare's hook: the record fields embedding parity sets on `rec` (none when there is
    nothing to compare) and the entry's failure after it (an earlier one stays the deciding one)."""
    spec = scenario.smoke.embedding
    mine, theirs = rec.embedding, base.embedding
    if spec is None or not scenario.smoke.parity.enabled or mine is None or mine.error or not mine.vectors:
        return {}, failure
    if theirs is None or not theirs.ok:
        return {}, failure  # a baseline that failed its own smoke is no reference
    par, cosines = embeddings_close(mine.vectors, theirs.vectors, base.id, spec.min_cosine)
    update = {"parity": par, "parity_cosines": cosines, "ok": mine.ok and par.ok}
    if not par.ok and failure is None:
        failure = Failure.of("check", f"embedding parity with {base.id}: {par.details[0]}"[:400], "smoke")
    return {"embedding": mine.model_copy(update=update)}, failure
