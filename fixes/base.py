"""What every fix module provides."""

from __future__ import annotations

from typing import Literal

State = Literal["bug", "fixed", "n/a"]


class Fix:
    name: str = ""
    pr: str | None = None  # the upstream PR it backports
    architectures: tuple[str, ...] = ()
    summary: str = ""

    def detect(self) -> tuple[State, str]:
        """From vLLM's own code: does this vLLM have the bug ("bug"), already the fix ("fixed"),
        or nothing this fix touches ("n/a")? With a reason."""
        raise NotImplementedError

    def apply(self) -> None:
        """Patch vLLM in this process. Must be idempotent (vLLM may load plugins more than once)."""
        raise NotImplementedError
