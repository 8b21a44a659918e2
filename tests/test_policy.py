"""gateway/policy.py: parse_policy / load_policy, their problems and the compiled profiles.

Every bad policy lives in tests/fixtures/bad/ (one file per kind of error) and
is asserted against its field path, message and exact line, the way
`tutorgate check` reports it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest

from gateway.errors import PolicyError
from gateway.policy import SHADOWABLE, Policy, load_policy, parse_policy, stage_of

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"
GOOD = FIXTURES / "good"

ROUTES = """\
routes:
  - {prefix: /classroom/subject/, kind: lesson, category: subject}
"""


def policy(body: str = "", routes: str = ROUTES) -> Policy:
    """A policy from a YAML fragment (top-level keys) plus one subject route."""
    return parse_policy("version: 1\n" + body + routes, "test.yaml")


# ---------------------------------------------------------------- bad policies


class Problem(NamedTuple):
    path: str | None      # field path; None = not pinned (the message carries the place)
    message: str          # the exact message, or a fragment of it when exact=False
    line: int
    exact: bool = False


# One fixture per kind of error, each with every problem it must produce.
BAD_CASES: dict[str, list[Problem]] = {
    "unknown-key-top": [Problem("timezon", "unknown key; did you mean timezone?", 2,
                                exact=True)],
    "unknown-key-misspelled": [
        Problem("lesson.max_duraton", "unknown key; did you mean max_duration?", 3, exact=True),
        Problem("regions.650000.curfew.strat", "unknown key; did you mean start?", 6,
                exact=True)],
    "unknown-key-nested": [Problem("lesson.max_lenght", "unknown key", 4, exact=True)],
    "missing-version": [Problem("version", "required", 1, exact=True)],
    "missing-routes": [Problem("routes", "required", 1, exact=True)],
    "duration-words": [Problem("lesson.max_duration",
                               "a duration is an integer with a unit s, m or h", 3)],
    "duration-no-unit-string": [Problem("lesson.max_duration",
                                        "a duration is an integer with a unit s, m or h", 3)],
    "duration-bare-int": [Problem("lesson.min_break",
                                  "a duration is an integer with a unit s, m or h", 3)],
    "duration-zero": [Problem("lesson.min_break", "must be > 0s", 4, exact=True)],
    "time-unquoted": [Problem("curfew.start", "quoted", 3)],
    "time-out-of-range": [Problem("curfew.end", "'25:61' is not a time of day", 4)],
    "curfew-empty": [Problem("curfew", "curfew start and end are equal", 2)],
    "timezone-unknown": [Problem("timezone", "unknown time zone 'Asia/Beijing'", 2)],
    "date-not-a-date": [Problem("rest_days.extra_holidays[1]",
                                "a date is YYYY-MM-DD, got 'next monday'", 3)],
    # 2026-02-30 looks like a YAML timestamp but is no date: still a problem
    # with a line, never a crash.
    "date-impossible": [Problem(None, "2026-02-30", 4)],
    "vacation-reversed": [Problem("rest_days.vacations[1]",
                                  "vacation 'summer' ends (2027-07-10) before it starts "
                                  "(2027-08-31)", 5, exact=True)],
    "extra-both-lists": [Problem("rest_days",
                                 "dates in both extra_holidays and extra_workdays: 2026-12-02",
                                 2, exact=True)],
    "route-prefix-no-slash": [Problem("routes[1]", "prefix must start with '/'", 4)],
    "route-lesson-no-category": [Problem("routes[0]", "a lesson route needs category", 3)],
    "route-forbidden-with-category": [Problem("routes[1]", "a forbidden route has no category",
                                              4)],
    "region-bad-timezone": [Problem("regions.540000.timezone",
                                    "unknown time zone 'Tibet/Lhasa'", 6)],
    # The contract's "a date in both extra lists is an error" holds for a
    # region's own lists too.
    "region-both-lists": [Problem("regions.650000.rest_days",
                                  "dates in both extra_holidays and extra_workdays: 2026-12-01",
                                  4)],
    "stage-unknown": [Problem("stages.kindergarten", "'primary', 'junior' or 'senior'", 5)],
    "shadow-unknown-rule": [Problem("shadow_rules[1]", "'break_required'", 4)],
    "jwt-no-section": [Problem("identity", "source: jwt needs a jwt: section", 2)],
    "jwt-both-keys": [Problem("identity.jwt", "give exactly one of key_file or key_env", 4,
                              exact=True)],
    "jwt-no-key": [Problem("identity.jwt", "give exactly one of key_file or key_env", 4,
                           exact=True)],
    "calendar-file-missing": [Problem("rest_days.calendar_files[0]",
                                      "cannot read calendars/cn-2099.yaml", 4)],
    "calendar-file-invalid": [Problem("rest_days.calendar_files[0]",
                                      "calendars/cn-2027-invalid.yaml: workday: unknown key", 3)],
    "not-a-mapping": [Problem("", "a policy is a YAML mapping", 1)],
    "yaml-syntax": [Problem("", "not valid YAML", 4)],
}


def test_every_bad_fixture_has_expectations() -> None:
    """Each file in tests/fixtures/bad/ is covered by the table and vice versa."""
    assert {p.stem for p in BAD.glob("*.yaml")} == set(BAD_CASES)


@pytest.mark.parametrize(("name", "expected"), BAD_CASES.items(), ids=list(BAD_CASES))
def test_bad_policy_reports_each_problem_with_its_line(name: str,
                                                       expected: list[Problem]) -> None:
    """A bad policy raises PolicyError naming every problem's field, message and line."""
    path = BAD / f"{name}.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert err.source == str(path)
    assert len(err.problems) == len(expected), err.problems
    for (got_path, got_msg, got_line), want in zip(err.problems, expected, strict=True):
        if want.path is not None:
            assert got_path == want.path
        if want.exact:
            assert got_msg == want.message
        else:
            assert want.message in got_msg
        assert got_line == want.line
    # ...and renders one `FILE: field.path: message (line N)` line per problem.
    assert err.lines() == [f"{path}: {p or '<root>'}: {m} (line {ln})"
                           for p, m, ln in err.problems]


