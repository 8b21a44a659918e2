"""Rest days: weekends, statutory holidays, make-up working days, vacations.

The national calendar (statutory holidays, days off in lieu and official
make-up working days, 调休) comes from the `chinesecalendar` package, which
follows the State Council notices; a year it lacks can be supplied by the
policy's calendar files. A date neither covers is *not* silently a working
day (issue 10): the statutory days fixed by law (全国年节及纪念日放假办法)
and weekends are rest days there, marked provisional, until the year's
notice is added; `RestCalendar.covers()` says whether a date has official
data and the callers decide (warn, metric, fail closed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Literal

from chinese_calendar import constants as _cc
from lunar_python import Lunar

RestReason = Literal["holiday", "weekend", "vacation", "extra"]

# Warn this long before the data ends: the State Council notice for a year
# usually appears in November or December of the year before.
WARN_AHEAD_DAYS = 60

# The names chinesecalendar gives, so a provisional day reads like an official one.
NEW_YEAR = "New Year's Day"
SPRING_FESTIVAL = "Spring Festival"
QINGMING = "Tomb-sweeping Day"
LABOUR_DAY = "Labour Day"
DRAGON_BOAT = "Dragon Boat Festival"
MID_AUTUMN = "Mid-autumn Festival"
NATIONAL_DAY = "National Day"


@dataclass(frozen=True)
class Holiday:
    name: str
    start: dt.date
    end: dt.date  # inclusive


@dataclass(frozen=True)
class CalendarYear:
    """One year of official data: holidays and make-up working days."""

    year: int
    holidays: tuple[Holiday, ...]
    workdays: frozenset[dt.date] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Vacation:
    name: str
    start: dt.date
    end: dt.date  # inclusive


@dataclass(frozen=True)
class RestDay:
    date: dt.date
    reason: RestReason
    name: str
    # Rests on the law's fallback, not on an official notice (a date beyond the data).
    provisional: bool = False


@dataclass(frozen=True)
class Workday:
    """A school day on a weekend or holiday: a make-up working day."""

    date: dt.date
    name: str


# ---------------------------------------------------------------- the law's days

def _lunar(year: int, month: int, day: int) -> dt.date:
    s = Lunar.fromYmd(year, month, day).getSolar()
    return dt.date(s.getYear(), s.getMonth(), s.getDay())


def _qingming(year: int) -> dt.date:
    # The 清明 term of Gregorian `year` falls in lunar month 3 of the same
    # lunar year, whose solar-term table lunar_python computes.
    t = Lunar.fromYmd(year, 3, 1).getJieQiTable()["清明"]
    return dt.date(t.getYear(), t.getMonth(), t.getDay())


@lru_cache(maxsize=64)
def law_days(year: int) -> Mapping[dt.date, str]:
    """The statutory rest days of `year` fixed by 全国年节及纪念日放假办法.

    From 2025 (the 2024 amendment, 13 days): New Year's Day; Spring Festival
    eve and days 1-3 of the first lunar month; Qingming (the solar term day);
    1-2 May; Dragon Boat (5/5 lunar); Mid-Autumn (8/15 lunar); 1-3 October.
    Earlier years take the text then in force (2014-2024: Spring Festival
    days 1-3 and 1 May only; 2008-2013: eve and days 1-2), so the function
    can be checked against every year of official data. Days off in lieu and
    make-up working days are set by each year's notice and are not here.
    """
    if year < 2008:
        raise ValueError(f"the statutory days are encoded from 2008 on, not {year}")
    new_year = _lunar(year, 1, 1)
    if year >= 2025:
        spring = [new_year + dt.timedelta(days=n) for n in range(-1, 3)]
        labour = [dt.date(year, 5, 1), dt.date(year, 5, 2)]
    elif year >= 2014:
        spring = [new_year + dt.timedelta(days=n) for n in range(3)]
        labour = [dt.date(year, 5, 1)]
    else:
        spring = [new_year + dt.timedelta(days=n) for n in range(-1, 2)]
        labour = [dt.date(year, 5, 1)]
    days: dict[dt.date, str] = {}

    def add(name: str, *dates: dt.date) -> None:
        for d in dates:  # Mid-Autumn can fall on 1-3 October (2028-10-03): name both
            days[d] = f"{days[d]}, {name}" if d in days else name

    add(NEW_YEAR, dt.date(year, 1, 1))
    add(SPRING_FESTIVAL, *spring)
    add(QINGMING, _qingming(year))
    add(LABOUR_DAY, *labour)
    add(DRAGON_BOAT, _lunar(year, 5, 5))
    add(MID_AUTUMN, _lunar(year, 8, 15))
    add(NATIONAL_DAY, *(dt.date(year, 10, n) for n in (1, 2, 3)))
    return MappingProxyType(dict(sorted(days.items())))


def missing_law_days(cy: CalendarYear) -> list[tuple[dt.date, str]]:
    """The law's days of `cy.year` that a calendar file does not make holidays
    (every official notice contains them all), in date order."""
    held = {d for h in cy.holidays for d in _span(h.start, h.end)}
    return [(d, name) for d, name in law_days(cy.year).items() if d not in held]


def _span(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


@lru_cache(maxsize=1)
def _packaged_years() -> tuple[int, int]:
    years = [d.year for d in _cc.holidays]
    return min(years), max(years)


class NationalCalendar:
    """Statutory holidays and make-up days: packaged data plus supplements.

    A supplied year replaces the packaged data for that year entirely, so an
    operator can also correct the package.
    """

    def __init__(self, supplements: Iterable[CalendarYear] = ()) -> None:
        self._years: dict[int, tuple[dict[dt.date, str], frozenset[dt.date]]] = {}
        for cy in supplements:
            days: dict[dt.date, str] = {}
            for h in cy.holidays:
                days.update((d, h.name) for d in _span(h.start, h.end))
            self._years[cy.year] = (days, cy.workdays)
        first, last = _packaged_years()
        self._packaged = range(first, last + 1)

    def covers(self, day: dt.date) -> bool:
        return day.year in self._years or day.year in self._packaged

    @property
    def covered_until(self) -> dt.date:
        """Last day of the last year with data (the run of years from the
        package onwards must be unbroken to count)."""
        year = self._packaged.stop - 1
        while year + 1 in self._years:
            year += 1
        return dt.date(year, 12, 31)

    def coverage_warning(self, today: dt.date, ahead: int = WARN_AHEAD_DAYS) -> str | None:
        """What to tell the operator when the data ends within `ahead` days
        of `today` or already has ended; None while it reaches far enough."""
        until = self.covered_until
        left = (until - today).days
        if left < 0:
            return (f"the holiday calendar has no official data for {today.year} (it ends "
                    f"{until}): the statutory days fixed by law and weekends are applied as "
                    f"PROVISIONAL rest days, with no make-up working days; add "
                    f"rest_days.calendar_files for {today.year} from the State Council notice "
                    f"(docs/calendar.md)")
        if left < ahead:
            return (f"the holiday calendar's data ends on {until} ({left} days): add the "
                    f"{until.year + 1} calendar file to the policy (rest_days.calendar_files) "
                    f"the day the State Council notice is published (docs/calendar.md)")
        return None

    def holiday_name(self, day: dt.date) -> str | None:
        """The statutory holiday (or day off in lieu) `day` belongs to."""
        if day.year in self._years:
            return self._years[day.year][0].get(day)
        if day.year in self._packaged:
            name = _cc.holidays.get(day)
            return None if name is None else str(name)
        return None

    def is_makeup_workday(self, day: dt.date) -> bool:
        """An official make-up working day (调休): a weekend day with school."""
        if day.year in self._years:
            return day in self._years[day.year][1]
        if day.year in self._packaged:
            return day in _cc.workdays
        return False


# One shared instance for policies without supplements (the data is static).
PACKAGED = NationalCalendar()


@dataclass(frozen=True)
class RestCalendar:
    """Which dates are rest days for subject classes, in the contract's order."""

    weekends: bool
    statutory_holidays: bool
    extra_holidays: frozenset[dt.date]
    extra_workdays: frozenset[dt.date]
    vacations: tuple[Vacation, ...]
    national: NationalCalendar = PACKAGED
    # Stricter reading: official make-up working days are still rest days.
    makeup_days_are_rest_days: bool = False

    def rest_day(self, day: dt.date) -> RestDay | None:
        """The reason `day` is closed to subject classes, or None."""
        return self.verdict(day)[0]

    def verdict(self, day: dt.date) -> tuple[RestDay | None, bool]:
        """The rest day (or None for a school day), and whether that answer is
        provisional: it rests on the law's fallback for a date beyond the
        official data and may change when the year's notice is added."""
        if day in self.extra_holidays:
            return RestDay(day, "extra", "extra holiday"), False
        for v in self.vacations:
            if v.start <= day <= v.end:
                return RestDay(day, "vacation", v.name), False
        if day in self.extra_workdays:
            return None, False
        provisional = False
        if self.statutory_holidays:
            if self.national.covers(day):
                name = self.national.holiday_name(day)
                if name is not None:
                    return RestDay(day, "holiday", name), False
                if self.national.is_makeup_workday(day):
                    if self.makeup_days_are_rest_days:
                        return RestDay(day, "weekend",
                                       "make-up working day (strict reading)"), False
                    return None, False
            else:
                # Never "school day" on a statutory day (issue 10). Make-up
                # working days are unknown until the notice: none is assumed,
                # so weekends stay rest days, provisionally.
                provisional = True
                name = law_days(day.year).get(day) if day.year >= 2008 else None
                if name is not None:
                    return RestDay(day, "holiday", name, provisional=True), True
        if self.weekends and day.weekday() >= 5:
            return RestDay(day, "weekend", "Saturday" if day.weekday() == 5 else "Sunday",
                           provisional=provisional), provisional
        return None, provisional

    def covers(self, day: dt.date) -> bool:
        """False when the statutory calendar is in use and has no data for `day`."""
        return not self.statutory_holidays or self.national.covers(day)

    def next_open_day(self, day: dt.date, horizon: int = 400) -> dt.date | None:
        """First date after `day` that is open to subject classes, or None
        within the horizon (a policy may close every day)."""
        return self.next_open(day, horizon)[0]

    def next_open(self, day: dt.date, horizon: int = 400) -> tuple[dt.date | None, bool]:
        """`next_open_day`, and whether any day it looked at (the open day
        included) was provisional: then so is a wait computed from it."""
        d = day
        provisional = False
        for _ in range(horizon):
            d += dt.timedelta(days=1)
            rest, prov = self.verdict(d)
            provisional = provisional or prov
            if rest is None:
                return d, provisional
        return None, provisional

    def makeup_workdays_in(self, first: dt.date, last: dt.date) -> list[Workday]:
        """School days that would otherwise be rest days: official make-up
        working days (调休) and the policy's extra workdays on a weekend or a
        holiday (`tutorgate calendar` lists them)."""
        out = []
        for d in _span(first, last):
            if self.rest_day(d) is not None:
                continue
            if d in self.extra_workdays:
                if d.weekday() >= 5 or (self.statutory_holidays and self.national.covers(d)
                                        and self.national.holiday_name(d) is not None):
                    out.append(Workday(d, "extra workday"))
            elif (self.statutory_holidays and self.national.covers(d)
                  and self.national.is_makeup_workday(d)):
                out.append(Workday(d, "make-up working day (调休)"))
        return out

    def rest_days_in(self, first: dt.date, last: dt.date) -> list[RestDay]:
        out = []
        d = first
        while d <= last:
            r = self.rest_day(d)
            if r is not None:
                out.append(r)
            d += dt.timedelta(days=1)
        return out


def packaged_range() -> tuple[int, int]:
    """First and last year of the packaged national calendar."""
    return _packaged_years()


__all__ = [
    "PACKAGED",
    "WARN_AHEAD_DAYS",
    "CalendarYear",
    "Holiday",
    "NationalCalendar",
    "RestCalendar",
    "RestDay",
    "Vacation",
    "Workday",
    "law_days",
    "missing_law_days",
    "packaged_range",
]
