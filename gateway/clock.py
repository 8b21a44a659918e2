"""The per-student lesson clock: one pure state transition.

`advance(state, now, ...)` is the whole lesson-clock rule of the contract.
The memory store calls it directly; the Redis store runs the same
transition in `store/lua/advance.lua` so that reading and updating a
student's clock is one atomic round trip. Both stores run one test suite
(tests/test_store.py), which is what keeps the two in step.

Times are float Unix seconds. `now` is supplied by the caller: the engine
has no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Outcome = Literal["allow", "break_required", "daily_limit"]


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
class ClockLimits:
    max_duration: float
    min_break: float
    daily_max: float | None = None
    enforce_break: bool = True   # False: break_required is shadowed
    enforce_daily: bool = True   # False: daily_limit is shadowed


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


def lesson_end(state: ClockState, limits: ClockLimits) -> tuple[float, float] | None:
    """(end, break_end) of the recorded lesson if it is over by quiet time or
    the limit, computed without `now`: the quiet branch ends at the last
    activity. None if no lesson is on record."""
    if not state.start:
        return None
    limit_end = state.start + limits.max_duration
    if state.conns == 0 and state.last + limits.min_break <= limit_end:
        return state.last, state.last + limits.min_break
    return limit_end, limit_end + limits.min_break


def in_lesson(state: ClockState, now: float, limits: ClockLimits) -> bool:
    """A lesson is in progress at `now`: started, under the limit, and not
    quiet for min_break (open connections are activity)."""
    if not state.start or now >= state.start + limits.max_duration:
        return False
    return state.conns > 0 or now - state.last < limits.min_break


def advance(state: ClockState, now: float, limits: ClockLimits, day: int,
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


def lesson_remaining(state: ClockState, now: float, limits: ClockLimits, day: int) -> float:
    """Seconds the recorded lesson may still run at `now` (local day `day`):
    to its limit, or to the day's limit if that comes first."""
    return _remaining(state, now, limits, state.used if state.day == day else 0.0)


def _remaining(state: ClockState, now: float, limits: ClockLimits, used: float) -> float:
    rem = state.start + limits.max_duration - now
    if limits.daily_max is not None and limits.enforce_daily:
        rem = min(rem, limits.daily_max - used - (now - state.start))
    return max(rem, 0.0)


def hold(state: ClockState, now: float) -> ClockState:
    """A lesson connection opened (after an allowed step)."""
    return replace(state, conns=state.conns + 1, last=max(state.last, now))


def release(state: ClockState, now: float) -> ClockState:
    """A lesson connection closed: activity lasted until now."""
    return replace(state, conns=max(state.conns - 1, 0), last=max(state.last, now))