def test_policy_error_line_format() -> None:
    """PolicyError.lines() is exactly `FILE: field.path: message (line N)`."""
    with pytest.raises(PolicyError) as info:
        load_policy(BAD / "duration-zero.yaml")
    assert info.value.lines() == [f"{BAD / 'duration-zero.yaml'}: lesson.min_break: "
                                  "must be > 0s (line 4)"]


def test_all_problems_are_reported_at_once() -> None:
    """A policy missing both version and routes gets one problem for each."""
    with pytest.raises(PolicyError) as info:
        parse_policy("timezone: Asia/Shanghai\n", "p.yaml")
    assert [(p, m) for p, m, _ in info.value.problems] == [("version", "required"),
                                                           ("routes", "required")]


@pytest.mark.parametrize("text", ["", "just a string\n", "42\n"], ids=["empty", "str", "int"])
def test_non_mapping_documents_are_refused(text: str) -> None:
    """An empty or scalar document is a PolicyError, not a crash."""
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.problems[0][:2] == ("", "a policy is a YAML mapping (version, routes, ...)")


def test_calendar_files_need_a_reader() -> None:
    """Naming calendar files in a policy parsed from bare text is a problem at that entry."""
    with pytest.raises(PolicyError) as info:
        policy("rest_days:\n  calendar_files: [cn-2027.yaml]\n")
    assert info.value.problems == [("rest_days.calendar_files[0]",
                                    "calendar files need a policy loaded from a file", 3)]


def test_calendar_file_with_a_workday_outside_its_year_is_refused() -> None:
    """A calendar file's make-up workdays must lie in its year."""
    files = {"cn-2027.yaml": "year: 2027\nworkdays: [2026-02-14]\n"}
    with pytest.raises(PolicyError) as info:
        parse_policy("version: 1\nrest_days:\n  calendar_files: [cn-2027.yaml]\n" + ROUTES,
                     "p.yaml", files.__getitem__)
    ((path, msg, line),) = info.value.problems
    assert (path, line) == ("rest_days.calendar_files[0]", 3)
    assert "workday 2026-02-14 is not in 2027" in msg


# ---------------------------------------------------------------- good policies


def test_omitted_sections_take_the_national_defaults() -> None:
    """With only version and routes, the defaults are 30m/10m, 23:00-06:00, weekends+statutory."""
    p = policy()
    prof = p.profile(None, None)
    assert prof.tz.key == "Asia/Shanghai"
    assert (prof.curfew_start, prof.curfew_end) == (dt.time(23, 0), dt.time(6, 0))
    assert (prof.limits.max_duration, prof.limits.min_break, prof.limits.daily_max) == \
        (1800, 600, None)
    assert prof.calendar.weekends is True
    assert prof.calendar.statutory_holidays is True
    assert prof.calendar.makeup_days_are_rest_days is False
    ident = p.identity
    assert (ident.source, ident.student_header, ident.grade_header, ident.region_header) == \
        ("header", "X-Student-Id", "X-Student-Grade", "X-Student-Region")
    assert (p.model.mode, p.fail_open, p.shadow) == ("enforce", False, frozenset())
    # the defaults act: a Saturday and a Spring Festival weekday are rest days
    assert prof.calendar.rest_day(dt.date(2026, 3, 7)) is not None
    assert prof.calendar.rest_day(dt.date(2026, 2, 17)) is not None
    assert prof.calendar.rest_day(dt.date(2026, 3, 3)) is None


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("45m", 2700), (" 2h ", 7200),
], ids=["90s", "30m", "1h", "45m", "padded"])
def test_durations_parse_to_seconds(text: str, seconds: int) -> None:
    """An integer with s, m or h is that many seconds."""
    p = policy(f"lesson:\n  max_duration: \"{text}\"\n")
    assert p.profile(None, None).limits.max_duration == seconds


