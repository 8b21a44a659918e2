"""gateway/rules.py: the pure engine, table-driven on an injected clock.

Every case builds its policy with parse_policy from a small YAML fragment and
gives times as wall-clock strings in the policy's zone (Asia/Shanghai unless
a case says otherwise). A case's `history` is a list of earlier requests
(allowed ones, on the same student's clock) that set up the state; the clock
transition itself (gateway/clock.py) has its own tests in tests/test_clock.py.

Dates used: 2026-03-03 is a Tuesday, 2026-03-06 a Friday, 2026-03-07/08 a
weekend; 2026-02-14 a make-up Saturday and 02-15..23 the Spring Festival
(the State Council's 2026 notice).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import cache
from zoneinfo import ZoneInfo

import pytest

from gateway.clock import ClockState
from gateway.policy import Policy, parse_policy
from gateway.rules import Decision, Pending, Student, decide, precheck, unavailable

SH = ZoneInfo("Asia/Shanghai")
URUMQI = ZoneInfo("Asia/Urumqi")

SUBJECT = "/classroom/subject/math/1"
ARTS = "/classroom/arts/drawing/1"
FORBIDDEN = "/api/photo-search"

# The contract's order of the rules on an enforced route.
ORDER = ["forbidden_feature", "identity_required", "bad_identity", "preschool", "curfew",
         "rest_day", "daily_limit", "break_required", "state_unavailable"]

ROUTES = """\
routes:
  - {prefix: /classroom/subject/, kind: lesson, category: subject}
  - {prefix: /classroom/arts/, kind: lesson, category: non_subject}
  - {prefix: /api/photo-search, kind: forbidden, feature: photo_search}
"""

REGION = """\
regions:
  650000:
    timezone: Asia/Urumqi
    curfew: {start: "22:00", end: "07:00"}
    rest_days:
      vacations: [{name: winter, start: 2027-01-10, end: 2027-02-20}]
