"""The one wall clock a process acts on: the clock the lesson clock runs on.

Every deadline this process acts on (WebSocket and stream cut-offs, the
Redis store's fast path, the curfew check of a request, status countdowns,
the lesson sweep, audit times) is computed on one clock, so an instance whose
own clock is wrong can neither lengthen nor shorten a lesson by its error.

- `SystemClock`: the host's wall clock. The memory store keeps the lesson
  clock on it, so in memory mode it is the clock.
- `StoreClock`: Redis TIME, between readings. Each store reply that carries
  Redis's time (`observe`) anchors it; in between, the monotonic clock
  advances it. The instance's wall clock never enters: a host 60 s behind
  still cuts a lesson at Redis's deadline.

`time.time()` is read here and nowhere else in the serving process (only
the `policy push` command stamps its push with the host clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

# A reply's Redis time reaches us late by the round trip and the event loop's
# lag, so readings only move the anchor forward (the least-late reading
# wins) - except every RESYNC seconds, when the newest reading is taken as
# it is, so a Redis clock stepped back is followed within that time.
RESYNC = 30.0


class Clock(Protocol):
    def now(self) -> float:
        """Wall time (Unix seconds) on the clock the lesson clock runs on."""
        ...

    def until(self, t: float) -> float:
        """Seconds from now until wall time `t` on this clock (<0: past)."""
        ...


class SystemClock:
    """The host's own wall clock."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall

    def now(self) -> float:
        return self._wall()

    def until(self, t: float) -> float:
        return t - self.now()


class StoreClock:
    """The store's clock (Redis TIME) carried forward by the monotonic clock."""

    def __init__(self, mono: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._mono = mono
        # Until Redis first answers, the host clock is the best guess there is.
        self._offset = wall() - mono()   # store time minus monotonic time
        self._at = -RESYNC               # monotonic time of the anchoring reading
        self.synced = False

    def observe(self, store_now: float) -> None:
        """A store reply said its clock read `store_now` (just now)."""
        m = self._mono()
        off = store_now - m
        if off > self._offset or m - self._at >= RESYNC or not self.synced:
            self._offset, self._at, self.synced = off, m, True

    def now(self) -> float:
        return self._mono() + self._offset

    def until(self, t: float) -> float:
        return t - self.now()
