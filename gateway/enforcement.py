"""Enforcement: who is asking, the rules, the lesson clock. No forwarding.

`Enforcer.enforce(route, headers, request, websocket)` is the whole
decision for one request on an enforced route: identity -> precheck -> one
clock step in the store -> finish -> observe (metrics, activity, audit,
lesson reports). It returns a `Verdict`, the decision plus what forwarding
needs; the proxy (proxy.py) relays on it, and a decision service can answer
with it alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from . import logs, rules
from .activity import ActivityView
from .clock import Step, break_honoured
from .codes import Rule
from .errors import StoreUnavailable
from .forwarding import Closer
from .identity import Identify
from .lessons import AuditHook, LessonBook
from .live import Kind, LiveConn, LiveRegistry, new_conn_id
from .metrics import Metrics
from .paths import Refused
from .policy import Policy, Route
from .server import RateLimitedLog
from .store.base import StateStore
from .timesource import Clock

log = logging.getLogger("tutorgate.proxy")
_malformed = RateLimitedLog(log)

Headers = CIMultiDictProxy[str] | CIMultiDict[str]


class Counted(Protocol):
    def inc(self, amount: float = 1.0) -> None: ...


class HasCookies(Protocol):
    """Where a request's cookies are, read only if the identity needs them
    (an aiohttp request parses its Cookie header on first use)."""

    @property
    def cookies(self) -> Mapping[str, str]: ...


@dataclass
class Runtime:
    """What enforcement needs of the policy; swapped whole on a reload."""

    policy: Policy
    identify: Identify


@dataclass(slots=True)  # not frozen: built per lesson request (see rules.Decision)
class Lesson:
    """An allowed lesson request: who, where, what the clock said; the
    `forwarding.Watch` of the connection it may hold open."""

    student: rules.Student
    key: str
    route: Route
    decision: rules.Decision
    conn_id: str | None  # a lease taken in the same clock step (WebSockets)
    live: LiveRegistry
    store: StateStore

    def headers(self, websocket: bool) -> dict[str, str]:
        remaining = self.decision.lesson_remaining or 0.0
        out = {"X-Lesson-Remaining": str(max(math.floor(remaining), 0))}
        if websocket:
            # live connections also get the exact cut-off time (Unix seconds)
            out["X-Lesson-Deadline"] = f"{self.deadline():.3f}"
        return out

    def deadline(self) -> float:
        """When the lesson must end, on the store's clock (clock.step_deadline)."""
        d = self.decision
        if d.deadline is not None:
            return d.deadline
        return self.live.clock.now() + (d.lesson_remaining or 0.0)

    def open(self, kind: Kind, close: Closer) -> LiveConn:
        conn = LiveConn(self.key, self.conn_id or new_conn_id(), kind, close,
                        held=self.conn_id is not None, student=self.student, route=self.route)
        self.live.add(conn, self.deadline(), self.decision.end_rule)
        return conn

    async def refused(self) -> None:
        if self.conn_id is not None:
            with contextlib.suppress(StoreUnavailable):
                await self.store.release(self.key, self.conn_id)


@dataclass(slots=True)
class Verdict:
    """One request's answer on an enforced route; `lesson` when it is an
    allowed lesson request."""

    decision: rules.Decision
    route: Route
    lesson: Lesson | None = None


_NO_COOKIES: dict[str, str] = {}