@pytest.mark.parametrize(("start", "end", "want"), [
    ("22:00", "07:00", (dt.time(22), dt.time(7))),
    ("21:30:15", "06:00", (dt.time(21, 30, 15), dt.time(6))),
    ("12:00", "14:00", (dt.time(12), dt.time(14))),
], ids=["crosses-midnight", "with-seconds", "within-one-day"])
def test_curfew_times_parse(start: str, end: str, want: tuple[dt.time, dt.time]) -> None:
    """Quoted HH:MM and HH:MM:SS curfew times are kept as given."""
    prof = policy(f'curfew:\n  start: "{start}"\n  end: "{end}"\n').profile(None, None)
    assert (prof.curfew_start, prof.curfew_end) == want


REGIONS = """\
daily_max: 2h
rest_days:
  extra_holidays: [2026-12-01]
regions:
  650000:
    timezone: Asia/Urumqi
    curfew: {start: "22:00", end: "07:00"}
    rest_days:
      vacations: [{name: winter, start: 2027-01-10, end: 2027-02-20}]
  "540000":
    lesson: {max_duration: 20m}
    daily_max: 1h
stages:
  senior:
    lesson: {max_duration: 45m}
  primary:
    daily_max: 90m
"""


def test_region_override_compiles_into_its_profile() -> None:
    """A region's timezone, curfew and vacations replace the base's; the rest is inherited."""
    p = policy(REGIONS)
    prof = p.profile("650000", None)
    assert prof.region == "650000"
    assert prof.tz.key == "Asia/Urumqi"
    assert (prof.curfew_start, prof.curfew_end) == (dt.time(22), dt.time(7))
    assert [(v.name, v.start, v.end) for v in prof.calendar.vacations] == \
        [("winter", dt.date(2027, 1, 10), dt.date(2027, 2, 20))]
    # not overridden: base extra holidays, lesson limits and daily max
    assert prof.calendar.rest_day(dt.date(2026, 12, 1)) is not None
    assert (prof.limits.max_duration, prof.limits.min_break, prof.limits.daily_max) == \
        (1800, 600, 7200)
    # the base keeps its own
    base = p.profile(None, None)
    assert (base.tz.key, base.curfew_start, base.region) == ("Asia/Shanghai", dt.time(23), "base")
    assert [v.name for v in base.calendar.vacations] == ["winter"]
    assert base.calendar.vacations[0].start == dt.date(2027, 1, 23)


def test_integer_region_keys_are_region_codes() -> None:
    """An unquoted 650000 region key is the code "650000"."""
    p = policy(REGIONS)
    assert p.knows_region("650000")
    assert p.knows_region("540000")
    assert not p.knows_region("110000")


def test_region_lesson_and_daily_overrides() -> None:
    """A region's lesson max_duration and daily_max apply to every stage without its own."""
    lim = policy(REGIONS).profile("540000", "junior").limits
    assert (lim.max_duration, lim.min_break, lim.daily_max) == (1200, 600, 3600)


@pytest.mark.parametrize(("stage", "want"), [
    (None, (1800, 600, 7200)),
    ("primary", (1800, 600, 5400)),
    ("junior", (1800, 600, 7200)),
    ("senior", (2700, 600, 7200)),
])
def test_stage_override_sets_lesson_limits(stage: str | None,
                                           want: tuple[int, int, int]) -> None:
    """Stage lesson limits and daily_max override the base for that stage only."""
    lim = policy(REGIONS).profile(None, stage).limits
    assert (lim.max_duration, lim.min_break, lim.daily_max) == want


def test_stage_override_applies_inside_a_region() -> None:
    """A senior student in region 650000 gets the region's curfew and the senior lesson."""
    prof = policy(REGIONS).profile("650000", "senior")
    assert prof.tz.key == "Asia/Urumqi"
    assert prof.limits.max_duration == 2700


