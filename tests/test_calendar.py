"""gateway/calendar.py: rest days from weekends, the national calendar, extras and vacations.

The expected 2026 days are the State Council's published notice, not
values read back from the package.
"""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.calendar import (
    CalendarYear,
    Holiday,
    NationalCalendar,
    RestCalendar,
    RestDay,
    Vacation,
    law_days,
    missing_law_days,
)

D = dt.date


def cal(*, weekends: bool = True, statutory: bool = True, extra_holidays: tuple[D, ...] = (),
        extra_workdays: tuple[D, ...] = (), vacations: tuple[Vacation, ...] = (),
        national: NationalCalendar | None = None, strict: bool = False) -> RestCalendar:
    return RestCalendar(weekends=weekends, statutory_holidays=statutory,
                        extra_holidays=frozenset(extra_holidays),
                        extra_workdays=frozenset(extra_workdays), vacations=vacations,
                        national=national or NationalCalendar(),
                        makeup_days_are_rest_days=strict)


def days(first: D, last: D) -> list[D]:
    return [first + dt.timedelta(n) for n in range((last - first).days + 1)]


SPRING_FESTIVAL_2026 = days(D(2026, 2, 15), D(2026, 2, 23))
NATIONAL_DAY_2026 = days(D(2026, 10, 1), D(2026, 10, 7))
MAKEUP_DAYS_2026 = [D(2026, 1, 4), D(2026, 2, 14), D(2026, 2, 28), D(2026, 5, 9),
                    D(2026, 9, 20), D(2026, 10, 10)]


# ---------------------------------------------------------------- 2026 official schedule


@pytest.mark.parametrize("day", SPRING_FESTIVAL_2026, ids=str)
def test_spring_festival_2026_days_are_holidays(day: D) -> None:
    """Every day 2026-02-15..23 is a Spring Festival holiday, weekdays and weekend alike."""
    rest = cal().rest_day(day)
    assert rest is not None
    assert (rest.date, rest.reason, rest.name) == (day, "holiday", "Spring Festival")


@pytest.mark.parametrize("day", NATIONAL_DAY_2026, ids=str)
def test_national_day_2026_days_are_holidays(day: D) -> None:
    """Every day 2026-10-01..07 is a National Day holiday."""
    rest = cal().rest_day(day)
    assert rest is not None
    assert (rest.reason, rest.name) == ("holiday", "National Day")


def test_day_off_in_lieu_is_a_holiday() -> None:
    """Friday 2026-02-20, a day off in lieu, is a holiday even with weekends off."""
    rest = cal(weekends=False).rest_day(D(2026, 2, 20))
    assert rest is not None
    assert rest.reason == "holiday"


@pytest.mark.parametrize("day", MAKEUP_DAYS_2026, ids=str)
def test_makeup_working_days_are_school_days_by_default(day: D) -> None:
    """An official make-up working day (调休) on a weekend is not a rest day."""
    assert day.weekday() >= 5  # the fact under test: a Saturday or Sunday
    assert cal().rest_day(day) is None


@pytest.mark.parametrize("day", MAKEUP_DAYS_2026, ids=str)
def test_makeup_working_days_are_rest_days_in_the_strict_reading(day: D) -> None:
    """With makeup_days_are_rest_days, an official make-up working day is a rest day."""
    rest = cal(strict=True).rest_day(day)
    assert rest is not None
    assert rest.reason in ("holiday", "weekend", "vacation", "extra")


def test_strict_reading_leaves_weekdays_alone() -> None:
    """The strict reading closes make-up days only, not the school week around them."""
    strict = cal(strict=True)
    assert strict.rest_day(D(2026, 2, 13)) is None  # Friday before the make-up Saturday
    assert strict.rest_day(D(2026, 2, 24)) is None  # first weekday after the festival


@pytest.mark.parametrize(("day", "reason", "name"), [
    (D(2026, 3, 7), "weekend", "Saturday"),
    (D(2026, 3, 8), "weekend", "Sunday"),
    (D(2026, 3, 6), None, None),
    (D(2026, 3, 9), None, None),
], ids=["saturday", "sunday", "friday", "monday"])
def test_weekends_are_off(day: D, reason: str | None, name: str | None) -> None:
    """Ordinary Saturdays and Sundays are rest days; weekdays are school days."""
    rest = cal().rest_day(day)
    assert (None if rest is None else (rest.reason, rest.name)) == \
        (None if reason is None else (reason, name))


