"""`tutorgate check`, `explain` and `calendar`: the commands that read a
policy and answer offline (and the helpers every command shares)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import PolicyError
from .policy import Policy, load_policy

EXIT_INVALID = 2
EXIT_CALENDAR_GAP = 3


def _fail(msg: str, code: int = EXIT_INVALID) -> int:
    print(f"tutorgate: {msg}", file=sys.stderr)
    return code


def _load(path: str) -> Policy | int:
    try:
        return load_policy(path)
    except PolicyError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        return EXIT_INVALID


def _calendar_gap(policy: Policy) -> str | None:
    """A warning when the national calendar's data ends within 60 days or
    already has (today lies beyond it)."""
    if not policy.model.rest_days.statutory_holidays:
        return None
    return policy.national.coverage_warning(dt.date.today())


# ---------------------------------------------------------------- check

def cmd_check(a: argparse.Namespace) -> int:
    try:
        policy = load_policy(a.file)
    except PolicyError as e:
        if a.format == "json":
            print(json.dumps({"valid": False, "errors": [
                {"path": p, "message": m, "line": ln} for p, m, ln in e.problems]}, indent=2))
        for line in e.lines():
            print(line, file=sys.stderr if a.format == "json" else sys.stdout)
        return EXIT_INVALID
    from .summary import summarize
    summary = summarize(policy, dt.date.today())
    if a.format == "json":
        print(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    else:
        print(render_summary(summary))
    return 0


def render_summary(s: dict[str, Any]) -> str:
    from .summary import render
    return render(s)


# ---------------------------------------------------------------- explain, calendar

def _parse_at(value: str, policy: Policy) -> dt.datetime:
    t = dt.datetime.fromisoformat(value)
    if t.tzinfo is None:  # a local time in the policy's zone
        from zoneinfo import ZoneInfo
        t = t.replace(tzinfo=ZoneInfo(policy.model.timezone))
    return t


def cmd_explain(a: argparse.Namespace) -> int:
    from .explain import explain
    policy = _load(a.policy)
    if isinstance(policy, int):
        return policy
    try:
        at = _parse_at(a.at, policy)
        started = _parse_at(a.lesson_started, policy) if a.lesson_started else None
    except ValueError as e:
        return _fail(f"--at/--lesson-started: not ISO 8601: {e}")
    if started is not None and started > at:
        return _fail("--lesson-started is after --at")
    if not a.path.startswith("/"):
        return _fail("--path must start with /")
    try:
        result = explain(policy, a.path, at, grade=a.grade, region=a.region,
                         lesson_started=started)
    except ValueError as e:
        return _fail(str(e))
    if a.format == "json":
        print(json.dumps(result, ensure_ascii=False))
    else:
        from .explain import render
        print(render(result, a.path, at))
    return 0


def cmd_calendar(a: argparse.Namespace) -> int:
    from .explain import calendar_year
    policy = _load(a.policy)
    if isinstance(policy, int):
        return policy
    if not 1900 <= a.year <= 2200:
        return _fail(f"year {a.year} is out of range")
    days, uncovered = calendar_year(policy, a.year, a.region, workdays=a.include_workdays)
    if a.format == "json":
        print(json.dumps(days, ensure_ascii=False))
    else:
        for d in days:
            mark = "  (provisional)" if d.get("provisional") else ""
            print(f"{d['date']}  {d['reason']:<8}  {d['name']}{mark}")
        closed = sum(1 for d in days if d["reason"] != "workday")
        print(f"{closed} days closed to subject classes in {a.year}")
    if uncovered:
        print(f"tutorgate: the national calendar has no data for {a.year} "
              f"({_ranges(uncovered)}; it ends {policy.national.covered_until}): the "
              "statutory days fixed by law and weekends are listed as provisional, make-up "
              "working days are unknown; add rest_days.calendar_files from the State Council "
              "notice", file=sys.stderr)
        return EXIT_CALENDAR_GAP
    return 0


def _ranges(dates: Sequence[dt.date]) -> str:
    """2027-01-01..2027-12-31, 2028-01-05: runs of consecutive dates."""
    runs: list[list[dt.date]] = []
    for d in dates:
        if runs and (d - runs[-1][-1]).days == 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