@pytest.mark.parametrize("region", ["110000", "", "unknown"])
def test_unknown_region_falls_back_to_base(region: str) -> None:
    """A region code the policy does not list gets the base settings for the same
    stage, labelled "other" (metric labels come from a closed list)."""
    p = policy(REGIONS)
    other, base = p.profile(region, "senior"), p.profile(None, "senior")
    assert replace(other, region="base") == base
    assert p.profile(region, None).region == "other"
    assert "other" in p.region_labels() and "650000" in p.region_labels()


@pytest.mark.parametrize(("grade", "stage"), [
    (None, None), (1, "primary"), (6, "primary"), (7, "junior"), (9, "junior"),
    (10, "senior"), (12, "senior"),
])
def test_stage_of_grade(grade: int | None, stage: str | None) -> None:
    """Grades 1-6 are primary, 7-9 junior, 10-12 senior."""
    assert stage_of(grade) == stage


ORDERED_ROUTES = """\
routes:
  - {prefix: /classroom/, kind: lesson, category: non_subject}
  - {prefix: /classroom/subject/, kind: lesson, category: subject}
  - {prefix: /api/photo-search, kind: forbidden, feature: photo_search}
  - {prefix: /live, kind: lesson, category: subject}
"""


@pytest.mark.parametrize(("path", "want"), [
    ("/classroom/subject/math", ("/classroom/", "non_subject")),
    ("/classroom/arts/1", ("/classroom/", "non_subject")),
    ("/api/photo-search?q=1", ("/api/photo-search", "forbidden")),
    ("/api/photo-searcher", ("/api/photo-search", "forbidden")),
    ("/livestream/9", ("/live", "subject")),
    ("/class", None),
    ("/", None),
], ids=["first-wins", "first", "forbidden", "plain-prefix", "no-slash-prefix", "partial",
        "root"])
def test_route_first_match_wins(path: str, want: tuple[str, str] | None) -> None:
    """The first route whose prefix the path starts with answers; no match is None."""
    r = policy(routes=ORDERED_ROUTES).match(path)
    assert (None if r is None else (r.prefix, r.category)) == want


def test_route_fields_compile() -> None:
    """A forbidden route keeps its feature; its category is "forbidden"."""
    p = policy(routes=ORDERED_ROUTES)
    r = p.match("/api/photo-search")
    assert r is not None
    assert (r.kind, r.category, r.feature) == ("forbidden", "forbidden", "photo_search")


@pytest.mark.parametrize(("body", "want"), [
    ("mode: shadow\n", frozenset(SHADOWABLE)),
    ("shadow_rules: [curfew]\n", frozenset({"curfew"})),
    ("shadow_rules: [rest_day, daily_limit]\n", frozenset({"rest_day", "daily_limit"})),
    ("", frozenset()),
], ids=["mode-shadow", "one-rule", "two-rules", "enforce"])
def test_shadow_rules_compile(body: str, want: frozenset[str]) -> None:
    """mode: shadow shadows every rule; shadow_rules shadows only the listed ones."""
    p = policy(body)
    assert p.shadow == want
    assert p.is_shadowed("curfew") == ("curfew" in want)


def test_failure_mode_open() -> None:
    """failure_mode: fail_open makes Policy.fail_open true."""
    assert policy("failure_mode: fail_open\n").fail_open is True


def test_calendar_files_supply_a_year() -> None:
    """A policy's calendar file makes 2027 covered, with its holidays and make-up days."""
    p = load_policy(GOOD / "with-2027.yaml")
    cal = p.profile(None, None).calendar
    assert p.national.covers(dt.date(2027, 6, 1))
    assert p.national.covered_until == dt.date(2027, 12, 31)
    assert cal.covers(dt.date(2027, 2, 8))
    rest = cal.rest_day(dt.date(2027, 2, 8))  # a Monday inside the supplied Spring Festival
    assert rest is not None
    assert (rest.reason, rest.name) == ("holiday", "Spring Festival")
    assert cal.rest_day(dt.date(2027, 2, 20)) is None  # a supplied make-up Saturday
    assert cal.rest_day(dt.date(2027, 2, 27)) is not None  # an ordinary Saturday


def test_calendar_files_are_read_relative_to_the_policy() -> None:
    """parse_policy hands each calendar file's path to read_file as written."""
    asked: list[str] = []

    def read(rel: str) -> str:
        asked.append(rel)
        return (GOOD / rel).read_text(encoding="utf-8")

    p = parse_policy((GOOD / "with-2027.yaml").read_text(encoding="utf-8"), "x.yaml", read)
    assert asked == ["calendars/cn-2027.yaml"]
    assert p.national.covers(dt.date(2027, 1, 1))


def test_sha_follows_the_text() -> None:
    """The policy sha changes with the text and is stable for the same text."""
    assert policy().sha == policy().sha
    assert policy().sha != policy("mode: shadow\n").sha
