"""The policy file's schema: scalars and the pydantic models of every section.

Validation only: what the YAML may say, each field's type and bounds, and
the checks across fields. policy.py compiles a validated model into the
immutable `Policy` the rules read.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .messages import Locale
from .paths import Refused, canonical

# ---------------------------------------------------------------- scalars

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600}
_DURATION_HINT = "a duration is an integer with a unit s, m or h (e.g. 30m), got {value!r}"
_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def parse_duration(value: Any) -> int:
    """"90s" / "30m" / "1h" -> seconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(_DURATION_HINT.format(value=value))
    m = _DURATION.match(value)
    if not m:
        raise ValueError(_DURATION_HINT.format(value=value))
    return int(m.group(1)) * _UNIT[m.group(2)]


def parse_time(value: Any) -> dt.time:
    """"HH:MM" or "HH:MM:SS" -> time. Unquoted YAML times arrive as ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            "times must be quoted strings: YAML reads an unquoted 23:00 as a number; "
            'write "23:00"')
    if not isinstance(value, str):
        raise ValueError(f'a time is a quoted "HH:MM" or "HH:MM:SS", got {value!r}')
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError(f'a time is "HH:MM" or "HH:MM:SS", got {value!r}')
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if h > 23 or mi > 59 or s > 59:
        raise ValueError(f"{value!r} is not a time of day (00:00 to 23:59:59)")
    return dt.time(h, mi, s)


def parse_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        raise ValueError(f"a date is YYYY-MM-DD, got a date and time {value!r}")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(f"a date is YYYY-MM-DD, got {value!r}")


def parse_zone(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"a time zone is an IANA name such as Asia/Shanghai, got {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(  # noqa: B904 - the lookup's own error says less than this
            f"unknown time zone {value!r} (use an IANA name such as Asia/Shanghai)")
    return value


Duration = Annotated[int, BeforeValidator(parse_duration)]
TimeOfDay = Annotated[dt.time, BeforeValidator(parse_time)]
Date = Annotated[dt.date, BeforeValidator(parse_date)]
Zone = Annotated[str, BeforeValidator(parse_zone)]

# Rule codes a policy may shadow (identity and forbidden features included:
# an operator may trial a new forbidden route before enforcing it).
# codes.SHADOWABLE spelled out for the schema's error messages (a test holds them equal)
ShadowRule = Literal["forbidden_feature", "identity_required", "bad_identity", "preschool",
                     "curfew", "rest_day", "daily_limit", "break_required"]
Stage = Literal["primary", "junior", "senior"]
# Key of the profile used for region codes the policy does not list.
OTHER_REGION = "\x00other"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- sections

class JwtSettings(_Model):
    algorithm: Literal["HS256", "RS256"] = "HS256"
    key_file: str | None = None   # relative to the policy file
    key_env: str | None = None    # name of an environment variable holding the key
    cookie: str | None = None     # read the token from this cookie when no bearer header
    student_claim: str = "sub"
    grade_claim: str = "grade"
    region_claim: str = "region"
    audience: str | None = None
    issuer: str | None = None
    leeway: Duration = 0

    @model_validator(mode="after")
    def _one_key(self) -> JwtSettings:
        if (self.key_file is None) == (self.key_env is None):
            raise ValueError("give exactly one of key_file or key_env")
        return self


class IdentitySettings(_Model):
    source: Literal["header", "jwt"] = "header"
    student_header: str = "X-Student-Id"
    grade_header: str = "X-Student-Grade"
    region_header: str = "X-Student-Region"
    jwt: JwtSettings | None = None

    @model_validator(mode="after")
    def _jwt_needs_settings(self) -> IdentitySettings:
        if self.source == "jwt" and self.jwt is None:
            raise ValueError("source: jwt needs a jwt: section (algorithm, key_file or key_env)")
        return self


class LessonSettings(_Model):
    max_duration: Duration = 1800
    min_break: Duration = 600

    @field_validator("max_duration", "min_break")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0s")
        return v


class LessonOverride(_Model):
    max_duration: Duration | None = None
    min_break: Duration | None = None

    @field_validator("max_duration", "min_break")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be > 0s")
        return v


class CurfewSettings(_Model):
    start: TimeOfDay = dt.time(23, 0)
    end: TimeOfDay = dt.time(6, 0)

    @model_validator(mode="after")
    def _not_equal(self) -> CurfewSettings:
        if self.start == self.end:
            raise ValueError("curfew start and end are equal: the window would be empty or total")
        return self


class VacationSettings(_Model):
    name: str = Field(min_length=1)
    start: Date
    end: Date

    @model_validator(mode="after")
    def _ordered(self) -> VacationSettings:
        if self.end < self.start:
            raise ValueError(f"vacation {self.name!r} ends ({self.end}) "
                             f"before it starts ({self.start})")
        return self


class RestDaysSettings(_Model):
    weekends: bool = True
    statutory_holidays: bool = True
    extra_holidays: tuple[Date, ...] = ()
    extra_workdays: tuple[Date, ...] = ()
    vacations: tuple[VacationSettings, ...] = (
        VacationSettings(name="winter", start=dt.date(2027, 1, 23), end=dt.date(2027, 2, 21)),)
    calendar_files: tuple[str, ...] = ()
    # Stricter reading of 调休: official make-up working days stay rest days.
    makeup_days_are_rest_days: bool = False
    # What to do when a date lies beyond the national calendar's data.
    calendar_gap: Literal["warn", "refuse"] = "warn"

    @model_validator(mode="after")
    def _disjoint(self) -> RestDaysSettings:
        both = sorted(set(self.extra_holidays) & set(self.extra_workdays))
        if both:
            raise ValueError("dates in both extra_holidays and extra_workdays: "
                             + ", ".join(d.isoformat() for d in both))
        return self


class RestDaysOverride(_Model):
    """A region's rest days: each key given replaces the base's."""

    weekends: bool | None = None
    statutory_holidays: bool | None = None
    extra_holidays: tuple[Date, ...] | None = None
    extra_workdays: tuple[Date, ...] | None = None
    vacations: tuple[VacationSettings, ...] | None = None
    makeup_days_are_rest_days: bool | None = None

    @model_validator(mode="after")
    def _disjoint(self) -> RestDaysOverride:
        both = sorted(set(self.extra_holidays or ()) & set(self.extra_workdays or ()))
        if both:
            raise ValueError("dates in both extra_holidays and extra_workdays: "
                             + ", ".join(d.isoformat() for d in both))
        return self


class RouteSettings(_Model):
    prefix: str = Field(min_length=1)
    kind: Literal["lesson", "forbidden"]
    category: Literal["subject", "non_subject"] | None = None
    feature: str | None = None
    # Idle read timeout upstream; streams and WebSockets want None (no limit).
    read_timeout: Duration | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> RouteSettings:
        if not self.prefix.startswith("/"):
            raise ValueError(f"prefix must start with '/', got {self.prefix!r}")
        t = canonical(self.prefix)
        if isinstance(t, Refused) or "?" in self.prefix:
            why = t.why if isinstance(t, Refused) else "a '?' in the path"
            raise ValueError(f"prefix {self.prefix!r} is not a usable path: {why}")
        if self.kind == "lesson" and self.category is None:
            raise ValueError("a lesson route needs category: subject or non_subject")
        if self.kind == "forbidden" and self.category is not None:
            raise ValueError("a forbidden route has no category (it is denied to everyone)")
        return self


class PathSettings(_Model):
    # false for an upstream that serves /Classroom/ and /classroom/ alike
    case_sensitive: bool = True


class StageSettings(_Model):
    lesson: LessonOverride | None = None
    daily_max: Duration | None = None


class RegionSettings(_Model):
    timezone: Zone | None = None
    curfew: CurfewSettings | None = None
    rest_days: RestDaysOverride | None = None
    lesson: LessonOverride | None = None
    daily_max: Duration | None = None


class PolicyModel(_Model):
    version: Literal[1]
    timezone: Zone = "Asia/Shanghai"
    mode: Literal["enforce", "shadow"] = "enforce"
    shadow_rules: tuple[ShadowRule, ...] = ()
    failure_mode: Literal["fail_closed", "fail_open"] = "fail_closed"
    locale: Locale = "zh-CN"  # denial texts when Accept-Language names neither
    identity: IdentitySettings = IdentitySettings()
    lesson: LessonSettings = LessonSettings()
    daily_max: Duration | None = None
    curfew: CurfewSettings = CurfewSettings()
    rest_days: RestDaysSettings = RestDaysSettings()
    regions: dict[str, RegionSettings] = {}
    paths: PathSettings = PathSettings()
    stages: dict[Stage, StageSettings] = {}
    routes: tuple[RouteSettings, ...]

    @field_validator("regions", mode="before")
    @classmethod
    def _region_keys(cls, v: Any) -> Any:
        # YAML reads 650000 unquoted as an int: a region code is its digits.
        if isinstance(v, Mapping):
            return {str(k): val for k, val in v.items()}
        return v


# ---------------------------------------------------------------- calendar files

class _HolidayFile(_Model):
    name: str = Field(min_length=1)
    start: Date
    end: Date


class CalendarFileModel(_Model):
    year: int
    holidays: tuple[_HolidayFile, ...] = ()
    workdays: tuple[Date, ...] = ()

    @model_validator(mode="after")
    def _in_year(self) -> CalendarFileModel:
        for h in self.holidays:
            if h.end < h.start:
                raise ValueError(f"holiday {h.name!r} ends before it starts")
        for d in self.workdays:
            if d.year != self.year:
                raise ValueError(f"workday {d} is not in {self.year}")
        return self


