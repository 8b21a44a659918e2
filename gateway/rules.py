"""THE rule engine: pure, no I/O, no clock of its own.

A request on an enforced route goes through `precheck` (the rules that need
no per-student state, in the contract's order), then the lesson clock
(`clock.advance`, run atomically by the state store), then `finish`. The
split exists so the Redis store can run the clock in one Lua call between
the two halves; `decide` composes all three for callers that hold the state
(memory store tests, `tutorgate explain`).

Decisions are values: a denial is a `Decision` with its rule code, never an
exception; only the proxy turns it into HTTP.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .calendar import RestDay
from .clock import ClockState, Limits, Step, advance, lesson_deadline, step_deadline
from .codes import STATUS, Rule
from .durations import human_duration
from .policy import Policy, Profile, Route, stage_of

# The codes under their old names (codes.Rule is the one list).
BAD_PATH = Rule.BAD_PATH  # the proxy decides it, before any route (paths.py)
FORBIDDEN_FEATURE = Rule.FORBIDDEN_FEATURE
IDENTITY_REQUIRED = Rule.IDENTITY_REQUIRED
BAD_IDENTITY = Rule.BAD_IDENTITY
PRESCHOOL = Rule.PRESCHOOL
CURFEW = Rule.CURFEW
REST_DAY = Rule.REST_DAY
DAILY_LIMIT = Rule.DAILY_LIMIT
BREAK_REQUIRED = Rule.BREAK_REQUIRED
STATE_UNAVAILABLE = Rule.STATE_UNAVAILABLE
UPSTREAM_ERROR = Rule.UPSTREAM_ERROR
LESSON_LIMIT = Rule.LESSON_LIMIT  # the cut-off of a live connection

# What a person reads for each code is in messages.py (zh-CN and en).

Grade = int | Literal["preschool"]


@dataclass(frozen=True)
class Student:
    """Who is asking, as identity.py read it. `problem` set = not usable."""

    key: str | None = None          # keyed hash of the student id, never the id
    grade: Grade | None = None
    region: str | None = None
    problem: Literal["missing", "malformed"] | None = None
    why: str = ""


@dataclass(frozen=True)
class Check:
    rule: str
    applies: bool
    why: str


# Not frozen: a frozen dataclass's __init__ costs ~5x on the per-request path;
# treat instances as values all the same (nothing mutates them).
@dataclass(slots=True)
class Decision:
    allowed: bool
    rule: str | None
    retry_after: float | None = None
    lesson_remaining: float | None = None
    shadowed: tuple[str, ...] = ()     # rules that applied but are shadowed
    checked: tuple[Check, ...] = ()
    step: Step | None = None
    region: str = "base"
    end_rule: str = LESSON_LIMIT  # what ends the lesson: lesson_limit, curfew, daily_limit
    # the rest-day answer rests on the law's fallback, not on official data
    provisional: bool = False
    deadline: float | None = None  # allowed lesson: when it must end (the store's clock)

    @property
    def status(self) -> int:
        return 200 if self.allowed else STATUS[self.rule or STATE_UNAVAILABLE]


# Not frozen: a frozen dataclass's __init__ costs ~5x on the per-request path;
# treat instances as values all the same (nothing mutates them).
@dataclass(slots=True)
class Pending:
    """Static rules passed: what the clock step needs and what finish adds."""

    route: Route
    student: Student
    profile: Profile
    limits: Limits
    day: int
    seconds_to_day_end: float
    until_curfew: float
    shadowed: tuple[str, ...] = ()
    checked: tuple[Check, ...] = field(default_factory=tuple)
    trace: bool = False
    provisional: bool = False
    now: float = 0.0             # the time the rules were checked at


# ---------------------------------------------------------------- time helpers

def _next_at(local: dt.datetime, t: dt.time) -> dt.datetime:
    """The next instant (> local) whose local wall time is t."""
    cand = dt.datetime.combine(local.date(), t, tzinfo=local.tzinfo)
    if cand <= local:
        cand = dt.datetime.combine(local.date() + dt.timedelta(days=1), t, tzinfo=local.tzinfo)
    return cand


def in_curfew(profile: Profile, local: dt.datetime) -> bool:
    t = local.timetz().replace(tzinfo=None)
    s, e = profile.curfew_start, profile.curfew_end
    if s > e:  # crosses midnight
        return t >= s or t < e
    return s <= t < e


def _curfew_at(profile: Profile, local: dt.datetime) -> tuple[bool, float, float]:
    inside = in_curfew(profile, local)
    to_end = (_next_at(local, profile.curfew_end) - local).total_seconds()
    to_start = (_next_at(local, profile.curfew_start) - local).total_seconds()
    return inside, to_end, to_start


def _day_at(profile: Profile, local: dt.datetime) -> tuple[dt.date, float]:
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(0),
                                   tzinfo=profile.tz)
    return local.date(), (midnight - local).total_seconds()


@dataclass(frozen=True, slots=True)
class _Facts:
    """The clock-free facts of one profile at one whole second. Every time in a
    policy is a whole second (curfew HH:MM:SS, local midnight), so they hold for
    the whole second; only the distances shrink by the fraction."""

    second: int
    inside: bool
    to_end: float        # curfew window end, from the start of the second
    to_start: float      # next curfew start
    today: dt.date
    to_midnight: float
    rest: RestDay | None
    rest_retry: float | None
    provisional: bool    # today's rest-day answer or its wait rests on the law's fallback


# id(profile) -> (profile, facts); the profile is kept so an id is never reused.
_FACTS: dict[int, tuple[Profile, _Facts]] = {}


def _facts(profile: Profile, now: float) -> _Facts:
    second = int(now // 1)
    hit = _FACTS.get(id(profile))
    if hit is not None and hit[0] is profile and hit[1].second == second:
        return hit[1]
    local = dt.datetime.fromtimestamp(second, profile.tz)
    inside, to_end, to_start = _curfew_at(profile, local)
    today, to_midnight = _day_at(profile, local)
    rest, provisional = profile.calendar.verdict(today)
    retry = None
    if rest is not None:
        nxt, later = profile.calendar.next_open(today)
        provisional = provisional or later
        if nxt is not None:
            retry = to_midnight + (nxt - today - dt.timedelta(days=1)).days * 86400.0
    facts = _Facts(second, inside, to_end, to_start, today, to_midnight, rest, retry,
                   provisional)
    if len(_FACTS) > 4096:  # policies come and go with reloads
        _FACTS.clear()
    _FACTS[id(profile)] = (profile, facts)
    return facts


def curfew_times(profile: Profile, now: float) -> tuple[bool, float, float]:
    """(inside, seconds until the window ends, seconds until it next starts)."""
    return _curfew_at(profile, dt.datetime.fromtimestamp(now, profile.tz))


def local_day(profile: Profile, now: float) -> tuple[dt.date, float]:
    """Local date and seconds until the next local midnight."""
    return _day_at(profile, dt.datetime.fromtimestamp(now, profile.tz))


# ---------------------------------------------------------------- the engine

class _Trace:
    """The rules precheck has looked at (for explain) and those shadowed."""

    def __init__(self, policy: Policy, trace: bool) -> None:
        self.policy, self.trace = policy, trace
        self.checked: list[Check] = []
        self.shadowed: list[str] = []

    def hit(self, rule: str, why: Callable[[], str], retry: float | None = None,
            region: str = "base", provisional: bool = False) -> Decision | None:
        """`rule` applies: its denial, or None if the rule is shadowed."""
        if self.trace:
            self.checked.append(Check(rule, True, why()))
        if rule in self.policy.shadow:
            self.shadowed.append(rule)
            return None
        return Decision(False, rule, retry, None, tuple(self.shadowed), tuple(self.checked),
                        region=region, provisional=provisional)

    def miss(self, rule: str, why: Callable[[], str]) -> None:
        if self.trace:
            self.checked.append(Check(rule, False, why()))

    def allowed(self) -> Decision:
        return Decision(True, None, None, None, tuple(self.shadowed), tuple(self.checked))


def precheck(policy: Policy, route: Route, student: Student, now: float,
             trace: bool = False) -> Decision | Pending:
    """The state-free rules, in order. A Decision ends it; Pending goes on to
    the lesson clock. `trace` records every rule checked and why (explain);
    without it and without shadowed rules the fast path answers."""
    if not trace and not policy.shadow:
        return _precheck_fast(policy, route, student, now)
    t = _Trace(policy, trace)
    if route.kind == "forbidden":
        return t.hit(FORBIDDEN_FEATURE, lambda: f"route {route.prefix} is the forbidden feature "
                                                f"{route.feature or route.prefix}") \
            or t.allowed()
    t.miss(FORBIDDEN_FEATURE, lambda: f"route {route.prefix} is a {route.category} lesson route")
    if student.problem is not None:
        if student.problem == "missing":
            d = t.hit(IDENTITY_REQUIRED, lambda: student.why or "no student id")
        else:
            t.miss(IDENTITY_REQUIRED, lambda: "a student id is present")
            d = t.hit(BAD_IDENTITY, lambda: student.why or "malformed student id or grade")
        return d or t.allowed()  # shadowed: nobody to keep a clock for
    t.miss(IDENTITY_REQUIRED, lambda: "a student id is present")
    t.miss(BAD_IDENTITY, lambda: "student id and grade are well formed")
    grade = student.grade
    profile = policy.profile(student.region,
                             stage_of(grade) if isinstance(grade, int) else None)
    if grade == "preschool":
        d = t.hit(PRESCHOOL, lambda: "grade is preschool: no online training at all",
                  region=profile.region)
        if d is not None:
            return d
    else:
        t.miss(PRESCHOOL, lambda: f"grade {grade if grade is not None else 'not given'}")
    return _precheck_times(t, route, student, profile, now)


def _precheck_times(t: _Trace, route: Route, student: Student, profile: Profile,
                    now: float) -> Decision | Pending:
    """precheck's rules of the clock and the calendar: curfew, rest day."""
    region = profile.region
    f = _facts(profile, now)
    frac = now - f.second
    inside, to_end, to_start = f.inside, f.to_end - frac, f.to_start - frac

    def window() -> str:
        return f"{profile.curfew_start:%H:%M:%S}-{profile.curfew_end:%H:%M:%S} {profile.tz.key}"

    if inside:
        d = t.hit(CURFEW, lambda: f"inside the curfew {window()}", to_end, region=region)
        if d is not None:
            return d
    else:
        t.miss(CURFEW, lambda: f"outside the curfew {window()}; "
                               f"it starts in {human_duration(int(to_start))}")
    today, to_midnight = f.today, f.to_midnight - frac
    provisional = False
    if route.category == "subject":
        rest = f.rest
        provisional = f.provisional

        def mark() -> str:
            return (f" -- provisional: no official calendar for {today.year} yet, the law's "
                    "statutory days and weekends apply" if provisional else "")

        if rest is not None:
            retry = None if f.rest_retry is None else f.rest_retry - frac
            d = t.hit(REST_DAY,
                      lambda: f"{today} is a rest day ({rest.reason}: {rest.name}){mark()}",
                      retry, region=region, provisional=provisional)
            if d is not None:
                return d
        else:
            t.miss(REST_DAY, lambda: f"{today} is a school day{mark()}")
    else:
        t.miss(REST_DAY, lambda: "non-subject classes are not bound by rest days")
    return Pending(route, student, profile, profile.limits, today.toordinal(),
                   to_midnight, to_start, tuple(t.shadowed), tuple(t.checked), t.trace,
                   provisional, now)