class Enforcer:
    def __init__(self, runtime: Runtime, store: StateStore, metrics: Metrics,
                 live: LiveRegistry, activity: ActivityView, lessons: LessonBook) -> None:
        self.rt = runtime
        self.store = store
        # The store's clock: the curfew check and every deadline use it.
        self.clock: Clock = store.clock
        self.metrics = metrics
        self.live = live
        self.activity = activity
        self.lessons = lessons
        self.on_event: AuditHook | None = None
        self._counts: dict[tuple[str, str | None, str, str], Counted] = {}

    def count(self, decision: str, rule: str | None, category: str, region: str) -> None:
        key = (decision, rule, category, region)
        # the series, kept: labels() is one more call on every request
        cell = self._counts.get(key)
        if cell is None:
            cell = self._counts[key] = self.metrics.decisions.labels(
                decision, rule or "none", category, region)
        cell.inc()

    def refuse_path(self, refused: Refused) -> rules.Decision:
        """bad_path: first in the decision table, on any route."""
        self.count("deny", Rule.BAD_PATH, "none", "base")
        if self.on_event is not None:
            self.on_event("deny", None, Rule.BAD_PATH, "none", "base")
        # a client can send these as fast as it likes: one line a second at most
        _malformed.emit(logging.WARNING, "bad_path", "bad_path: %s", refused.why)
        return rules.Decision(False, Rule.BAD_PATH)

    async def enforce(self, route: Route, headers: Headers, request: HasCookies,
                      ws: bool) -> Verdict:
        """The decision on one request to an enforced route the caller has
        matched (`policy.match` of the canonical target; the request itself,
        not a closure over it: one allocation less). An allowed lesson step
        counts as activity, as a forwarded one would."""
        rt = self.rt
        policy = rt.policy
        ctx = logs.current.get()
        if ctx is not None:
            ctx.route = route.prefix
        if route.kind == "lesson":
            identify = rt.identify
            student = identify(headers,
                               request.cookies if identify.uses_cookies else _NO_COOKIES)
            if student.region is not None and not policy.knows_region(student.region):
                self.metrics.unknown_region.inc()
            if ctx is not None:
                ctx.student = student.key
        else:
            student = rules.Student(problem="missing")
        pre = rules.precheck(policy, route, student, self.clock.now())
        conn_id = new_conn_id() if ws else None
        if isinstance(pre, rules.Pending):
            assert student.key is not None
            try:
                # store latency, errors and up are reported by the store itself
                step = await self.store.advance(student.key, pre.limits, pre.day,
                                                pre.seconds_to_day_end, hold=conn_id)
            except StoreUnavailable:
                decision = rules.unavailable(pre, policy.fail_open)
                if decision.allowed:
                    self.metrics.fail_open.labels(route.category).inc()
                conn_id = None
            else:
                decision = rules.finish(pre, step)
                self._observe(student.key, step, pre)
        else:
            decision = pre
            conn_id = None
        self._record(decision, route, student, ctx)
        lesson = None
        if decision.allowed and route.kind == "lesson" and student.key is not None \
                and decision.step is not None:
            lesson = Lesson(student, student.key, route, decision, conn_id, self.live,
                            self.store)
        return Verdict(decision, route, lesson)

    def _record(self, decision: rules.Decision, route: Route, student: rules.Student,
                ctx: logs.RequestContext | None) -> None:
        """Count and log the decision (and audit a denial)."""
        region = decision.region
        if ctx is not None:
            ctx.region = region
        for rule in decision.shadowed:
            self.count("shadow_deny", rule, route.category, region)
            log.info("shadow deny: %s (%s)", rule, route.category, extra={"rule": rule})
        if decision.allowed:
            self.count("allow", None, route.category, region)
            return
        self.count("deny", decision.rule, route.category, region)
        log.info("denied: %s (%s)", decision.rule, route.category,
                 extra={"rule": decision.rule})
        if self.on_event is not None:
            self.on_event("deny", student.key, decision.rule, route.category, region)

    def _observe(self, key: str, step: Step, pre: rules.Pending) -> None:
        """What this instance learns from a clock step: gauges, lesson
        starts, the end of the lesson a new one follows."""
        region = pre.profile.region
        if step.outcome == "allow":
            self.activity.lesson(key, step.start, step.now, pre.limits)
            if not step.started:
                return
            self.metrics.lessons_started.labels(region).inc()
            honoured = None
            if step.ended_duration is not None and step.ended_start is not None:
                honoured = step.break_taken is not None and \
                    break_honoured(step.break_taken, pre.limits)
                self.metrics.breaks_honoured.labels("true" if honoured else "false").inc()
                self.lessons.followed(key, step.ended_start, step.ended_duration,
                                      pre.route.category, region)
            if self.on_event is not None:
                self.on_event("lesson_start", key, None, pre.route.category, region,
                              break_seconds=step.break_taken, break_honoured=honoured)
            self.lessons.started(key, step.start, pre.limits, pre.route.category, region)
        elif step.outcome == "break_required" and step.retry_after is not None:
            self.activity.in_break(key, step.now + step.retry_after)
