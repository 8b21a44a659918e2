"""The per-student lesson clock: one pure state transition.

`advance(state, now, ...)` is the whole lesson-clock rule of the contract.
The memory store calls it directly; the Redis store runs the same
transition in `store/lua/advance.lua` so that reading and updating a
student's clock is one atomic round trip. Both stores run one test suite
(tests/test_store.py), which is what keeps the two in step.

It also owns every deadline: `lesson_deadline` answers "when must this
lesson end, and by which rule" for the engine (X-Lesson-Remaining), the
status endpoint, the live cut-offs and the activity gauges alike, and
`limit_end`/`quiet_end` are the two bounds the Redis store's fast path
keeps. Nothing else in the package adds durations to lesson times
(tests/test_deadlines.py holds the callers to one answer).

Times are float Unix seconds. `now` is supplied by the caller: the engine
has no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .codes import Rule

Outcome = Literal["allow", "break_required", "daily_limit"]
# Below this, two deadlines are the same instant (float sums of seconds).
EPSILON = 1e-6


# Not frozen: a frozen dataclass's __init__ costs ~5x on the per-request path;
# treat instances as values all the same (nothing mutates them).
@dataclass(slots=True)
class ClockState:
    start: float = 0.0       # lesson start; 0 = no lesson on record
    last: float = 0.0        # last allowed lesson request / connection activity
    conns: int = 0           # lesson connections held open right now
    day: int = 0             # local day ordinal `used` belongs to
    used: float = 0.0        # lesson seconds of finished lessons on `day`


@dataclass(frozen=True)
class Limits:
    """A profile's lesson limits, as the policy compiled them (shadowing
    applied): the one type the policy, the engine and the stores share."""

    max_duration: float
    min_break: float
    daily_max: float | None = None
    enforce_break: bool = True   # False: break_required is shadowed
    enforce_daily: bool = True   # False: daily_limit is shadowed


# The name the stores and older callers import.
ClockLimits = Limits


# Not frozen: built on every allowed request (see ClockState).
@dataclass(slots=True)
class Deadline:
    """When a lesson must end at the latest, and the rule that ends it."""

    at: float
    rule: Rule


# Not frozen: a frozen dataclass's __init__ costs ~5x on the per-request path;
# treat instances as values all the same (nothing mutates them).
@dataclass(slots=True)
class Step:
    outcome: Outcome
    now: float
    start: float                 # the lesson in progress (after this step), 0 if none
    remaining: float | None      # allowed: seconds until the lesson must end
    retry_after: float | None    # denied: seconds until the rule stops applying
    started: bool = False        # this step started a lesson
    ended_duration: float | None = None  # this step closed a lesson that lasted this long
    ended_start: float | None = None     # ... and started then (it names the lesson)
    break_taken: float | None = None     # gap before the lesson this step started
    shadowed: tuple[Outcome, ...] = ()   # shadowed rules that would have denied


def limit_end(start: float, used: float, limits: Limits) -> float:
    """When a lesson that started at `start` reaches its limit: the lesson
    limit, or the day's limit first if `used` seconds of the day were spent
    before it (an enforced daily_max only)."""
    end = start + limits.max_duration
    if limits.daily_max is not None and limits.enforce_daily:
        end = min(end, start + limits.daily_max - used)
    return end


def quiet_end(last: float, limits: Limits) -> float:
    """When a lesson whose last activity was `last` ends by quiet time."""
    return last + limits.min_break


def break_honoured(gap: float, limits: Limits) -> bool:
    """A gap of `gap` seconds between two lessons was a full break."""
    return gap >= limits.min_break - EPSILON


def lesson_end(state: ClockState, limits: Limits) -> tuple[float, float] | None:
    """(end, break_end) of the recorded lesson if it is over by quiet time or
    the limit, computed without `now`: the quiet branch ends at the last
    activity. None if no lesson is on record."""
    if not state.start:
        return None
    end = state.start + limits.max_duration
    if state.conns == 0 and quiet_end(state.last, limits) <= end:
        end = state.last
    return end, quiet_end(end, limits)


def in_lesson(state: ClockState, now: float, limits: Limits) -> bool:
    """A lesson is in progress at `now`: started, under the limit, and not
    quiet for min_break (open connections are activity)."""
    if not state.start or now >= state.start + limits.max_duration:
        return False
    return state.conns > 0 or now < quiet_end(state.last, limits)


def lesson_deadline(state: ClockState, now: float, limits: Limits, day: int,
                    until_curfew: float) -> Deadline:
    """When the lesson in progress at `now` (local day `day`) must end, and
    by which rule: its lesson limit, the day's limit, or the curfew that
    starts `until_curfew` seconds after `now`, whichever comes first. Never
    before `now`. Quiet time is not a deadline: activity moves it."""
    used = state.used if state.day == day else 0.0
    return _deadline(state.start, now, limit_end(state.start, used, limits), limits,
                     until_curfew)


def step_deadline(step: Step, limits: Limits, until_curfew: float) -> Deadline:
    """`lesson_deadline` for an allowed clock step: the step's `remaining` is
    the clock's own answer (advance, or its Lua mirror in one round trip)."""
    end = step.now + (step.remaining if step.remaining is not None else limits.max_duration)
    return _deadline(step.start, step.now, end, limits, until_curfew)