def _precheck_fast(policy: Policy, route: Route, student: Student,
                   now: float) -> Decision | Pending:
    """precheck for the hot path: same order, same answers, no texts and no
    shadowing (tests/test_rules.py holds the two paths to the same results)."""
    if route.kind == "forbidden":
        return Decision(False, FORBIDDEN_FEATURE)
    if student.problem is not None:
        return Decision(False, IDENTITY_REQUIRED if student.problem == "missing"
                        else BAD_IDENTITY)
    grade = student.grade
    profile = policy.profile(student.region,
                             stage_of(grade) if isinstance(grade, int) else None)
    if grade == "preschool":
        return Decision(False, PRESCHOOL, region=profile.region)
    f = _facts(profile, now)
    frac = now - f.second
    if f.inside:
        return Decision(False, CURFEW, f.to_end - frac, region=profile.region)
    subject = route.category == "subject"
    if subject and f.rest is not None:
        return Decision(False, REST_DAY, None if f.rest_retry is None else f.rest_retry - frac,
                        region=profile.region, provisional=f.provisional)
    return Pending(route, student, profile, profile.limits, f.today.toordinal(),
                   f.to_midnight - frac, f.to_start - frac,
                   provisional=subject and f.provisional, now=now)


def finish(pending: Pending, step: Step) -> Decision:
    """Turn the clock's step into the decision."""
    if step.outcome == "allow" and not (pending.trace or pending.shadowed or step.shadowed):
        return _allowed(pending, step, (), ())  # the hot path: nothing to record
    trace = pending.trace
    checked = list(pending.checked)
    shadowed = list(pending.shadowed)
    region = pending.profile.region
    lim = pending.limits
    if step.outcome == DAILY_LIMIT:
        if trace:
            checked.append(Check(DAILY_LIMIT, True,
                                 f"today's lesson time reached {lim.daily_max:g}s"))
        return Decision(False, DAILY_LIMIT, step.retry_after, None, tuple(shadowed),
                        tuple(checked), step, region, provisional=pending.provisional)
    if lim.daily_max is not None:
        daily_hit = DAILY_LIMIT in step.shadowed
        if trace:
            checked.append(Check(DAILY_LIMIT, daily_hit, f"daily_max {lim.daily_max:g}s"))
        if daily_hit:
            shadowed.append(DAILY_LIMIT)
    if step.outcome == BREAK_REQUIRED:
        if trace:
            checked.append(Check(BREAK_REQUIRED, True,
                                 f"the break lasts {lim.min_break:g}s after a lesson"))
        return Decision(False, BREAK_REQUIRED, step.retry_after, None, tuple(shadowed),
                        tuple(checked), step, region, provisional=pending.provisional)
    brk = BREAK_REQUIRED in step.shadowed
    if trace:
        checked.append(Check(BREAK_REQUIRED, brk,
                             "a new lesson starts" if step.started else "the lesson goes on"))
    if brk:
        shadowed.append(BREAK_REQUIRED)
    return _allowed(pending, step, tuple(shadowed), tuple(checked))


