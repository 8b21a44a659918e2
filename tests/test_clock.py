"""The lesson clock (gateway/clock.py): pure transitions on injected times."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.clock import (
    ClockLimits,
    ClockState,
    Step,
    advance,
    hold,
    in_lesson,
    lesson_end,
    release,
)

T0 = 1_767_225_600.0          # 2026-01-01T00:00:00Z
DAY = 20_000                  # a local day ordinal
DAY_END = 40_000.0            # seconds to the end of that day
MAX, BRK = 1800.0, 600.0
L = ClockLimits(max_duration=MAX, min_break=BRK)
LD = ClockLimits(max_duration=MAX, min_break=BRK, daily_max=3000.0)


def lesson(start: float = T0, last: float | None = None, conns: int = 0, day: int = DAY,
           used: float = 0.0) -> ClockState:
    return ClockState(start=start, last=start if last is None else last, conns=conns, day=day,
                      used=used)


def check(step: Step, **want: Any) -> None:
    got = {name: getattr(step, name) for name in want}
    assert got == want


@pytest.mark.parametrize(("state", "now", "want"), [
    pytest.param(ClockState(), T0,
                 {"outcome": "allow", "started": True, "start": T0, "remaining": MAX,
                  "ended_duration": None, "break_taken": None}, id="first-request"),
    pytest.param(lesson(last=T0 + 100), T0 + 200,
                 {"outcome": "allow", "started": False, "start": T0, "remaining": MAX - 200},
                 id="continue"),
    pytest.param(lesson(last=T0 + 300), T0 + 300 + BRK - 1,
                 {"outcome": "allow", "started": False, "start": T0}, id="short-gap"),
    pytest.param(lesson(last=T0 + 100, conns=1), T0 + 1000,
                 {"outcome": "allow", "started": False, "start": T0, "remaining": MAX - 1000},
                 id="open-connection-past-quiet-time"),
])
def test_advance_continues_or_starts(state: ClockState, now: float, want: dict[str, Any]) -> None:
    """A request with no lesson starts one; inside a lesson it continues it."""
    step, new = advance(state, now, L, DAY, DAY_END)
    check(step, now=now, retry_after=None, shadowed=(), **want)
    assert new.start == step.start and new.last == now


def test_quiet_gap_of_min_break_ends_the_lesson() -> None:
    """No activity for min_break was the break: the next request starts a new lesson."""
    state = lesson(last=T0 + 300)
    step, new = advance(state, T0 + 300 + BRK, L, DAY, DAY_END)
    check(step, outcome="allow", started=True, start=T0 + 300 + BRK, ended_duration=300.0,
          break_taken=BRK, remaining=MAX)
    assert new == ClockState(start=T0 + 300 + BRK, last=T0 + 300 + BRK, day=DAY, used=300.0)


@pytest.mark.parametrize(("state", "now", "retry_after"), [
    pytest.param(lesson(last=T0 + 1790), T0 + MAX, BRK, id="at-the-limit"),
    pytest.param(lesson(last=T0 + 1790), T0 + MAX + 450, BRK - 450, id="during-the-break"),
    pytest.param(lesson(last=T0 + 100, conns=2), T0 + MAX, BRK, id="open-connections-too"),
    pytest.param(lesson(last=T0 + 1500), T0 + 1900, 500.0, id="quiet-only-after-the-limit"),
])
def test_break_required_until_the_break_is_over(state: ClockState, now: float,
                                                retry_after: float) -> None:
    """After the limit (or a quiet end) the break lasts min_break; denials keep the state."""
    step, new = advance(state, now, L, DAY, DAY_END)
    assert step == Step("break_required", now, 0.0, None, retry_after)
    assert new is state


def test_break_over_at_limit_starts_a_new_lesson() -> None:
    """At start + max_duration + min_break the next lesson may start."""
    state = lesson(last=T0 + 1790)
    step, _ = advance(state, T0 + MAX + BRK, L, DAY, DAY_END)
    check(step, outcome="allow", started=True, ended_duration=MAX, break_taken=BRK)


@pytest.mark.parametrize(("state", "now", "want_start"), [
    pytest.param(lesson(last=T0 + 100, used=2900.0), T0 + 100, T0, id="in-the-lesson"),
    pytest.param(lesson(last=T0 + 1790, used=1200.0), T0 + MAX + 100, 0.0,
                 id="lesson-just-ended-in-its-break"),
    pytest.param(lesson(last=T0 + 1790, used=1200.0), T0 + MAX + BRK + 5, 0.0,
                 id="lesson-ended-break-over"),
    pytest.param(lesson(start=T0 - 4000, last=T0 - 3000, used=3000.0), T0, 0.0,
                 id="spent-by-earlier-lessons"),
])
def test_daily_limit_comes_before_break_required(state: ClockState, now: float,
                                                 want_start: float) -> None:
    """Once today's lesson time reaches daily_max, requests get daily_limit until the day ends."""
    step, new = advance(state, now, LD, DAY, DAY_END)
    assert step == Step("daily_limit", now, want_start, None, DAY_END)
    assert new is state


