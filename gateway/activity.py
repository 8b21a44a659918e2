"""This instance's view of lessons and breaks, for the gauges.

The proxy notes every clock step it sees; the gauges are computed at scrape
time (prometheus `set_function`), pruning students whose lesson and break
are long over, so nothing runs per request beyond one dict write.
"""

from __future__ import annotations

from collections.abc import Callable

from .clock import ClockState, Limits, in_lesson, lesson_end
from .timesource import SystemClock


class ActivityView:
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        # the store's clock: lesson starts and activity are on it
        self._clock = clock or SystemClock().now
        # key -> (lesson start, last seen activity, limits)
        self._lessons: dict[str, tuple[float, float, Limits]] = {}
        # key -> end of the break we told the student to take
        self._breaks: dict[str, float] = {}

    def lesson(self, key: str, start: float, now: float, limits: Limits) -> None:
        self._lessons[key] = (start, now, limits)
        self._breaks.pop(key, None)

    def last_seen(self, key: str, default: float) -> float:
        """The last activity this instance saw of the student's lesson."""
        seen = self._lessons.get(key)
        return default if seen is None else seen[1]

    def in_break(self, key: str, until: float) -> None:
        self._breaks[key] = until
        self._lessons.pop(key, None)

    def active_lessons(self) -> int:
        now = self._clock()
        n = 0
        for key, (start, last, lim) in list(self._lessons.items()):
            seen = ClockState(start, last)  # as this instance saw it
            if in_lesson(seen, now, lim):
                n += 1
            else:
                ended = lesson_end(seen, lim)
                if ended is None or now >= ended[1]:  # its break is over too
                    del self._lessons[key]
        return n

    def students_in_break(self) -> int:
        now = self._clock()
        n = 0
        for key, until in list(self._breaks.items()):
            if now < until:
                n += 1
            else:
                del self._breaks[key]
        return n
