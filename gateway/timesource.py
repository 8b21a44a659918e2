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
- `ManualClock`: moves only when told (`advance`), and runs the timers that
  come due as it does. Tests drive lessons, breaks and cut-offs with it
  instead of waiting for them.

A deadline timer (`call_at`) belongs to the clock too: on the real clocks it
is a timer of the event loop, set for the time left on that clock; on a
`ManualClock` it fires when the clock is advanced past it.

`time.time()` is read here and nowhere else in the serving process (only
the `policy push` command stamps its push with the host clock).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
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

    def call_at(self, t: float, callback: Callable[[], object]) -> Timer:
        """Run `callback` in the running event loop once this clock reads `t`
        (on the loop's next pass if `t` is past)."""
        ...


class Timer(Protocol):
    def cancel(self) -> None: ...


class _LoopTimers:
    """`call_at` for a clock that runs by itself: an event-loop timer for the
    time left on this clock (the loop's own clock is monotonic, so a wall
    clock stepped meanwhile does not move it)."""

    def until(self, t: float) -> float:
        raise NotImplementedError

    def call_at(self, t: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(max(self.until(t), 0.0), callback)


class SystemClock(_LoopTimers):
    """The host's own wall clock."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall

    def now(self) -> float:
        return self._wall()

    def until(self, t: float) -> float:
        return t - self.now()


class StoreClock(_LoopTimers):
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


class _ManualTimer:
    __slots__ = ("at", "callback", "cancelled", "seq")

    def __init__(self, at: float, seq: int, callback: Callable[[], object]) -> None:
        self.at, self.seq, self.callback, self.cancelled = at, seq, callback, False

    def __lt__(self, other: _ManualTimer) -> bool:
        return (self.at, self.seq) < (other.at, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A wall clock that stands still until `advance` moves it: tests step
    through a lesson, its break and its cut-offs without waiting for them.

    Its timers fire in deadline order as the clock passes them, each on the
    event loop's next pass (as an event-loop timer would); the loop still has
    to run before their effects (a closed WebSocket) can be seen.
    """

    def __init__(self, start: float | None = None) -> None:
        self._t = time.time() if start is None else start
        self._timers: list[_ManualTimer] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._t

    def until(self, t: float) -> float:
        return t - self._t

    def call_at(self, t: float, callback: Callable[[], object]) -> Timer:
        timer = _ManualTimer(t, next(self._seq), callback)
        if t <= self._t:
            asyncio.get_running_loop().call_soon(self._run, timer)
        else:
            heapq.heappush(self._timers, timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward (never back) and fire every
        timer that came due."""
        if seconds < 0:
            raise ValueError(f"a ManualClock does not go back ({seconds} s)")
        self._t += seconds
        while self._timers and self._timers[0].at <= self._t:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                asyncio.get_running_loop().call_soon(self._run, timer)

    def pending(self) -> int:
        """Timers set and not yet due nor cancelled."""
        return sum(not t.cancelled for t in self._timers)

    @staticmethod
    def _run(timer: _ManualTimer) -> None:
        if not timer.cancelled:  # cancelled between coming due and running
            timer.callback()