def test_weekends_false_keeps_saturdays_open() -> None:
    """With weekends: false, an ordinary Saturday is a school day, a holiday still is not."""
    c = cal(weekends=False)
    assert c.rest_day(D(2026, 3, 7)) is None
    assert c.rest_day(D(2026, 2, 21)) is not None  # a Saturday of the Spring Festival


def test_statutory_false_ignores_the_national_calendar() -> None:
    """Without statutory holidays, National Day weekdays are school days and make-up
    Saturdays are plain weekends."""
    c = cal(statutory=False)
    assert c.rest_day(D(2026, 10, 1)) is None
    rest = c.rest_day(D(2026, 10, 10))
    assert rest is not None
    assert rest.reason == "weekend"


# ---------------------------------------------------------------- order of the rules

VACATION = Vacation("summer", D(2026, 7, 11), D(2026, 8, 31))


@pytest.mark.parametrize(("kw", "day", "want"), [
    # extra_holidays beat extra_workdays (RestCalendar itself; the policy forbids both)
    ({"extra_holidays": (D(2026, 3, 3),), "extra_workdays": (D(2026, 3, 3),)},
     D(2026, 3, 3), "extra"),
    # vacation beats extra_workdays
    ({"vacations": (VACATION,), "extra_workdays": (D(2026, 7, 14),)}, D(2026, 7, 14),
     "vacation"),
    # vacation days are rest days from start to end inclusive
    ({"vacations": (VACATION,)}, D(2026, 7, 11), "vacation"),
    ({"vacations": (VACATION,)}, D(2026, 8, 31), "vacation"),
    ({"vacations": (VACATION,)}, D(2026, 9, 1), None),
    ({"vacations": (VACATION,)}, D(2026, 7, 10), None),
    # an extra holiday on a weekday
    ({"extra_holidays": (D(2026, 12, 1),)}, D(2026, 12, 1), "extra"),
    # extra_workdays beat the national calendar...
    ({"extra_workdays": (D(2026, 10, 2),)}, D(2026, 10, 2), None),
    # ...and weekends
    ({"extra_workdays": (D(2026, 3, 7),)}, D(2026, 3, 7), None),
    # the national calendar beats weekends, both ways
    ({}, D(2026, 9, 20), None),
    ({}, D(2026, 10, 3), "holiday"),
    # an extra holiday beats an official make-up working day
    ({"extra_holidays": (D(2026, 2, 14),)}, D(2026, 2, 14), "extra"),
    # a vacation over a statutory holiday reports the vacation
    ({"vacations": (Vacation("winter", D(2026, 2, 1), D(2026, 2, 28)),)}, D(2026, 2, 16),
     "vacation"),
    # a vacation closes a make-up working day too
    ({"vacations": (Vacation("winter", D(2026, 2, 1), D(2026, 2, 28)),)}, D(2026, 2, 14),
     "vacation"),
], ids=["extra-holiday>extra-workday", "vacation>extra-workday", "vacation-first-day",
        "vacation-last-day", "after-vacation", "before-vacation", "extra-holiday",
        "extra-workday>national", "extra-workday>weekend", "makeup>weekend",
        "holiday-on-weekend", "extra-holiday>makeup", "vacation>holiday", "vacation>makeup"])
def test_rest_day_order(kw: dict[str, object], day: D, want: str | None) -> None:
    """extra_holidays and vacations beat extra_workdays, which beat the national
    calendar, which beats weekends."""
    rest = cal(**kw).rest_day(day)  # type: ignore[arg-type]
    assert (None if rest is None else rest.reason) == want


def test_vacation_rest_day_carries_its_name() -> None:
    """A vacation rest day is named after the vacation."""
    rest = cal(vacations=(VACATION,)).rest_day(D(2026, 8, 1))
    assert rest is not None
    assert (rest.reason, rest.name) == ("vacation", "summer")


# ---------------------------------------------------------------- coverage