def test_remaining_is_capped_by_the_daily_limit() -> None:
    """A lesson's remaining time never runs past what is left of daily_max."""
    state = lesson(start=T0 - 2000, last=T0 - 1000, used=1000.0)  # 1000 s earlier + 1000 s now
    step, new = advance(state, T0, LD, DAY, DAY_END)
    check(step, outcome="allow", started=True, ended_duration=1000.0, remaining=1000.0)
    assert new.used == 2000.0


def test_daily_limit_day_end_retry_is_never_negative() -> None:
    """retry_after of daily_limit is the time to the day's end, floored at 0."""
    step, _ = advance(lesson(used=3000.0), T0 + 1, LD, DAY, -5.0)
    assert step.outcome == "daily_limit" and step.retry_after == 0.0


def test_daily_counter_resets_on_a_new_day() -> None:
    """`used` of another day does not count, and yesterday's lesson is not added to today."""
    state = lesson(start=T0 - 4000, last=T0 - 3000, day=DAY - 1, used=3000.0)
    step, new = advance(state, T0, LD, DAY, DAY_END)
    check(step, outcome="allow", started=True, remaining=MAX)
    assert (new.day, new.used) == (DAY, 0.0)


def test_continuing_a_lesson_records_the_day() -> None:
    """A lesson request stamps the state with today and today's used time."""
    state = lesson(last=T0 + 10, day=DAY - 1, used=999.0)
    step, new = advance(state, T0 + 20, LD, DAY, DAY_END)
    check(step, outcome="allow", started=False)
    assert (new.day, new.used, new.last) == (DAY, 0.0, T0 + 20)


@pytest.mark.parametrize(("limits", "state", "now", "shadowed", "remaining"), [
    pytest.param(replace(L, enforce_break=False), lesson(last=T0 + 1790), T0 + MAX + 10,
                 ("break_required",), MAX, id="break"),
    pytest.param(replace(LD, enforce_daily=False), lesson(last=T0 + 100, used=2900.0),
                 T0 + 200, ("daily_limit",), MAX - 200, id="daily"),
    pytest.param(replace(LD, enforce_daily=False, enforce_break=False),
                 lesson(last=T0 + 1790, used=1200.0), T0 + MAX + 10,
                 ("daily_limit", "break_required"), MAX, id="both-listed"),
])
def test_shadowed_rules_allow_and_report(limits: ClockLimits, state: ClockState, now: float,
                                         shadowed: tuple[str, ...],
                                         remaining: float) -> None:
    """A shadowed rule allows the request and names every rule that would have denied."""
    step, new = advance(state, now, limits, DAY, DAY_END)
    check(step, outcome="allow", shadowed=shadowed, remaining=remaining)
    assert new is not state


@pytest.mark.parametrize(("state", "want"), [
    pytest.param(ClockState(), None, id="no-lesson"),
    pytest.param(lesson(last=T0 + 300), (T0 + 300, T0 + 300 + BRK), id="quiet-end"),
    pytest.param(lesson(last=T0 + 1500), (T0 + MAX, T0 + MAX + BRK), id="limit-end"),
    pytest.param(lesson(last=T0 + 300, conns=1), (T0 + MAX, T0 + MAX + BRK),
                 id="connection-open-limit-end"),
])
def test_lesson_end(state: ClockState, want: tuple[float, float] | None) -> None:
    """The recorded lesson ends at its last activity if quiet long enough, else at the limit."""
    assert lesson_end(state, L) == want


@pytest.mark.parametrize(("state", "now", "want"), [
    pytest.param(ClockState(), T0, False, id="no-lesson"),
    pytest.param(lesson(last=T0 + 10), T0 + 10 + BRK - 0.001, True, id="active"),
    pytest.param(lesson(last=T0 + 10), T0 + 10 + BRK, False, id="quiet-min-break"),
    pytest.param(lesson(last=T0 + 10, conns=1), T0 + 1000, True, id="connection-open"),
    pytest.param(lesson(last=T0 + 1799, conns=1), T0 + MAX, False, id="limit"),
])
def test_in_lesson(state: ClockState, now: float, want: bool) -> None:
    """A lesson is in progress until the limit, unless quiet for min_break with no connection."""
    assert in_lesson(state, now, L) is want


def test_hold_and_release_count_connections_and_activity() -> None:
    """hold/release count open connections (never below 0) and record activity."""
    s = hold(lesson(last=T0 + 5), T0 + 10)
    assert (s.conns, s.last) == (1, T0 + 10)
    s = release(s, T0 + 500)
    assert (s.conns, s.last) == (0, T0 + 500)
    s = release(s, T0 + 400)
    assert (s.conns, s.last) == (0, T0 + 500)
