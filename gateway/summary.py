"""`tutorgate check`: a plain summary of what a valid policy enforces."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .policy import Policy, Profile


def _dur(value: float | None) -> str:
    if value is None:
        return "none"
    seconds = int(value)  # policy durations are whole seconds
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _profile(p: Profile, today: dt.date, days: int) -> dict[str, Any]:
    rest = p.calendar.rest_days_in(today, today + dt.timedelta(days=days - 1))
    return {
        "timezone": p.tz.key,
        "curfew": f"{p.curfew_start:%H:%M:%S}-{p.curfew_end:%H:%M:%S}",
        "max_duration": _dur(p.limits.max_duration), "min_break": _dur(p.limits.min_break),
        "daily_max": _dur(p.limits.daily_max),
        "rest_days_next_30": [f"{r.date} {r.reason}: {r.name}"
                              + (" (provisional)" if r.provisional else "") for r in rest],
        "calendar_covered": p.calendar.covers(today + dt.timedelta(days=days - 1)),
    }


def _uses_national(policy: Policy) -> bool:
    return any(p.calendar.statutory_holidays for p in policy.profiles.values())


def summarize(policy: Policy, today: dt.date, days: int = 30) -> dict[str, Any]:
    m = policy.model
    regions = {"base": _profile(policy.profile(None, None), today, days)}
    for code in m.regions:
        regions[code] = _profile(policy.profile(code, None), today, days)
    stages = {}
    for stage in ("primary", "junior", "senior"):
        lim = policy.profile(None, stage).limits
        stages[stage] = {"max_duration": _dur(lim.max_duration),
                         "min_break": _dur(lim.min_break), "daily_max": _dur(lim.daily_max)}
    return {
        "valid": True, "source": policy.source, "version": m.version, "sha": policy.sha,
        "mode": m.mode, "shadow_rules": sorted(policy.shadow) if m.mode == "enforce" else "all",
        "failure_mode": m.failure_mode, "identity": m.identity.source,
        "calendar_covered_until": policy.national.covered_until.isoformat(),
        # the data ends within 60 days or has ended: say so before it bites (issue 10)
        "calendar_warning": policy.national.coverage_warning(today)
        if _uses_national(policy) else None,
        "routes": [{"prefix": r.prefix, "kind": r.kind, "category": r.category,
                    "feature": r.feature} for r in policy.routes],
        "stages": stages, "regions": regions,
    }


def render(s: dict[str, Any]) -> str:
    out = [f"{s['source']}: valid (version {s['version']}, sha {s['sha']})",
           f"mode: {s['mode']}" + (f", shadowed rules: {', '.join(s['shadow_rules'])}"
                                   if s["shadow_rules"] and s["mode"] == "enforce" else ""),
           f"when the state store is down: {s['failure_mode']}",
           f"identity: {s['identity']}",
           f"national calendar data until {s['calendar_covered_until']}",
           *([f"WARNING: {s['calendar_warning']}"] if s.get("calendar_warning") else []),
           "routes (first match wins; anything else passes through unenforced):"]
    for r in s["routes"]:
        what = f"lesson, {r['category']}" if r["kind"] == "lesson" else \
            f"forbidden ({r['feature'] or 'feature'})"
        out.append(f"  {r['prefix']:<28} {what}")
    out.append("lessons by stage:")
    for name, st in s["stages"].items():
        out.append(f"  {name:<8} max {st['max_duration']}, break {st['min_break']}, "
                   f"daily {st['daily_max']}")
    for name, p in s["regions"].items():
        out.append(f"region {name}: tz {p['timezone']}, curfew {p['curfew']}, lesson max "
                   f"{p['max_duration']}, break {p['min_break']}, daily {p['daily_max']}")
        rest = p["rest_days_next_30"]
        out.append(f"  rest days in the next 30 days ({len(rest)}):"
                   + ("" if rest else " none"))
        out.extend(f"    {r}" for r in rest)
        if not p["calendar_covered"]:
            out.append("  WARNING: the national calendar has no data for part of this period")
    return "\n".join(out)
