"""The embedding form of a scenario's smoke section: inputs sent to /v1/embeddings by a pooling
model's server and what their vectors must show. Apart from scenario.py only to keep that module
short; scenario.SmokeSpec holds it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from servematrix.config.yamlio import field_error

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)]  # scenario.Name
MAX_TEXT = 32_768  # characters of one input (the model truncates to its own window anyway)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def first_duplicate(names: list[str]) -> int | None:
    """The index of the first name seen before (parity pairs results with the baseline's by name)."""
    return next((i for i, n in enumerate(names) if n in names[:i]), None)


class EmbedInput(_Strict):
    name: Name
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]


class CloserPair(_Strict):
    """cosine(pair) must exceed cosine(than): e.g. a paraphrase pair closer than an unrelated one."""

    pair: tuple[Name, Name]
    than: tuple[Name, Name]


class EmbeddingSmoke(_Strict):
    """/v1/embeddings smoke (a pooling model): every input embedded in one request, judged by the
    vector's dimension, its norm and the ordering of cosine similarities; parity with the baseline
    layout per input like vLLM's check_embeddings_close (cosine >= 1 - 1e-3)."""

    inputs: list[EmbedInput] = Field(min_length=2, max_length=256)
    dimension: int | None = Field(None, strict=True, ge=1, le=1 << 20)
    normalized: bool = False  # the model ends in a Normalize module: every vector has unit norm
    closer: list[CloserPair] = Field(default_factory=list)
    min_cosine: float = Field(0.999, strict=True, ge=0.5, le=1, allow_inf_nan=False)  # parity, per input

    @model_validator(mode="after")
    def _names(self) -> "EmbeddingSmoke":
        names = [x.name for x in self.inputs]
        if (i := first_duplicate(names)) is not None:
            raise field_error(("inputs", i, "name"), f"duplicate input name {names[i]!r}")
        for i, c in enumerate(self.closer):
            for side in ("pair", "than"):
                if unknown := [n for n in getattr(c, side) if n not in names]:
                    raise field_error(("closer", i, side), f"no input named {unknown[0]!r} (inputs: {', '.join(names)})")
        return self
