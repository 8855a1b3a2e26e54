"""Simulation only: the simulated hospitals share this machine's cores, so their sandboxed
ClientApps take turns for them, the longest-expected first.

Flower's engine hands its actors a round's messages in partition order. With as many actors as
cores, the demo's largest hospital (897 images, 7 s of training) started last in every round
while the other core idled at the end: 11.8 s per round where the work fits in 9.8. So the
simulation starts an actor per hospital (they only relay bytes), every task of a round reaches
its hospital at once, and each hospital's ClientApp waits here for a core: after a short
gathering window, so that a round's tasks are compared together, the hospital that took
longest the last time it answered this kind of message goes first (longest processing time
first; those never seen yet in the order they came).

The gate admits the instruction before the wait (its arrival time is when the relay received
it) and holds the reply after it, so the wait is part of the task's time as the server sees it
and the release slots quantise it like any other. A core is held only while the ClientApp runs,
not while the gate holds the reply for its release slot or for review. A hospital runs its tasks
one at a time on its own thread, so at most one task per hospital waits here."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

GATHER_S = 0.05  # Flower's engine puts a round's messages in its queue within one 0.1 s sweep
KEYS_KEPT = 256  # (hospital, message type) durations remembered; a hostile server's invented types age out
KIND_CHARS = 64


@dataclass(eq=False)
class _Ticket:
    seq: int  # arrival order
    key: tuple[str, str]  # (hospital, message type)
    arrived: float


class CoreScheduler:
    """At most `cores` tasks at a time, longest-expected first. `task(hospital, kind)` is a
    context manager held while the task runs."""

    def __init__(self, cores: int, gather_s: float = GATHER_S, clock: Callable[[], float] = time.monotonic) -> None:
        if cores < 1:
            raise ValueError(f"cores must be at least 1, got {cores}")
        self.cores = cores
        self._gather_s = gather_s
        self._clock = clock
        self._cond = threading.Condition()
        self._busy = 0
        self._waiting: list[_Ticket] = []
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def remembered(self) -> int:
        with self._cond:
            return len(self._last)

    def expected(self, hospital: str, kind: str) -> float:
        """How long this hospital took the last time it answered this kind (0: never yet)."""
        with self._cond:
            return self._last.get((hospital, kind[:KIND_CHARS]), 0.0)

    @contextmanager
    def task(self, hospital: str, kind: str) -> Iterator[None]:
        ticket = _Ticket(next(self._seq), (hospital, kind[:KIND_CHARS]), self._clock())
        with self._cond:
            self._waiting.append(ticket)
            try:
                while (wait := self._wait_for(ticket)) is not None:
                    self._cond.wait(wait)
            finally:
                self._waiting.remove(ticket)
            self._busy += 1
            self._cond.notify_all()  # the next in line may take another free core
        started = self._clock()
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._last[ticket.key] = self._clock() - started
                self._last.move_to_end(ticket.key)
                while len(self._last) > KEYS_KEPT:
                    self._last.popitem(last=False)
                self._cond.notify_all()

    def _wait_for(self, ticket: _Ticket) -> float | None:
        """None when `ticket` may start now; else how long to wait before looking again."""
        if self._busy >= self.cores:
            return 1.0  # woken by notify_all when a core frees
        gathering = min(t.arrived for t in self._waiting) + self._gather_s - self._clock()
        if gathering > 0:
            return gathering
        best = max(self._waiting, key=lambda t: (self._last.get(t.key, 0.0), -t.seq))
        return None if best is ticket else 1.0