def _deadline(start: float, now: float, end: float, limits: Limits,
              until_curfew: float) -> Deadline:
    rule = Rule.LESSON_LIMIT
    if end < start + limits.max_duration - EPSILON:
        rule = Rule.DAILY_LIMIT  # the day's limit comes first
    if end < now:
        end = now
    curfew = now + until_curfew
    if curfew < end:
        return Deadline(curfew, Rule.CURFEW)
    return Deadline(end, rule)


def advance(state: ClockState, now: float, limits: Limits, day: int,
            seconds_to_day_end: float) -> tuple[Step, ClockState]:
    """One allowed-so-far lesson request at `now`: continue the lesson, start
    a new one, or deny (daily_limit before break_required). Denials leave the
    state unchanged so they never extend a break or count as lesson time."""
    used = state.used if state.day == day else 0.0
    current = in_lesson(state, now, limits)
    ended = None if current else lesson_end(state, limits)
    shadowed: tuple[Outcome, ...] = ()

    if limits.daily_max is not None:
        spent = used
        if current:
            spent = used + (now - state.start)
        elif ended is not None and state.day == day:
            # The lesson that just ended is not folded into `used` until the
            # next one starts: count it here, or its break answers
            # break_required (not daily_limit) and the next lesson starts
            # with the day already spent.
            spent = used + (ended[0] - state.start)
        if spent >= limits.daily_max:
            if limits.enforce_daily:
                return Step("daily_limit", now, state.start if current else 0.0, None,
                            max(seconds_to_day_end, 0.0)), state
            shadowed = ("daily_limit",)

    if current:
        # the constructor, not dataclasses.replace: this runs on every request
        new = ClockState(state.start, max(state.last, now), state.conns, day, used)
        return Step("allow", now, state.start, _remaining(new, now, limits, used),
                    None, shadowed=shadowed), new

    duration: float | None = None
    gap: float | None = None
    if ended is not None:
        end, break_end = ended
        if now < break_end:
            if limits.enforce_break:
                return Step("break_required", now, 0.0, None, break_end - now), state
            shadowed = (*shadowed, "break_required")
        duration = end - state.start
        gap = now - end
        if state.day == day:
            used += duration
    new = ClockState(start=now, last=now, conns=state.conns, day=day, used=used)
    return Step("allow", now, now, _remaining(new, now, limits, used), None, started=True,
                ended_duration=duration, break_taken=gap, shadowed=shadowed,
                ended_start=state.start if ended is not None else None), new


def lesson_remaining(state: ClockState, now: float, limits: Limits, day: int) -> float:
    """Seconds the recorded lesson may still run at `now` (local day `day`):
    to its limit, or to the day's limit if that comes first."""
    return _remaining(state, now, limits, state.used if state.day == day else 0.0)


def _remaining(state: ClockState, now: float, limits: Limits, used: float) -> float:
    return max(limit_end(state.start, used, limits) - now, 0.0)


def hold(state: ClockState, now: float) -> ClockState:
    """A lesson connection opened (after an allowed step)."""
    return replace(state, conns=state.conns + 1, last=max(state.last, now))


def release(state: ClockState, now: float) -> ClockState:
    """A lesson connection closed: activity lasted until now."""
    return replace(state, conns=max(state.conns - 1, 0), last=max(state.last, now))