"""
SENIOR_45 = "stages:\n  senior:\n    lesson: {max_duration: 45m}\n"
DAILY_1H = "daily_max: 1h\n"
SUMMER = "rest_days:\n  vacations: [{name: summer, start: 2026-07-11, end: 2026-08-31}]\n"


@cache
def policy(extra: str = "") -> Policy:
    return parse_policy("version: 1\ntimezone: Asia/Shanghai\n" + extra + ROUTES, "test.yaml")


def ts(local: str, tz: ZoneInfo = SH) -> float:
    """'2026-03-03 10:00' in `tz` -> Unix seconds."""
    return dt.datetime.fromisoformat(local).replace(tzinfo=tz).timestamp()


def span(first: str, last: str, step_minutes: int = 5) -> tuple[str, ...]:
    """Requests every few minutes from `first` to `last` inclusive: one unbroken lesson
    (a gap of min_break, 10 minutes, would end it quietly)."""
    a, b = dt.datetime.fromisoformat(first), dt.datetime.fromisoformat(last)
    out = []
    while a < b:
        out.append(a.isoformat(sep=" "))
        a += dt.timedelta(minutes=step_minutes)
    out.append(b.isoformat(sep=" "))
    return tuple(out)


# Two full lessons on a day: 10:00-10:30, break, 10:40-11:10.
def two_lessons(day: str) -> tuple[str, ...]:
    return span(f"{day} 10:00", f"{day} 10:29") + span(f"{day} 10:40", f"{day} 11:09")


def pupil(grade: int | str | None = 5, region: str | None = None) -> Student:
    return Student(key="k-pupil", grade=grade, region=region)  # type: ignore[arg-type]


MISSING = Student(problem="missing", why="no student id")
MALFORMED = Student(problem="malformed", why="student id must be 1-128 of A-Z a-z 0-9 -_.:@")


def run(p: Policy, path: str, student: Student, at: float, history: tuple[float, ...] = (),
        history_path: str | None = None) -> tuple[Decision, ClockState, ClockState]:
    """Replay `history` (all allowed) then decide `path` at `at`: (decision, before, after)."""
    state = ClockState()
    hroute = p.match(history_path or path)
    assert hroute is not None
    for h in history:
        d, state = decide(p, hroute, student, state, h)
        assert d.allowed, f"history request at {h} was denied: {d.rule}"
    route = p.match(path)
    assert route is not None
    d, after = decide(p, route, student, state, at)
    return d, state, after


@dataclass(frozen=True)
class Case:
    id: str
    at: str
    rule: str | None                     # None = allowed
    retry: float | None = None           # denied: retry_after seconds
    remaining: float | None = None       # allowed: lesson_remaining seconds
    path: str = SUBJECT
    student: Student = field(default_factory=pupil)
    history: tuple[str, ...] = ()
    history_path: str | None = None
    extra: str = ""
    tz: ZoneInfo = SH
    status: int | None = None            # checked when given


CASES = [
    # --- every rule code
    Case("forbidden_feature", "2026-03-03 10:00", "forbidden_feature", path=FORBIDDEN,
         student=MISSING, status=403),
    Case("forbidden_feature-identified", "2026-03-03 10:00", "forbidden_feature",
         path=FORBIDDEN, status=403),
    Case("identity_required", "2026-03-03 10:00", "identity_required", student=MISSING,
         status=401),
    Case("bad_identity", "2026-03-03 10:00", "bad_identity", student=MALFORMED, status=400),
    Case("preschool", "2026-03-03 10:00", "preschool", student=pupil("preschool"),
         status=403),
    Case("preschool-non-subject", "2026-03-03 10:00", "preschool", path=ARTS,
         student=pupil("preschool")),
    Case("curfew", "2026-03-03 23:30", "curfew", retry=6.5 * 3600, status=403),
    Case("curfew-non-subject", "2026-03-03 23:30", "curfew", path=ARTS, retry=6.5 * 3600),
    Case("rest_day-saturday", "2026-03-07 10:00", "rest_day", retry=(14 + 24) * 3600,
         status=403),
    Case("rest_day-sunday-evening", "2026-03-08 22:00", "rest_day", retry=2 * 3600),
    Case("daily_limit", "2026-03-03 11:20", "daily_limit", retry=12 * 3600 + 40 * 60,
         history=two_lessons("2026-03-03"), extra=DAILY_1H, status=429),
    Case("break_required", "2026-03-03 10:35", "break_required", retry=300,
         history=span("2026-03-03 10:00", "2026-03-03 10:29"), status=429),
    # --- allowed
    Case("allow-new-lesson", "2026-03-03 10:00", None, remaining=1800, status=200),
    Case("allow-lesson-goes-on", "2026-03-03 10:20", None, remaining=600,
         history=span("2026-03-03 10:00", "2026-03-03 10:15")),
    # min_break of quiet ends the lesson, and that quiet time was the break
    Case("quiet-just-under-min-break", "2026-03-03 10:13:59", None, remaining=1800 - 839,
         history=("2026-03-03 10:00", "2026-03-03 10:04")),
    Case("quiet-min-break-was-the-break", "2026-03-03 10:14", None, remaining=1800,
         history=("2026-03-03 10:00", "2026-03-03 10:04")),
    Case("allow-after-quiet-break", "2026-03-03 10:15", None, remaining=1800,
         history=("2026-03-03 10:00", "2026-03-03 10:05")),
    Case("allow-after-break", "2026-03-03 10:40", None, remaining=1800,
         history=span("2026-03-03 10:00", "2026-03-03 10:29")),
    Case("allow-friday-evening", "2026-03-06 20:00", None, remaining=1800),
    Case("non-subject-saturday", "2026-03-07 10:00", None, remaining=1800, path=ARTS),
    Case("non-subject-spring-festival", "2026-02-17 10:00", None, remaining=1800, path=ARTS),
    Case("non-subject-vacation", "2026-07-15 10:00", None, remaining=1800, path=ARTS,
         extra=SUMMER),
    Case("makeup-saturday-allows-subject", "2026-02-14 10:00", None, remaining=1800),
    Case("makeup-sunday-allows-subject", "2026-09-20 10:00", None, remaining=1800),
    Case("extra-workday-saturday", "2026-03-07 10:00", None, remaining=1800,
         extra="rest_days:\n  extra_workdays: [2026-03-07]\n"),
    # --- rest_day retry_after: to the local midnight that starts the next open day
    Case("rest-spring-festival", "2026-02-15 10:00", "rest_day",
         retry=14 * 3600 + 8 * 86400),                        # -> Tue 2026-02-24 00:00
    Case("rest-in-lieu-friday", "2026-02-20 18:00", "rest_day",
         retry=6 * 3600 + 3 * 86400),                         # -> Tue 2026-02-24 00:00
    Case("rest-strict-makeup-saturday", "2026-02-14 10:00", "rest_day",
         retry=14 * 3600 + 9 * 86400,                         # -> Tue 2026-02-24 00:00
         extra="rest_days:\n  makeup_days_are_rest_days: true\n"),
    Case("rest-friday-extra-holiday-before-weekend", "2026-12-04 20:00", "rest_day",
         retry=4 * 3600 + 2 * 86400,                          # -> Mon 2026-12-07 00:00
         extra="rest_days:\n  extra_holidays: [2026-12-04]\n"),
    Case("rest-national-day", "2026-10-01 09:00", "rest_day",
         retry=15 * 3600 + 6 * 86400),                        # -> Thu 2026-10-08 00:00
    Case("rest-before-makeup-saturday", "2026-10-09 20:00", None, remaining=1800),
    Case("rest-sunday-before-makeup-saturday", "2026-10-04 12:00", "rest_day",
         retry=12 * 3600 + 3 * 86400),                        # -> Thu 2026-10-08 00:00
    Case("rest-vacation", "2026-07-15 10:00", "rest_day",
         retry=14 * 3600 + 47 * 86400, extra=SUMMER),         # -> Tue 2026-09-01 00:00
    # --- stage and region overrides
    Case("senior-45m-new-lesson", "2026-03-03 10:00", None, remaining=2700,
         student=pupil(11), extra=SENIOR_45),
    Case("senior-45m-goes-on-past-30m", "2026-03-03 10:35", None, remaining=600,
         student=pupil(11), history=span("2026-03-03 10:00", "2026-03-03 10:30"),
         extra=SENIOR_45),
    Case("primary-30m-under-senior-override", "2026-03-03 10:35", "break_required", retry=300,
         student=pupil(5), history=span("2026-03-03 10:00", "2026-03-03 10:29"),
         extra=SENIOR_45),
    Case("region-curfew-in-region-zone", "2026-03-03 06:00", "curfew", retry=3600,
         student=pupil(5, "650000"), extra=REGION, tz=URUMQI),       # 08:00 in Shanghai
    Case("region-open-when-base-is-closed", "2026-03-03 21:40", None, remaining=1200,
         student=pupil(5, "650000"), extra=REGION, tz=URUMQI),       # 23:40 in Shanghai
    Case("base-closed-at-the-same-instant", "2026-03-03 23:40", "curfew",
         retry=6 * 3600 + 20 * 60, student=pupil(5), extra=REGION),
    Case("base-open-when-region-is-closed", "2026-03-03 08:00", None, remaining=1800,
         student=pupil(5), extra=REGION),
    Case("unknown-region-uses-base-curfew", "2026-03-03 23:40", "curfew",
         retry=6 * 3600 + 20 * 60, student=pupil(5, "110000"), extra=REGION),
    Case("region-vacation", "2027-01-12 10:00", "rest_day",
         retry=14 * 3600 + 40 * 86400,                        # -> Mon 2027-02-22 00:00
         student=pupil(5, "650000"), extra=REGION, tz=URUMQI),
    Case("base-no-region-vacation", "2027-01-12 10:00", None, remaining=1800,
         student=pupil(5), extra=REGION),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    """decide() answers each request with the expected rule, retry_after and lesson_remaining."""
    p = policy(case.extra)
    d, before, after = run(p, case.path, case.student, ts(case.at, case.tz),
                           tuple(ts(h, case.tz) for h in case.history), case.history_path)
    assert (d.allowed, d.rule) == (case.rule is None, case.rule)
    if case.status is not None:
        assert d.status == case.status
    if case.rule is None:
        assert d.retry_after is None
        assert d.lesson_remaining == pytest.approx(case.remaining)
    else:
        assert d.lesson_remaining is None
        if case.retry is None:
            assert d.retry_after is None
        else:
            assert d.retry_after == pytest.approx(case.retry)
        # a denial never extends a break or counts as lesson time
        assert after == before
        assert d.checked[-1].rule == case.rule
        assert d.checked[-1].applies is True


def test_region_of_the_decision() -> None:
    """A decision names the region profile used: the region's code, "other" for
    unknown codes, "base" for students without one."""
    p = policy(REGION)
    route = p.match(SUBJECT)
    assert route is not None
    now = ts("2026-03-03 10:00")
    known, _ = decide(p, route, pupil(5, "650000"), ClockState(), now)
    unknown, _ = decide(p, route, pupil(5, "110000"), ClockState(), now)
    none, _ = decide(p, route, pupil(5, None), ClockState(), now)
    assert (known.region, unknown.region, none.region) == ("650000", "other", "base")


# ---------------------------------------------------------------- decision order

ORDER_CASES = [
    # (id, at, path, student, history, history_path, extra, expected rule)
    ("forbidden>identity>curfew>rest", "2026-03-07 23:30", FORBIDDEN, MISSING, (), None, "",
     "forbidden_feature"),
    ("identity>curfew>rest", "2026-03-07 23:30", SUBJECT, MISSING, (), None, "",
     "identity_required"),
    ("bad_identity>curfew>rest", "2026-03-07 23:30", SUBJECT, MALFORMED, (), None, "",
     "bad_identity"),
    ("preschool>curfew>rest", "2026-03-07 23:30", SUBJECT, pupil("preschool"), (), None, "",
     "preschool"),
    ("curfew>rest", "2026-03-07 23:30", SUBJECT, pupil(), (), None, "", "curfew"),
    ("rest>daily>break", "2026-03-07 11:15", SUBJECT, pupil(),
     two_lessons("2026-03-07"), ARTS,
     DAILY_1H, "rest_day"),
    ("daily>break", "2026-03-03 11:15", SUBJECT, pupil(),
     two_lessons("2026-03-03"), None,
     DAILY_1H, "daily_limit"),
]


@pytest.mark.parametrize(("at", "path", "student", "history", "history_path", "extra", "rule"),
                         [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES])
def test_first_rule_in_contract_order_answers(at: str, path: str, student: Student,
                                              history: tuple[str, ...],
                                              history_path: str | None, extra: str,
                                              rule: str) -> None:
    """A request that breaks several rules is denied by the first in the contract's order,
    after checking the earlier rules in that order."""
    d, _, _ = run(policy(extra), path, student, ts(at), tuple(ts(h) for h in history),
                  history_path)
    assert d.rule == rule
    codes = [c.rule for c in d.checked]
    assert codes == [r for r in ORDER if r in codes]     # checked in the contract's order
    assert codes[-1] == rule
    assert [c.applies for c in d.checked] == [False] * (len(codes) - 1) + [True]


@pytest.mark.parametrize("extra", ["", DAILY_1H], ids=["no-daily-max", "daily-max"])
def test_allowed_request_checks_every_rule_in_order(extra: str) -> None:
    """An allowed lesson request lists every rule it checked, in order, none applying."""
    d, _, _ = run(policy(extra), SUBJECT, pupil(), ts("2026-03-03 10:00"))
    assert d.allowed
    codes = [c.rule for c in d.checked]
    want = [r for r in ORDER if r != "state_unavailable"
            and (r != "daily_limit" or extra)]
    assert codes == want
    assert not any(c.applies for c in d.checked)
    assert all(c.why for c in d.checked)


# ---------------------------------------------------------------- curfew windows

CURFEWS = [
    # (start, end, local time, inside, retry_after)
    ("23:00", "06:00", "2026-03-03 22:30", False, None),
    ("23:00", "06:00", "2026-03-03 22:59:59", False, None),
    ("23:00", "06:00", "2026-03-03 23:00", True, 7 * 3600),
    ("23:00", "06:00", "2026-03-03 23:30", True, 6.5 * 3600),
    ("23:00", "06:00", "2026-03-04 00:00", True, 6 * 3600),
    ("23:00", "06:00", "2026-03-04 05:59", True, 60),
    ("23:00", "06:00", "2026-03-04 05:59:59", True, 1),
    ("23:00", "06:00", "2026-03-04 06:00", False, None),
    ("21:00", "06:00", "2026-03-03 20:59", False, None),
    ("21:00", "06:00", "2026-03-03 21:00", True, 9 * 3600),
    ("12:00", "14:00", "2026-03-03 11:59", False, None),
    ("12:00", "14:00", "2026-03-03 12:00", True, 2 * 3600),
    ("12:00", "14:00", "2026-03-03 13:00", True, 3600),
    ("12:00", "14:00", "2026-03-03 13:59:30", True, 30),
    ("12:00", "14:00", "2026-03-03 14:00", False, None),
    ("12:00", "14:00", "2026-03-03 23:30", False, None),
    ("12:00", "14:00", "2026-03-04 03:00", False, None),
]


@pytest.mark.parametrize(("start", "end", "at", "inside", "retry"), CURFEWS,
                         ids=[f"{s}-{e}@{a[-8:].strip()}{'-next' if a[8:10] == '04' else ''}"
                              for s, e, a, _, _ in CURFEWS])
def test_curfew_window(start: str, end: str, at: str, inside: bool,
                       retry: float | None) -> None:
    """Inside the window (crossing midnight when start > end) is curfew until the end time."""
    p = policy(f'curfew:\n  start: "{start}"\n  end: "{end}"\n')
    d, _, _ = run(p, ARTS, pupil(), ts(at))
    if inside:
        assert d.rule == "curfew"
        assert d.retry_after == pytest.approx(retry)
    else:
        assert d.allowed


# ---------------------------------------------------------------- lesson remaining

REMAINING = [
    # (id, at, history, extra, remaining, end_rule)
    ("curfew-cuts-22:50", "2026-03-03 22:50", (), "", 600, "curfew"),
    ("curfew-cuts-22:45:30", "2026-03-03 22:45:30", (), "", 870, "curfew"),
    ("limit-first-22:20", "2026-03-03 22:20", (), "", 1800, "lesson_limit"),
    ("limit-first-ongoing", "2026-03-03 22:45", span("2026-03-03 22:20", "2026-03-03 22:40"), "",
     300,
     "lesson_limit"),
    ("curfew-first-ongoing", "2026-03-03 22:50", ("2026-03-03 22:40", "2026-03-03 22:45"), "",
     600, "curfew"),
    ("curfew-within-a-day", "2026-03-03 11:45", (),
     'curfew:\n  start: "12:00"\n  end: "14:00"\n', 900, "curfew"),
    ("daily-max-first", "2026-03-03 10:40", span("2026-03-03 10:00", "2026-03-03 10:29"),
     "daily_max: 50m\n", 1200, "daily_limit"),
    ("mid-lesson", "2026-03-03 10:10", ("2026-03-03 10:00", "2026-03-03 10:05"), "", 1200,
     "lesson_limit"),
]


@pytest.mark.parametrize(("at", "history", "extra", "remaining", "end_rule"),
                         [r[1:] for r in REMAINING], ids=[r[0] for r in REMAINING])
def test_lesson_remaining_is_bounded_by_the_curfew(at: str, history: tuple[str, ...], extra: str,
                                                   remaining: float, end_rule: str) -> None:
    """lesson_remaining is the time to the lesson limit, the curfew or the daily max,
    whichever comes first, and end_rule names it."""
    d, _, _ = run(policy(extra), SUBJECT, pupil(), ts(at), tuple(ts(h) for h in history))
    assert d.allowed
    assert d.lesson_remaining == pytest.approx(remaining)
    assert d.end_rule == end_rule


# ---------------------------------------------------------------- daily max across lessons

Step = tuple[str, str | None, float | None]


def fill(first: str, last: str) -> list[Step]:
    """Allowed requests every 5 minutes, values unchecked, to keep a lesson going."""
    return [(t, None, None) for t in span(first, last)]


# Steps of one student's day: (local time, expected rule, lesson_remaining or retry_after).
DAILY_SEQUENCES: dict[str, tuple[str, list[Step]]] = {
    "1h-two-lessons": ("daily_max: 1h\n", [
        ("2026-03-03 10:00", None, 1800.0),
        *fill("2026-03-03 10:05", "2026-03-03 10:25"),
        ("2026-03-03 10:29", None, 60.0),
        ("2026-03-03 10:35", "break_required", 300.0),
        ("2026-03-03 10:40", None, 1800.0),
        *fill("2026-03-03 10:45", "2026-03-03 11:05"),
        ("2026-03-03 11:09", None, 60.0),
        ("2026-03-03 11:15", "daily_limit", 12 * 3600 + 45 * 60.0),
        ("2026-03-03 11:25", "daily_limit", 12 * 3600 + 35 * 60.0),
        ("2026-03-03 20:00", "daily_limit", 4 * 3600.0),
        ("2026-03-04 10:00", None, 1800.0),           # a new local day
    ]),
    "50m-cut-short": ("daily_max: 50m\n", [
        ("2026-03-03 10:00", None, 1800.0),
        *fill("2026-03-03 10:05", "2026-03-03 10:29"),
        ("2026-03-03 10:40", None, 1200.0),           # 30 min used, 20 left
        *fill("2026-03-03 10:45", "2026-03-03 10:55"),
        ("2026-03-03 10:59", None, 60.0),
        ("2026-03-03 11:00", "daily_limit", 13 * 3600.0),
    ]),
    "quiet-lessons-count": ("daily_max: 20m\n", [
        ("2026-03-03 08:00", None, 1200.0),
        ("2026-03-03 08:09", None, 660.0),            # the lesson ends quietly after this
        ("2026-03-03 08:30", None, 660.0),            # 9 min used, 11 left
        ("2026-03-03 08:39", None, 120.0),
        ("2026-03-03 08:41", "daily_limit", 15 * 3600 + 19 * 60.0),
    ]),
}


@pytest.mark.parametrize("name", list(DAILY_SEQUENCES))
def test_daily_max_across_lessons(name: str) -> None:
    """Lesson time adds up over a local day; at daily_max the answer is daily_limit until
    the next local midnight."""
    extra, steps = DAILY_SEQUENCES[name]
    p = policy(extra)
    route = p.match(SUBJECT)
    assert route is not None
    state = ClockState()
    for at, rule, seconds in steps:
        d, state = decide(p, route, pupil(), state, ts(at))
        assert d.rule == rule, at
        if seconds is not None:
            got = d.lesson_remaining if rule is None else d.retry_after
            assert got == pytest.approx(seconds), at


# ---------------------------------------------------------------- shadow mode

SHADOW_CASES = [c for c in CASES if c.rule is not None]


@pytest.mark.parametrize("case", SHADOW_CASES, ids=[c.id for c in SHADOW_CASES])
def test_shadow_mode_denies_nothing(case: Case) -> None:
    """With mode: shadow every request that enforce mode denies is allowed, and the
    rule that would have denied it is listed as shadowed."""
    d, _, _ = run(policy("mode: shadow\n" + case.extra), case.path, case.student,
                  ts(case.at, case.tz), tuple(ts(h, case.tz) for h in case.history),
                  case.history_path)
    assert d.allowed
    assert d.rule is None
    assert case.rule in d.shadowed


SHADOW_ALL = [
    # (id, at, path, student, history, extra, shadowed)
    ("preschool-curfew-rest", "2026-03-07 23:30", SUBJECT, pupil("preschool"), (), "",
     ("preschool", "curfew", "rest_day")),
    ("break", "2026-03-03 10:35", SUBJECT, pupil(),
     span("2026-03-03 10:00", "2026-03-03 10:29"),
     "", ("break_required",)),
    ("daily-and-break", "2026-03-03 11:15", SUBJECT, pupil(),
     two_lessons("2026-03-03"),
     DAILY_1H, ("daily_limit", "break_required")),
    ("nothing", "2026-03-03 10:00", SUBJECT, pupil(), (), "", ()),
]


@pytest.mark.parametrize(("at", "path", "student", "history", "extra", "shadowed"),
                         [c[1:] for c in SHADOW_ALL], ids=[c[0] for c in SHADOW_ALL])
def test_shadow_mode_lists_every_shadowed_rule(at: str, path: str, student: Student,
                                               history: tuple[str, ...], extra: str,
                                               shadowed: tuple[str, ...]) -> None:
    """In shadow mode the decision lists, in order, every rule that would have denied."""
    d, _, _ = run(policy("mode: shadow\n" + extra), path, student, ts(at),
                  tuple(ts(h) for h in history))
    assert d.allowed
    assert d.shadowed == shadowed
    # ...and `checked` agrees: exactly the shadowed rules applied
    assert tuple(c.rule for c in d.checked if c.applies) == shadowed


SHADOW_ONE = [
    # (id, at, student, allowed, rule, shadowed)
    ("curfew-shadowed", "2026-03-03 23:30", pupil(), True, None, ("curfew",)),
    ("rest-day-still-denies", "2026-03-07 23:30", pupil(), False, "rest_day", ("curfew",)),
    ("preschool-still-denies", "2026-03-03 23:30", pupil("preschool"), False, "preschool", ()),
    ("daytime-nothing-shadowed", "2026-03-03 10:00", pupil(), True, None, ()),
]


@pytest.mark.parametrize(("at", "student", "allowed", "rule", "shadowed"),
                         [c[1:] for c in SHADOW_ONE], ids=[c[0] for c in SHADOW_ONE])
def test_shadow_rules_shadow_only_the_listed_rule(at: str, student: Student, allowed: bool,
                                                  rule: str | None,
                                                  shadowed: tuple[str, ...]) -> None:
    """shadow_rules: [curfew] lets curfew requests through but enforces every other rule."""
    d, _, _ = run(policy("shadow_rules: [curfew]\n"), SUBJECT, student, ts(at))
    assert (d.allowed, d.rule, d.shadowed) == (allowed, rule, shadowed)


def test_shadowed_break_starts_a_new_lesson() -> None:
    """A shadowed break_required lets a new lesson start (the clock runs on)."""
    d, before, after = run(policy("shadow_rules: [break_required]\n"), SUBJECT, pupil(),
                           ts("2026-03-03 10:35"),
                           tuple(ts(h) for h in span("2026-03-03 10:00", "2026-03-03 10:29")))
    assert d.allowed
    assert d.shadowed == ("break_required",)
    assert d.lesson_remaining == pytest.approx(1800)
    assert after.start == ts("2026-03-03 10:35") != before.start


# ---------------------------------------------------------------- state_unavailable

@pytest.mark.parametrize(("fail_open", "at", "allowed", "rule", "status", "remaining"), [
    (False, "2026-03-03 10:00", False, "state_unavailable", 503, None),
    (True, "2026-03-03 10:00", True, None, 200, 1800),
    (True, "2026-03-03 22:50", True, None, 200, 600),
], ids=["fail-closed", "fail-open", "fail-open-before-curfew"])
def test_state_unavailable(fail_open: bool, at: str, allowed: bool, rule: str | None,
                           status: int, remaining: float | None) -> None:
    """Without the state store, fail_closed denies with state_unavailable and fail_open
    allows with the lesson bounded by max_duration and the curfew."""
    p = policy()
    route = p.match(SUBJECT)
    assert route is not None
    pending = precheck(p, route, pupil(), ts(at))
    assert isinstance(pending, Pending)
    d = unavailable(pending, fail_open)
    assert (d.allowed, d.rule, d.status) == (allowed, rule, status)
    assert d.retry_after is None
    assert d.lesson_remaining == (None if remaining is None else pytest.approx(remaining))
    assert d.checked[-1].rule == "state_unavailable"


def test_precheck_denial_comes_before_the_store() -> None:
    """A request the static rules deny is answered by precheck without the lesson clock."""
    p = policy()
    route = p.match(SUBJECT)
    assert route is not None
    d = precheck(p, route, pupil(), ts("2026-03-03 23:30"))
    assert isinstance(d, Decision)
    assert d.rule == "curfew"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fast_precheck_agrees_with_the_traced_one(case: Case) -> None:
    """The hot path's precheck (no trace) gives the same answer as the traced
    one explain uses: same rule, retry_after, region and clock inputs."""
    p = policy(case.extra)
    route = p.match(case.path)
    assert route is not None
    at = ts(case.at, case.tz) + 0.37   # not on a whole second: the facts cache shifts by it
    fast = precheck(p, route, case.student, at)
    traced = precheck(p, route, case.student, at, trace=True)
    assert type(fast) is type(traced)
    if isinstance(fast, Decision):
        assert isinstance(traced, Decision)
        assert (fast.allowed, fast.rule, fast.region) == (traced.allowed, traced.rule,
                                                           traced.region)
        assert fast.retry_after == pytest.approx(traced.retry_after)
    else:
        assert isinstance(traced, Pending)
        assert (fast.profile, fast.limits, fast.day) == (traced.profile, traced.limits,
                                                         traced.day)
        assert fast.seconds_to_day_end == pytest.approx(traced.seconds_to_day_end)
        assert fast.until_curfew == pytest.approx(traced.until_curfew)
