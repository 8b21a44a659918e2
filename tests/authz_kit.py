"""Shared by the decision-service tests: a policy where every rule of the
decision table can be met at once, the requests that meet them, and a
comparison of two answers as a client sees them."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from kit import FORBIDDEN, SUBJECT, TZ, policy_text

AUTHZ = "/_tutorgate/authz"


def rules_policy() -> str:
    """Base lessons of 60 s; regions that meet curfew, rest_day, a 1 s lesson
    (break_required) and a 1 s day (daily_limit) right now."""
    now = dt.datetime.now(TZ)
    today = now.date()
    cf = ((now - dt.timedelta(hours=1)).strftime("%H:%M"),
          (now + dt.timedelta(hours=1)).strftime("%H:%M"))
    extra = (
        "regions:\n"
        "  brk: {lesson: {max_duration: 1s, min_break: 60s}}\n"
        "  daily: {daily_max: 1s}\n"
        f'  cf: {{curfew: {{start: "{cf[0]}", end: "{cf[1]}"}}}}\n'
        f"  rd: {{rest_days: {{extra_holidays: [{today}, {today + dt.timedelta(days=1)}]}}}}\n")
    return policy_text(max_duration="60s", min_break="60s", extra=extra)


# (rule, path, headers): one request that meets each stateless rule
STATELESS: list[tuple[str, str, dict[str, str]]] = [
    ("bad_path", "/classroom/subject/a%2Fb", {"X-Student-Id": "s-badpath"}),
    ("forbidden_feature", FORBIDDEN, {}),
    ("identity_required", SUBJECT, {}),
    ("bad_identity", SUBJECT, {"X-Student-Id": "no spaces allowed"}),
    ("preschool", SUBJECT, {"X-Student-Id": "s-pre", "X-Student-Grade": "preschool"}),
    ("curfew", SUBJECT, {"X-Student-Id": "s-cf", "X-Student-Region": "cf"}),
    ("rest_day", SUBJECT, {"X-Student-Id": "s-rd", "X-Student-Region": "rd"}),
]
# (rule, headers): met by a second request 1.1 s after an allowed one
STATEFUL: list[tuple[str, dict[str, str]]] = [
    ("break_required", {"X-Student-Id": "s-brk", "X-Student-Region": "brk"}),
    ("daily_limit", {"X-Student-Id": "s-daily", "X-Student-Region": "daily"}),
]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None,
                method: str = "GET") -> Answer:
    async with http.request(method, url, headers=headers or {}) as r:
        return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())


def assert_same_denial(got: Answer, want: Answer, rule: str) -> None:
    """What a client sees of a denial: status, Content-Type, body, Retry-After
    (a second apart at most: the two answers come a moment apart)."""
    assert got.status == want.status, (rule, got, want)
    assert got.headers.get("content-type") == want.headers.get("content-type"), rule
    assert got.headers.get("content-language") == want.headers.get("content-language"), rule
    ra, rb = got.headers.get("retry-after"), want.headers.get("retry-after")
    assert (ra is None) == (rb is None), (rule, ra, rb)
    if ra is not None and rb is not None:
        assert abs(int(ra) - int(rb)) <= 1, (rule, ra, rb)
    if "json" in (want.headers.get("content-type") or ""):
        a, b = got.json(), want.json()
        assert a["rule"] == b["rule"] == rule
        assert a["message"] == b["message"]
        if a["retry_after"] is None or b["retry_after"] is None:
            assert a["retry_after"] == b["retry_after"]
        else:
            assert abs(a["retry_after"] - b["retry_after"]) <= 1
    else:  # the page: the same, unless the wait shown differs by that second
        if ra == rb:
            assert got.body == want.body, rule
        assert rule.encode() in got.body
