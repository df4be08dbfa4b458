"""The sweep over several worlds at once (`--backend ray`): cells handed to whichever world is free,
the most expensive first, each outcome judged and published the moment its cell ends; a world lost mid-cell
(its actor or node gone) costs only that cell, which is retried once on another world and recorded
as an infrastructure failure if its second world is lost too.

The scheduling is here, apart from Ray: a world is anything `run(cell, world)` can use, and a
lost one is `ActorLost` raised out of `run`, so the unit tests drive it with a scripted double.
The local backend never comes here: one world per release, cells in order (runner.SweepWork's
local pool, dispatch.LocalPool).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from servematrix.serve.world import ActorLost

POLL = 0.2  # s between looks for a finished cell (the main thread stays where Ctrl-C lands)
_REPLACED = object()  # what a replacement thread hands back in place of an outcome


def by_cost(cells: list, releases: list[str]) -> list:
    """Release by release (a world that changes release restarts vLLM's import), and within one the
    widest layout first (TP×PP ranks: the cheap estimate of a load check's time we have)."""
    rank = {r: i for i, r in enumerate(releases)}
    return sorted(cells, key=lambda c: (rank.get(c.release, len(rank)), -c.tp * c.pp))


def spread(cells: list, worlds: list, run: Callable[[Any, Any, int], Any],
           publish: Callable[[Any, Any], bool], lost: Callable[[Any, Any, str], Any],
           interrupted: Callable[[Any, Any], Any], replace: Callable[[Any], Any | None] = lambda w: None,
           retried: Callable[[Any, str], None] = lambda cell, why: None) -> None:
    """Run `cells` (in the order given: by_cost's) over `worlds`, one cell per world at a time.

    run(cell, world, attempt) -> its outcome, or ActorLost; publish(cell, outcome) -> False to start
    nothing more (the cell was interrupted); lost(cell, world, why) -> the outcome of a cell whose
    second world was lost too (world None: no world was left for it); interrupted(cell, world) ->
    the outcome of a cell in flight at Ctrl-C; replace(world) -> a new world in place of a lost one, or None (its node is
    gone: the others carry on); retried(cell, why) hears each retry. Ctrl-C: the cells in flight
    are published as interrupted and KeyboardInterrupt goes on up (the caller stops the worlds)."""
    pending, free = deque(cells), list(worlds)
    running: dict[int, tuple[Any, Any, int]] = {}  # id(world) -> (world, cell, attempt)
    first_loss: dict[int, str] = {}  # id(cell) -> why its first world was lost
    done: queue.Queue = queue.Queue()
    stop = False
    replacing = 0  # replacements being placed (a new actor may wait for its slot: never in this thread)

    def work(world, cell, attempt: int) -> None:
        try:
            done.put((world, run(cell, world, attempt), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which decides
            done.put((world, None, exc))

    def renew(world) -> None:
        try:
            done.put((replace(world), _REPLACED, None))
        except Exception:  # noqa: BLE001 - no replacement: the other worlds carry on
            done.put((None, _REPLACED, None))

    try:
        while True:
            while free and pending and not stop:
                world, cell = free.pop(0), pending.popleft()
                attempt = 2 if id(cell) in first_loss else 1
                running[id(world)] = (world, cell, attempt)
                threading.Thread(target=work, args=(world, cell, attempt), daemon=True,
                                 name=f"cell {getattr(cell, 'id', cell)}").start()
            if not running and not (replacing and pending and not stop):
                break
            try:
                world, outcome, exc = done.get(timeout=POLL)
            except queue.Empty:
                continue
            if outcome is _REPLACED:
                replacing -= 1
                if world is not None:
                    free.append(world)
                continue
            _, cell, attempt = running.pop(id(world))
            if isinstance(exc, ActorLost):
                replacing += 1
                threading.Thread(target=renew, args=(world,), daemon=True, name="replace a lost world").start()
                if attempt == 1:
                    first_loss[id(cell)] = str(exc)
                    retried(cell, str(exc))
                    pending.appendleft(cell)  # next to start, on another world (this one is gone)
                else:
                    stop = not publish(cell, lost(cell, world, f"its world was lost twice: {first_loss[id(cell)]}; then {exc}"))
                continue
            if exc is not None:
                raise exc
            free.append(world)
            if not publish(cell, outcome):
                stop = True
        for cell in pending if not stop else ():  # every world lost: the rest are recorded, never dropped
            publish(cell, lost(cell, None, "no world left on the cluster to run it"))
    except KeyboardInterrupt:
        for world, cell, _ in list(running.values()):
            publish(cell, interrupted(cell, world))
        raise