def test_packaged_data_covers_2026_not_2027() -> None:
    """The packaged calendar covers 2026 and ends on 2026-12-31; 2027 is a gap."""
    n = NationalCalendar()
    assert n.covers(D(2026, 12, 31))
    assert not n.covers(D(2027, 1, 1))
    assert n.covered_until == D(2026, 12, 31)
    assert n.holiday_name(D(2027, 10, 1)) is None
    assert cal().covers(D(2026, 6, 1))
    assert not cal().covers(D(2027, 6, 1))


def test_coverage_gap_does_not_matter_without_statutory_holidays() -> None:
    """A RestCalendar that ignores the national calendar covers every year."""
    assert cal(statutory=False).covers(D(2031, 5, 1))


CN_2027 = CalendarYear(
    year=2027,
    holidays=(Holiday("Spring Festival", D(2027, 2, 6), D(2027, 2, 14)),
              Holiday("National Day", D(2027, 10, 1), D(2027, 10, 7))),
    workdays=frozenset({D(2027, 2, 20), D(2027, 10, 9)}))


def test_supplied_year_is_covered_with_its_days() -> None:
    """A supplied 2027 CalendarYear makes 2027 covered, with its holidays and workdays."""
    n = NationalCalendar([CN_2027])
    assert n.covers(D(2027, 1, 1))
    assert n.covered_until == D(2027, 12, 31)
    assert n.holiday_name(D(2027, 2, 10)) == "Spring Festival"
    assert n.holiday_name(D(2027, 3, 10)) is None
    assert n.is_makeup_workday(D(2027, 2, 20))
    c = cal(national=n)
    assert c.covers(D(2027, 7, 1))
    rest = c.rest_day(D(2027, 2, 8))  # a Monday
    assert rest is not None
    assert (rest.reason, rest.name) == ("holiday", "Spring Festival")
    assert c.rest_day(D(2027, 2, 20)) is None  # a make-up Saturday
    assert c.rest_day(D(2027, 2, 27)) is not None  # an ordinary Saturday
    # the packaged years are still there
    assert c.rest_day(D(2026, 2, 17)) is not None


def test_coverage_needs_an_unbroken_run_of_years() -> None:
    """A supplied 2028 without 2027 covers 2028 but covered_until stays 2026-12-31."""
    n = NationalCalendar([CalendarYear(2028, ())])
    assert n.covers(D(2028, 3, 1))
    assert not n.covers(D(2027, 3, 1))
    assert n.covered_until == D(2026, 12, 31)


def test_supplied_year_replaces_packaged_data() -> None:
    """A supplied 2026 replaces the package's 2026 entirely."""
    n = NationalCalendar([CalendarYear(2026, (Holiday("Local", D(2026, 3, 3), D(2026, 3, 3)),))])
    c = cal(national=n)
    assert c.rest_day(D(2026, 10, 1)) is None
    rest = c.rest_day(D(2026, 3, 3))
    assert rest is not None
    assert rest.name == "Local"
    assert c.rest_day(D(2026, 2, 14)) is not None  # no longer a make-up day: a Saturday


# ---------------------------------------------------------------- next open day, ranges

@pytest.mark.parametrize(("kw", "day", "want"), [
    ({}, D(2026, 2, 15), D(2026, 2, 24)),
    ({}, D(2026, 2, 13), D(2026, 2, 14)),           # the make-up Saturday is open
    ({"strict": True}, D(2026, 2, 13), D(2026, 2, 24)),
    ({}, D(2026, 9, 30), D(2026, 10, 8)),
    ({}, D(2026, 10, 9), D(2026, 10, 10)),          # make-up Saturday after National Day
    ({}, D(2026, 3, 6), D(2026, 3, 9)),             # Friday -> Monday
    ({}, D(2026, 3, 3), D(2026, 3, 4)),
    ({"vacations": (VACATION,)}, D(2026, 7, 11), D(2026, 9, 1)),
], ids=["spring-festival", "before-makeup-saturday", "strict", "national-day",
        "makeup-after-national-day", "weekend", "weekday", "summer-vacation"])
def test_next_open_day(kw: dict[str, object], day: D, want: D) -> None:
    """next_open_day is the first later date open to subject classes, across long holidays."""
    assert cal(**kw).next_open_day(day) == want  # type: ignore[arg-type]


