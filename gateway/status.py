"""`GET /_tutorgate/status`: a student's clock, for a platform's countdown.

Same identity rules as a lesson route. Read-only: asking does not start a
lesson or count as activity.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from . import rules
from .clock import in_lesson, lesson_end, lesson_remaining
from .errors import StoreUnavailable
from .policy import Route, stage_of
from .responses import denial

if TYPE_CHECKING:
    from .app import Gateway

_PROBE = Route("/_tutorgate/status", "lesson", "subject", None, None)


def _iso(ts: float, tz: dt.tzinfo) -> str:
    return dt.datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def _down(x: float) -> int:
    return max(math.floor(x), 0)


async def student_status(gw: Gateway, request: web.Request) -> web.Response:
    rt = gw.runtime
    policy = rt.policy
    student = rt.identify(request.headers, request.cookies)
    if student.problem is not None:
        rule = rules.IDENTITY_REQUIRED if student.problem == "missing" else rules.BAD_IDENTITY
        json_only = CIMultiDict(request.headers)
        json_only["Accept"] = "application/json"  # an API: never the page
        return denial(rule, None, json_only, policy.locale)
    assert student.key is not None
    grade = student.grade
    profile = policy.profile(student.region, stage_of(grade) if isinstance(grade, int) else None)
    try:
        state, now = await gw.store.peek(student.key)
    except StoreUnavailable:
        return denial(rules.STATE_UNAVAILABLE, None, request.headers, policy.locale)
    limits = rules.clock_limits(policy, profile)
    inside, to_end, to_start = rules.curfew_times(profile, now)
    today, _ = rules.local_day(profile, now)
    rest = profile.calendar.rest_day(today)
    out: dict[str, Any] = {
        "state": "free", "lesson_remaining": None, "break_remaining": None,
        "next_lesson_at": _iso(now, profile.tz), "rule": None, "why": "a lesson may start now",
        "open_connections": state.conns,
        "curfew": {"active": inside, "starts_in": None if inside else _down(to_start),
                   "ends_in": _down(to_end) if inside else None},
        "subject_rest_day": None if rest is None else {"reason": rest.reason, "name": rest.name},
        "limits": {"max_duration": limits.max_duration, "min_break": limits.min_break,
                   "daily_max": limits.daily_max},
    }
    if grade == "preschool":
        out.update(state="closed", rule=rules.PRESCHOOL, next_lesson_at=None,
                   why="no online training for preschool children")
    elif inside:
        out.update(state="closed", rule=rules.CURFEW, next_lesson_at=_iso(now + to_end, profile.tz),
                   why="inside the curfew")
    elif in_lesson(state, now, limits):
        # the clock's own rule (lesson or daily limit), then the curfew; `now`
        # is Redis's (peek), never this host's
        rem = min(lesson_remaining(state, now, limits, today.toordinal()), to_start)
        out.update(state="lesson", lesson_remaining=_down(rem),
                   why="a lesson is in progress: it must end in lesson_remaining seconds")
    else:
        ended = lesson_end(state, limits)
        if ended is not None and now < ended[1]:
            out.update(state="break", break_remaining=math.ceil(ended[1] - now),
                       rule=rules.BREAK_REQUIRED, next_lesson_at=_iso(ended[1], profile.tz),
                       why="the break after the last lesson is not over")
    return web.Response(text=json.dumps(out, ensure_ascii=False), content_type="application/json",
                        headers={"Cache-Control": "no-store"})