def _allowed(pending: Pending, step: Step, shadowed: tuple[str, ...],
             checked: tuple[Check, ...]) -> Decision:
    """An allowed step: the time left, and the rule that will end the lesson
    (the clock's answer: clock.step_deadline)."""
    d = step_deadline(step, pending.limits, pending.until_curfew)
    return Decision(True, None, None, d.at - step.now, shadowed, checked, step,
                    pending.profile.region, d.rule, pending.provisional, d.at)


def decide(policy: Policy, route: Route, student: Student, state: ClockState,
           now: float) -> tuple[Decision, ClockState]:
    """The whole decision for one request, given the student's clock state."""
    pre = precheck(policy, route, student, now, trace=True)
    if isinstance(pre, Decision):
        return pre, state
    step, new_state = advance(state, now, pre.limits, pre.day, pre.seconds_to_day_end)
    return finish(pre, step), new_state


def unavailable(pending: Pending, fail_open: bool) -> Decision:
    """The store did not answer: fail closed (503) or open (allowed, no clock:
    as long as a lesson starting now may run)."""
    checked = (*pending.checked, Check(STATE_UNAVAILABLE, True, "the state store did not answer"))
    if fail_open:
        now = pending.now
        d = lesson_deadline(ClockState(now, now), now, pending.limits, pending.day,
                            pending.until_curfew)
        return Decision(True, None, None, d.at - now, pending.shadowed, checked, None,
                        pending.profile.region, d.rule, pending.provisional, d.at)
    return Decision(False, STATE_UNAVAILABLE, None, None, pending.shadowed, checked, None,
                    pending.profile.region, provisional=pending.provisional)
