"""Lessons this instance started, until their end is reported.

A lesson's end is recorded once fleet-wide (a claim in the store): its
length in `tutorgate_lesson_duration_seconds` and a `lesson_end` audit
event. The next lesson's first request reports the one before it; the
sweep reports lessons nobody followed, from the instance that started
them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from .activity import ActivityView
from .clock import ClockState, Limits, in_lesson, lesson_end
from .errors import StoreUnavailable
from .metrics import Metrics
from .store.base import StateStore
from .timesource import Clock

log = logging.getLogger("tutorgate.proxy")

# An ended lesson's report is claimed once fleet-wide for this long.
CLAIM_TTL = 2 * 86400.0
# Lessons remembered for the sweep; past this the oldest is dropped (and
# counted: its end is then reported only if the student comes back).
OWNED_MAX = 200_000


class AuditHook(Protocol):
    """Where audit events go (audit.AuditWriter.record): one hook style for
    lesson starts and ends, denials and cuts."""

    def __call__(self, event: str, student: str | None, rule: str | None, category: str,
                 region: str, duration: float | None = None, at: float | None = None,
                 break_seconds: float | None = None,
                 break_honoured: bool | None = None) -> None: ...


@dataclass(slots=True)
class Owned:
    start: float
    limits: Limits
    category: str
    region: str


class LessonBook:
    """The lessons this instance started and has not yet seen reported."""

    def __init__(self, store: StateStore, metrics: Metrics, clock: Clock,
                 activity: ActivityView, max_owned: int = OWNED_MAX) -> None:
        self.store = store
        self.activity = activity
        self.metrics = metrics
        self.clock = clock
        self.max_owned = max_owned
        self.on_event: AuditHook | None = None
        self.owned: dict[str, Owned] = {}   # insertion order = oldest first
        self._tasks: set[asyncio.Task[None]] = set()

    def started(self, key: str, start: float, limits: Limits, category: str,
                region: str) -> None:
        """This instance started `key`'s lesson at `start`."""
        owned = self.owned
        owned.pop(key, None)  # a student's new lesson moves to the young end
        if len(owned) >= self.max_owned:
            del owned[next(iter(owned))]
            self.metrics.lesson_reports_dropped.inc()
        owned[key] = Owned(start, limits, category, region)

    def followed(self, key: str, start: float, duration: float, category: str,
                 region: str) -> None:
        """A next lesson started: report the one it follows (maybe already
        reported by the sweep of the instance that started it)."""
        self._spawn(self.report_end(key, start, duration, category, region))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def report_end(self, key: str, start: float, duration: float, category: str,
                         region: str) -> None:
        """Record an ended lesson once fleet-wide: its length in the histogram
        and a lesson_end audit event."""
        try:
            first = await self.store.claim(key, repr(start), CLAIM_TTL)
        except StoreUnavailable:
            log.warning("a lesson's end could not be recorded: the state store is down")
            return
        if not first:
            return
        self.metrics.lesson_duration.labels(region).observe(duration)
        if self.on_event is not None:
            self.on_event("lesson_end", key, None, category, region, duration=duration)

    async def sweep(self) -> None:
        """Report the lessons this instance started that are over by now
        (limit or quiet time) although no next lesson has closed them."""
        now = self.clock.now()
        for key, o in list(self.owned.items()):
            # the local view first: a lesson plainly going on needs no look
            seen = ClockState(o.start, self.activity.last_seen(key, 0.0))
            if in_lesson(seen, now, o.limits):
                continue
            try:
                state, t = await self.store.peek(key)
            except StoreUnavailable:
                return
            if state.start != o.start:
                # a next lesson started: its first request reported this one
                self.owned.pop(key, None)
            elif not in_lesson(state, t, o.limits):
                ended = lesson_end(state, o.limits)
                self.owned.pop(key, None)
                if ended is not None:
                    await self.report_end(key, o.start, ended[0] - o.start, o.category,
                                          o.region)
