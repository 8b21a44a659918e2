"""Offline answers for operators: `explain` one request, `calendar` a year."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from . import rules
from .clock import ClockState
from .durations import human_duration
from .identity import parse_grade
from .paths import Refused, canonical
from .policy import Policy


def explain(policy: Policy, path: str, at: dt.datetime, *, grade: str | None = None,
            region: str | None = None, lesson_started: dt.datetime | None = None,
            ) -> dict[str, Any]:
    """The decision for an identified student asking for `path` at `at`.
    With `lesson_started`, a lesson has been active since then."""
    now = at.timestamp()
    target = canonical(path, policy.case_sensitive_paths)
    if isinstance(target, Refused):
        return {"decision": "deny", "rule": rules.BAD_PATH, "retry_after": None,
                "lesson_remaining": None, "route": None,
                "checked": [{"rule": rules.BAD_PATH, "applies": True, "why": target.why}]}
    route = policy.match(target.key)
    if route is None:
        return {"decision": "allow", "rule": None, "retry_after": None, "lesson_remaining": None,
                "checked": [], "route": None,
                "note": "no route matches: passed through, unenforced"}
    g, ok = parse_grade(grade)
    if not ok:
        student = rules.Student(problem="malformed",
                                why=f"grade {grade!r} is not preschool or 1-12")
    else:
        student = rules.Student(key="explain", grade=g, region=region)
    state = ClockState()
    if lesson_started is not None:
        start = lesson_started.timestamp()
        # a lesson that has been active all along: last activity just now
        state = ClockState(start=start, last=now, conns=1)
    decision, _ = rules.decide(policy, route, student, state, now)
    out: dict[str, Any] = {
        "decision": "allow" if decision.allowed else "deny",
        "rule": decision.rule,
        "retry_after": None if decision.retry_after is None else math.ceil(decision.retry_after),
        "lesson_remaining": None if decision.lesson_remaining is None
        else math.floor(decision.lesson_remaining),
        "checked": [{"rule": c.rule, "applies": c.applies, "why": c.why} for c in decision.checked],
        "route": {"prefix": route.prefix, "kind": route.kind, "category": route.category},
        "region": decision.region,
    }
    if decision.shadowed:
        out["shadowed"] = list(decision.shadowed)
    if decision.provisional:
        # Only when true: the answer rests on the law's days, not a notice (issue 10).
        out["provisional"] = True
    if region is not None and not policy.knows_region(region):
        out["note"] = f"region {region!r} is not in the policy: the base policy applies"
    return out


MARKS = {True: "x", False: "-"}
LEGEND = "legend: [x] the rule applies, [-] it does not"


def _duration(seconds: int) -> str:
    """Readable, with the exact figure the JSON form gives beside it."""
    text = human_duration(seconds)
    return text if seconds < 60 else f"{text} ({seconds} s)"


def render(result: dict[str, Any], path: str, at: dt.datetime) -> str:
    lines = [f"{path} at {at.isoformat()}: {result['decision'].upper()}"
             + (f" ({result['rule']})" if result["rule"] else "")]
    if result.get("retry_after") is not None:
        lines.append(f"  retry after {_duration(result['retry_after'])}")
    if result.get("lesson_remaining") is not None:
        lines.append(f"  lesson remaining {_duration(result['lesson_remaining'])}")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    if result.get("provisional"):
        lines.append("  provisional: the date lies beyond the official holiday calendar; the "
                     "law's statutory days and weekends are assumed until the notice is added")
    for c in result["checked"]:
        lines.append(f"  [{MARKS[bool(c['applies'])]}] {c['rule']:<18} {c['why']}")
    if result["checked"]:
        lines.append(f"  {LEGEND}")
    return "\n".join(lines)


def calendar_year(policy: Policy, year: int, region: str | None = None, *,
                  workdays: bool = False) -> tuple[list[dict[str, Any]], list[dt.date]]:
    """Days of `year` closed to subject classes, in date order, and the dates
    the official calendar data does not cover. A day that rests on the law's
    fallback carries `"provisional": true` (only then, so the contract's
    three keys stay as they were). With `workdays`, make-up school days
    (调休 and the policy's extra workdays on rest days) are merged in with
    reason "workday": that list is no longer "closed days" only."""
    cal = policy.profile(region, None).calendar
    first, last = dt.date(year, 1, 1), dt.date(year, 12, 31)
    out: list[tuple[dt.date, dict[str, Any]]] = []
    for d in cal.rest_days_in(first, last):
        entry: dict[str, Any] = {"date": d.date.isoformat(), "reason": d.reason, "name": d.name}
        if d.provisional:
            entry["provisional"] = True
        out.append((d.date, entry))
    if workdays:
        out += [(w.date, {"date": w.date.isoformat(), "reason": "workday", "name": w.name})
                for w in cal.makeup_workdays_in(first, last)]
        out.sort(key=lambda x: x[0])
    uncovered = [first + dt.timedelta(days=n) for n in range((last - first).days + 1)
                 if not cal.covers(first + dt.timedelta(days=n))]
    return [e for _, e in out], uncovered