def test_next_open_day_none_when_everything_is_closed() -> None:
    """A calendar closed for longer than the horizon has no next open day."""
    c = cal(vacations=(Vacation("all", D(2026, 1, 1), D(2027, 12, 31)),))
    assert c.next_open_day(D(2026, 3, 1), horizon=100) is None


def test_rest_days_in_lists_the_spring_festival_window() -> None:
    """rest_days_in lists 02-10..03-01 in order: the festival and a Sunday, no make-up days."""
    got = [(r.date, r.reason) for r in cal().rest_days_in(D(2026, 2, 10), D(2026, 3, 1))]
    assert got == [(d, "holiday") for d in SPRING_FESTIVAL_2026] + [(D(2026, 3, 1), "weekend")]


# ---------------------------------------------------------------- beyond the data (issue 10)
# The law (全国年节及纪念日放假办法, 2024 text) fixes 13 days; the lunar dates
# below are written out by hand (2027 Spring Festival 2/6, eve 2/5,
# Dragon Boat 6/9, Mid-Autumn 9/15, Qingming 4/5; 2028 Spring Festival 1/26),
# not read back from the lunar library.

LAW_2027 = {
    D(2027, 1, 1): "New Year's Day",
    **{d: "Spring Festival" for d in days(D(2027, 2, 5), D(2027, 2, 8))},
    D(2027, 4, 5): "Tomb-sweeping Day",
    D(2027, 5, 1): "Labour Day", D(2027, 5, 2): "Labour Day",
    D(2027, 6, 9): "Dragon Boat Festival",
    D(2027, 9, 15): "Mid-autumn Festival",
    **{d: "National Day" for d in days(D(2027, 10, 1), D(2027, 10, 3))},
}
LAW_2028 = {
    D(2028, 1, 1): "New Year's Day",
    **{d: "Spring Festival" for d in days(D(2028, 1, 25), D(2028, 1, 28))},
    D(2028, 4, 4): "Tomb-sweeping Day",
    D(2028, 5, 1): "Labour Day", D(2028, 5, 2): "Labour Day",
    D(2028, 5, 28): "Dragon Boat Festival",
    D(2028, 10, 1): "National Day", D(2028, 10, 2): "National Day",
    D(2028, 10, 3): "Mid-autumn Festival, National Day",  # the two fall on one day
}

# The official notices of the State Council for 2025 (published 2024-11-12) and 2026.
OFFICIAL_HOLIDAYS = {
    2025: [(D(2025, 1, 1), D(2025, 1, 1)), (D(2025, 1, 28), D(2025, 2, 4)),
           (D(2025, 4, 4), D(2025, 4, 6)), (D(2025, 5, 1), D(2025, 5, 5)),
           (D(2025, 5, 31), D(2025, 6, 2)), (D(2025, 10, 1), D(2025, 10, 8))],
    2026: [(D(2026, 1, 1), D(2026, 1, 3)), (D(2026, 2, 15), D(2026, 2, 23)),
           (D(2026, 4, 4), D(2026, 4, 6)), (D(2026, 5, 1), D(2026, 5, 5)),
           (D(2026, 6, 19), D(2026, 6, 21)), (D(2026, 9, 25), D(2026, 9, 27)),
           (D(2026, 10, 1), D(2026, 10, 7))],
}


@pytest.mark.parametrize(("day", "name"), sorted({**LAW_2027, **LAW_2028}.items()), ids=str)
def test_each_statutory_day_beyond_the_data_is_a_provisional_holiday(day: D, name: str) -> None:
    """Every day the law fixes in 2027 and 2028 is a provisional holiday, weekday or not."""
    assert cal().verdict(day) == (RestDay(day, "holiday", name, provisional=True), True)


@pytest.mark.parametrize(("year", "expected"), [(2027, LAW_2027), (2028, LAW_2028)])
def test_law_days_are_exactly_the_thirteen(year: int, expected: dict[D, str]) -> None:
    """law_days gives the law's days of a year, no more and no fewer."""
    assert dict(law_days(year)) == expected


@pytest.mark.parametrize("year", sorted(OFFICIAL_HOLIDAYS))
def test_law_days_lie_inside_the_official_notice(year: int) -> None:
    """Each of the law's days of 2025 and 2026 is a holiday in that year's notice."""
    official = {d for a, b in OFFICIAL_HOLIDAYS[year] for d in days(a, b)}
    assert set(law_days(year)) <= official
    assert len(law_days(year)) == 13


