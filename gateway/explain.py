"""Offline answers for operators: `explain` one request, `calendar` a year."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from . import rules
from .clock import ClockState
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
    if region is not None and not policy.knows_region(region):
        out["note"] = f"region {region!r} is not in the policy: the base policy applies"
    return out


def render(result: dict[str, Any], path: str, at: dt.datetime) -> str:
    lines = [f"{path} at {at.isoformat()}: {result['decision'].upper()}"
             + (f" ({result['rule']})" if result["rule"] else "")]
    if result.get("retry_after") is not None:
        lines.append(f"  retry after {result['retry_after']} s")
    if result.get("lesson_remaining") is not None:
        lines.append(f"  lesson remaining {result['lesson_remaining']} s")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    for c in result["checked"]:
        mark = "x" if c["applies"] else "-"
        lines.append(f"  [{mark}] {c['rule']:<18} {c['why']}")
    return "\n".join(lines)


def calendar_year(policy: Policy, year: int,
                  region: str | None = None) -> tuple[list[dict[str, str]], bool]:
    """Days of `year` closed to subject classes, and whether the national
    calendar lacks data for it."""
    profile = policy.profile(region, None)
    cal = profile.calendar
    days = cal.rest_days_in(dt.date(year, 1, 1), dt.date(year, 12, 31))
    gap = not cal.covers(dt.date(year, 1, 1)) or not cal.covers(dt.date(year, 12, 31))
    return [{"date": d.date.isoformat(), "reason": d.reason, "name": d.name} for d in days], gap
