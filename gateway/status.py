"""`GET /_tutorgate/status`: a student's clock, for a platform's countdown.

Same identity rules as a lesson route. Read-only: asking does not start a
lesson or count as activity. The countdown is the clock's own deadline
(clock.lesson_deadline), the one X-Lesson-Remaining and the live cut-offs
come from.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from . import logs, rules
from .clock import ClockState, Limits, in_lesson, lesson_deadline, lesson_end
from .codes import Rule
from .enforcement import Enforcer
from .errors import StoreUnavailable
from .policy import stage_of
from .responses import denial


def _iso(ts: float, tz: dt.tzinfo) -> str:
    return dt.datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def _down(x: float) -> int:
    return max(math.floor(x), 0)


def clock_view(state: ClockState, now: float, limits: Limits, day: int,
               until_curfew: float) -> dict[str, Any]:
    """The lesson or break the state holds at `now`, outside the curfew:
    state, lesson_remaining, break_remaining, rule, and when the next lesson
    may start (Unix seconds; None = now)."""
    if in_lesson(state, now, limits):
        d = lesson_deadline(state, now, limits, day, until_curfew)
        return {"state": "lesson", "lesson_remaining": _down(d.at - now), "rule": None,
                "next_at": None}
    ended = lesson_end(state, limits)
    if ended is not None and now < ended[1]:
        return {"state": "break", "break_remaining": math.ceil(ended[1] - now),
                "rule": Rule.BREAK_REQUIRED, "next_at": ended[1]}
    return {"state": "free", "next_at": None}


_WHY = {"lesson": "a lesson is in progress: it must end in lesson_remaining seconds",
        "break": "the break after the last lesson is not over",
        "free": "a lesson may start now"}


async def student_status(enforcer: Enforcer, request: web.Request) -> web.Response:
    """The student's clock as JSON (the contract's status endpoint)."""
    logs.begin_request(request.headers.get(logs.REQUEST_ID))
    rt = enforcer.rt
    policy = rt.policy
    student = rt.identify(request.headers, request.cookies)
    if student.problem is not None:
        rule = Rule.IDENTITY_REQUIRED if student.problem == "missing" else Rule.BAD_IDENTITY
        json_only = CIMultiDict(request.headers)
        json_only["Accept"] = "application/json"  # an API: never the page
        return denial(rule, None, json_only, policy.locale)
    assert student.key is not None
    grade = student.grade
    profile = policy.profile(student.region, stage_of(grade) if isinstance(grade, int) else None)
    try:
        # `now` is the store's (Redis's), never this host's
        state, now = await enforcer.store.peek(student.key)
    except StoreUnavailable:
        return denial(Rule.STATE_UNAVAILABLE, None, request.headers, policy.locale)
    limits = profile.limits
    inside, to_end, to_start = rules.curfew_times(profile, now)
    today, _ = rules.local_day(profile, now)
    rest = profile.calendar.rest_day(today)
    out: dict[str, Any] = {
        "state": "free", "lesson_remaining": None, "break_remaining": None,
        "next_lesson_at": _iso(now, profile.tz), "rule": None, "why": _WHY["free"],
        "open_connections": state.conns,
        "curfew": {"active": inside, "starts_in": None if inside else _down(to_start),
                   "ends_in": _down(to_end) if inside else None},
        "subject_rest_day": None if rest is None else {"reason": rest.reason, "name": rest.name},
        "limits": {"max_duration": limits.max_duration, "min_break": limits.min_break,
                   "daily_max": limits.daily_max},
    }
    if grade == "preschool":
        out.update(state="closed", rule=Rule.PRESCHOOL, next_lesson_at=None,
                   why="no online training for preschool children")
    elif inside:
        out.update(state="closed", rule=Rule.CURFEW, next_lesson_at=_iso(now + to_end, profile.tz),
                   why="inside the curfew")
    else:
        view = clock_view(state, now, limits, today.toordinal(), to_start)
        next_at = view.pop("next_at")
        out.update(view, why=_WHY[view["state"]])
        if next_at is not None:
            out["next_lesson_at"] = _iso(next_at, profile.tz)
    return web.Response(text=json.dumps(out, ensure_ascii=False), content_type="application/json",
                        headers={"Cache-Control": "no-store", logs.REQUEST_ID: logs.request_id()})