def test_law_days_lie_inside_the_packaged_data_of_every_year() -> None:
    """For 2008-2026 the law then in force is inside the package's holidays, except one
    slip of the package: 2012-06-23, the Dragon Boat Saturday of a 6/22-24 holiday."""
    packaged = NationalCalendar()
    missing = [d for y in range(2008, 2027) for d in law_days(y)
               if packaged.holiday_name(d) is None]
    assert missing == [D(2012, 6, 23)]


def test_beyond_the_data_a_weekday_is_a_provisional_school_day() -> None:
    """2027-01-04 (a Monday, no law day) is open, but provisionally (no notice yet)."""
    assert cal().verdict(D(2027, 1, 4)) == (None, True)


def test_beyond_the_data_weekends_stay_rest_days() -> None:
    """No make-up working day is assumed: Saturday 2027-01-09 is a provisional rest day."""
    rest, provisional = cal().verdict(D(2027, 1, 9))
    assert rest is not None and (rest.reason, rest.provisional, provisional) == \
        ("weekend", True, True)


def test_covered_dates_are_never_provisional() -> None:
    """Within the package's years nothing is provisional, rest day or not."""
    c = cal()
    assert all(not c.verdict(d)[1] for d in days(D(2026, 1, 1), D(2026, 12, 31)))


def test_policy_data_is_not_provisional_beyond_the_national_data() -> None:
    """Vacations, extra holidays and extra workdays are the policy's own: certain in 2027."""
    c = cal(extra_holidays=(D(2027, 3, 3),), extra_workdays=(D(2027, 1, 1),),
            vacations=(Vacation("winter", D(2027, 1, 23), D(2027, 2, 21)),))
    assert c.verdict(D(2027, 3, 3))[1] is False
    assert c.verdict(D(2027, 1, 1)) == (None, False)
    assert c.verdict(D(2027, 2, 6))[1] is False


def test_without_statutory_holidays_nothing_is_provisional() -> None:
    """A policy that ignores the national calendar has no law fallback either."""
    assert cal(statutory=False).verdict(D(2027, 1, 1)) == (None, False)


def test_a_wait_running_past_the_data_is_provisional() -> None:
    """Sunday 2026-12-27 reopens on covered Monday 12-28; with 12-31 an extra holiday,
    Wednesday 12-30's wait reaches Monday 2027-01-04 and rests on the fallback."""
    c = cal(extra_holidays=(D(2026, 12, 31),))
    assert c.next_open(D(2026, 12, 27)) == (D(2026, 12, 28), False)
    assert c.next_open(D(2026, 12, 30)) == (D(2027, 1, 4), True)


def test_missing_law_days_names_each_missing_day() -> None:
    """A calendar file without the Spring Festival eve and 2 May misses exactly those."""
    held = [Holiday("x", d, d) for d in LAW_2027 if d not in (D(2027, 2, 5), D(2027, 5, 2))]
    assert missing_law_days(CalendarYear(2027, tuple(held))) == [
        (D(2027, 2, 5), "Spring Festival"), (D(2027, 5, 2), "Labour Day")]


@pytest.mark.parametrize(("today", "warns"), [
    (D(2026, 10, 31), False),   # 61 days left
    (D(2026, 11, 2), True),     # 59 days left
    (D(2026, 12, 1), True),     # the day this was written
    (D(2027, 1, 1), True),      # beyond the data
])
def test_coverage_warning_60_days_ahead(today: D, warns: bool) -> None:
    """The operator is warned from 60 days before the data ends, and after."""
    w = NationalCalendar().coverage_warning(today)
    assert (w is not None) is warns
    if warns and today.year == 2027:
        assert "PROVISIONAL" in w and "2027" in w


def test_makeup_workdays_of_2026_are_the_official_ones() -> None:
    """makeup_workdays_in lists the six 2026 make-up working days, and an extra workday
    that falls on a Saturday."""
    c = cal(extra_workdays=(D(2026, 12, 5),))
    got = c.makeup_workdays_in(D(2026, 1, 1), D(2026, 12, 31))
    assert [w.date for w in got] == [*MAKEUP_DAYS_2026, D(2026, 12, 5)]
    assert got[-1].name == "extra workday"
