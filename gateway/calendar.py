"""Rest days: weekends, statutory holidays, make-up working days, vacations.

The national calendar (statutory holidays, days off in lieu and official
make-up working days, 调休) comes from the `chinesecalendar` package, which
follows the State Council notices; a year it lacks can be supplied by the
policy's calendar files. A date neither covers is *not* silently a working
day: `RestCalendar.covers()` says so and the callers decide (warn, metric,
fail closed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from chinese_calendar import constants as _cc

RestReason = Literal["holiday", "weekend", "vacation", "extra"]


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
                d = h.start
                while d <= h.end:
                    days[d] = h.name
                    d += dt.timedelta(days=1)
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
        if day in self.extra_holidays:
            return RestDay(day, "extra", "extra holiday")
        for v in self.vacations:
            if v.start <= day <= v.end:
                return RestDay(day, "vacation", v.name)
        if day in self.extra_workdays:
            return None
        if self.statutory_holidays and self.national.covers(day):
            name = self.national.holiday_name(day)
            if name is not None:
                return RestDay(day, "holiday", name)
            if self.national.is_makeup_workday(day):
                if self.makeup_days_are_rest_days:
                    return RestDay(day, "weekend", "make-up working day (strict reading)")
                return None
        if self.weekends and day.weekday() >= 5:
            return RestDay(day, "weekend", "Saturday" if day.weekday() == 5 else "Sunday")
        return None

    def covers(self, day: dt.date) -> bool:
        """False when the statutory calendar is in use and has no data for `day`."""
        return not self.statutory_holidays or self.national.covers(day)

    def next_open_day(self, day: dt.date, horizon: int = 400) -> dt.date | None:
        """First date after `day` that is open to subject classes, or None
        within the horizon (a policy may close every day)."""
        d = day
        for _ in range(horizon):
            d += dt.timedelta(days=1)
            if self.rest_day(d) is None:
                return d
        return None

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
    "CalendarYear",
    "Holiday",
    "NationalCalendar",
    "RestCalendar",
    "RestDay",
    "Vacation",
    "packaged_range",
]
