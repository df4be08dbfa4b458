"""Signals of a run: SIGTERM and Ctrl-C both end it as "interrupted" (raised as KeyboardInterrupt
where the run is, so every server on the way is torn down)."""

from __future__ import annotations

import signal


class interrupts:
    """SIGTERM raises KeyboardInterrupt, and Ctrl-C does even when the process was started with
    SIGINT ignored (a shell's background job: Python then installs no handler of its own); the
    previous handlers come back after. `reinstall()` again after ray.init, which installs its own."""

    def __enter__(self) -> "interrupts":
        self._term, self._int = reinstall()
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._term)
        signal.signal(signal.SIGINT, self._int)


def reinstall() -> tuple:
    """Install both handlers; the ones they replace."""
    return (signal.signal(signal.SIGTERM, raise_interrupt),
            signal.signal(signal.SIGINT, signal.default_int_handler))


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
