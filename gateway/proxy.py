"""The reverse proxy: HTTP and WebSocket forwarding, decisions, denials.

Everything a route does not enforce passes through untouched and costs no
state-store call. On an enforced route the engine decides (rules.py), the
store runs the lesson clock in one atomic call, and only then does the
request go upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import logs, rules
from .activity import ActivityView
from .clock import ClockLimits, in_lesson, lesson_end
from .errors import StoreUnavailable
from .identity import Identify
from .live import CLOSE_CODES, LiveConn, LiveRegistry, new_conn_id
from .metrics import Metrics
from .paths import Refused, Target, canonical
from .policy import Policy, Route
from .responses import denial
from .server import RateLimitedLog
from .settings import UPSTREAM_POOL
from .store.base import StateStore
from .timesource import Clock

log = logging.getLogger("tutorgate.proxy")
_malformed = RateLimitedLog(log)

# RFC 9110 7.6.1 hop-by-hop fields, plus Host (the upstream's is set by the client).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate", "host",
})
FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# The client side of the upstream WebSocket regenerates these.
WS_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
})
# Request headers never forwarded as they came (lower case), for plain requests
# and for WebSocket handshakes.
_NOT_FORWARDED = HOP_BY_HOP | FORWARDED
_NOT_FORWARDED_WS = _NOT_FORWARDED | WS_HANDSHAKE
# Headers aiohttp would add to a request that lacks them (besides Host).
_NO_AUTO_HEADERS: CIMultiDict[None] = CIMultiDict(
    (h, None) for h in ("Accept", "Accept-Encoding", "Content-Type", "User-Agent"))
# An ended lesson's report is claimed once fleet-wide for this long.
CLAIM_TTL = 2 * 86400.0
OWNED_MAX = 200_000
# Bodies up to this size are read whole: one write is cheaper than a stream.
SMALL_BODY = 256 * 1024
# Close codes a close frame must never carry (RFC 6455 7.4.1).
_RESERVED_CLOSE = frozenset({1004, 1005, 1006, 1015})


@dataclass(slots=True)  # not frozen: see rules.Decision
class Lesson:
    """An allowed lesson request: who, where, and what the clock said."""

    student: rules.Student
    key: str
    route: Route
    decision: rules.Decision
    conn_id: str | None  # a lease taken in the same clock step (WebSockets)


class UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's client request, adding nothing the client did not send.

    aiohttp fills in Accept, Accept-Encoding, User-Agent, and a Content-Type
    for bodies; a transparent proxy must not. Its own way to skip them (a
    session's skip_auto_headers) copies the headers into two more multidicts
    on every request; this costs nothing."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS


@dataclass
class Runtime:
    """What the proxy needs; swapped whole on a policy reload."""

    policy: Policy
    identify: Identify


class Proxy:
    def __init__(self, runtime: Runtime, store: StateStore, metrics: Metrics,
                 live: LiveRegistry, activity: ActivityView, upstream: str,
                 max_body: int | None = None, read_timeout: float | None = 300.0,
                 on_event: Callable[..., None] | None = None) -> None:
        self.rt = runtime
        self.store = store
        # The store's clock: the curfew check and every deadline use it.
        self.clock: Clock = store.clock
        self.metrics = metrics
        self.live = live
        self.activity = activity
        self.upstream = URL(upstream.rstrip("/"))
        # the canonical target is appended as it is (encoded=True): never re-quoted
        self._base = str(self.upstream)
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.session: aiohttp.ClientSession | None = None
        self.on_event = on_event  # audit hook: (event, key, rule, category, region)
        # lessons this instance started, until reported ended:
        # key -> (start, limits, category, region)
        self.owned: dict[str, tuple[float, ClockLimits, str, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Pre-bound counters: labels() per request costs a dict lookup and a lock.
        self._decision_children: dict[tuple[str, str, str, str], Any] = {}
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        self._latency = {k: metrics.upstream_latency.labels(k)
                         for k in ("passthrough", "lesson", "forbidden")}

    # ------------------------------------------------------------ lifecycle

    async def start(self, pool_size: int = UPSTREAM_POOL) -> None:
        connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=0, ttl_dns_cache=300,
                                         keepalive_timeout=30, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one student's cookies to another
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=5),
            request_class=UpstreamRequest,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _timeout(self, sock_read: float | None) -> aiohttp.ClientTimeout:
        """One ClientTimeout per read timeout in use, not one per request."""
        t = self._timeouts.get(sock_read)
        if t is None:
            t = self._timeouts[sock_read] = aiohttp.ClientTimeout(
                total=None, connect=10, sock_connect=5, sock_read=sock_read)
        return t

    # ------------------------------------------------------------ metrics

    def count(self, decision: str, rule: str | None, category: str, region: str) -> None:
        k = (decision, rule or "none", category, region)
        child = self._decision_children.get(k)
        if child is None:
            child = self._decision_children[k] = self.metrics.decisions.labels(*k)
        child.inc()

    # ------------------------------------------------------------ entry

    async def handle(self, request: web.Request) -> web.StreamResponse:
        logs.begin_request(request.headers.get(logs.REQUEST_ID))
        rt = self.rt
        # One path for matching and forwarding; absolute-form targets lose
        # their scheme and host here (paths.py).
        target = canonical(request.raw_path, rt.policy.case_sensitive_paths)
        if isinstance(target, Refused):
            return self.refuse_path(request, target)
        route = rt.policy.match(target.key)
        if route is None:
            if _is_websocket(request):
                return await self.websocket(request, target, None, None, None)
            return await self.forward(request, target, None)
        return await self.enforce(request, target, rt, route)

    def refuse_path(self, request: web.Request, refused: Refused) -> web.Response:
        """bad_path: first in the decision table, on any route."""
        self.count("deny", rules.BAD_PATH, "none", "base")
        if self.on_event is not None:
            self.on_event("deny", None, rules.BAD_PATH, "none", "base")
        # a client can send these as fast as it likes: one line a second at most
        _malformed.emit(logging.WARNING, "bad_path", "bad_path: %s", refused.why)
        return denial(rules.BAD_PATH, None, request.headers, self.rt.policy.locale)

    async def enforce(self, request: web.Request, target: Target, rt: Runtime,
                      route: Route) -> web.StreamResponse:
        ws = _is_websocket(request)
        decision, lesson = await self.decide(rt, route, request.headers,
                                             request.cookies if rt.identify.uses_cookies
                                             else _NO_COOKIES, ws)
        if not decision.allowed:
            return denial(decision.rule or rules.STATE_UNAVAILABLE, decision.retry_after,
                          request.headers, rt.policy.locale)
        if ws:
            return await self.websocket(request, target, route, lesson, decision)
        return await self.forward(request, target, route, lesson)

    async def decide(self, rt: Runtime, route: Route, headers: CIMultiDictProxy[str],
                     cookies: Mapping[str, str], hold: bool,
                     ) -> tuple[rules.Decision, Lesson | None]:
        """The enforcement half of a request on an enforced route, without
        forwarding: identity, rules, the store's clock step, metrics, logs
        and audit. `hold` takes a connection lease in the same step (a
        WebSocket this process will hold)."""
        policy = rt.policy
        ctx = logs.current.get()
        if ctx is not None:
            ctx.route = route.prefix
        if route.kind == "lesson":
            student = rt.identify(headers, cookies)
            if student.region is not None and not policy.knows_region(student.region):
                self.metrics.unknown_region.inc()
            if ctx is not None:
                ctx.student = student.key
        else:
            student = rules.Student(problem="missing")
        now = self.clock.now()
        pre = rules.precheck(policy, route, student, now)
        conn_id = new_conn_id() if hold else None
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
                self._observe_step(student.key, step, pre, decision)
        else:
            decision = pre
            conn_id = None
        region = decision.region
        if ctx is not None:
            ctx.region = region
        for rule in decision.shadowed:
            self.count("shadow_deny", rule, route.category, region)
            log.info("shadow deny: %s (%s)", rule, route.category, extra={"rule": rule})
        if not decision.allowed:
            self.count("deny", decision.rule, route.category, region)
            log.info("denied: %s (%s)", decision.rule, route.category,
                     extra={"rule": decision.rule})
            if self.on_event is not None:
                self.on_event("deny", student.key, decision.rule, route.category, region)
            return decision, None
        self.count("allow", None, route.category, region)
        lesson = None
        if route.kind == "lesson" and student.key is not None and decision.step is not None:
            lesson = Lesson(student, student.key, route, decision, conn_id)
        return decision, lesson

    def _observe_step(self, key: str, step: Any, pre: rules.Pending,
                      decision: rules.Decision) -> None:
        region = pre.profile.region
        if step.outcome == "allow":
            self.activity.lesson(key, step.start, step.now, pre.limits)
            if step.started:
                self.metrics.lessons_started.labels(region).inc()
                honoured = None
                if step.ended_duration is not None and step.ended_start is not None:
                    honoured = step.break_taken is not None and \
                        step.break_taken >= pre.limits.min_break - 1e-6
                    self.metrics.breaks_honoured.labels("true" if honoured else "false").inc()
                    # The lesson this one follows may have been reported already
                    # by the sweep of the instance that started it.
                    self._spawn(self.report_end(key, step.ended_start, step.ended_duration,
                                                pre.route.category, region))
                if self.on_event is not None:
                    self.on_event("lesson_start", key, None, pre.route.category, region,
                                  break_seconds=step.break_taken, break_honoured=honoured)
                if len(self.owned) >= OWNED_MAX:
                    self.owned.clear()
                self.owned[key] = (step.start, pre.limits, pre.route.category, region)
        elif step.outcome == "break_required" and step.retry_after is not None:
            self.activity.in_break(key, step.now + step.retry_after)

    # ------------------------------------------------------------ lesson ends

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def report_end(self, key: str, start: float, duration: float, category: str,
                         region: str) -> None:
        """Record an ended lesson once fleet-wide: its length in the histogram
        and a lesson_end audit event."""
        try:
            first = await self.store.claim(key, repr(start), CLAIM_TTL)
        except StoreUnavailable:
            log.warning("a lesson's end could not be recorded: the state store is down")
            return
        if not first:
            return
        self.metrics.lesson_duration.labels(region).observe(duration)
        if self.on_event is not None:
            self.on_event("lesson_end", key, None, category, region, duration=duration)

    async def sweep_ended(self) -> None:
        """Report the lessons this instance started that are over by now
        (limit or quiet time) although no next lesson has closed them."""
        now = self.clock.now()
        for key, (start, limits, category, region) in list(self.owned.items()):
            # the local view first: a lesson plainly going on needs no look
            if now < start + limits.max_duration and \
                    self.activity.last_seen(key, 0.0) + limits.min_break > now:
                continue
            try:
                state, t = await self.store.peek(key)
            except StoreUnavailable:
                return
            if state.start != start:
                # a next lesson started: its first request reported this one
                self.owned.pop(key, None)
            elif not in_lesson(state, t, limits):
                ended = lesson_end(state, limits)
                self.owned.pop(key, None)
                if ended is not None:
                    await self.report_end(key, start, ended[0] - start, category, region)

    # ------------------------------------------------------------ HTTP

    async def forward(self, request: web.Request, target: Target, route: Route | None,
                      lesson: Lesson | None = None,
                      ) -> web.StreamResponse:
        assert self.session is not None
        if self.max_body is not None and (request.content_length or 0) > self.max_body:
            return denial("body_too_large", None, request.headers, self.rt.policy.locale,
                          status=413)
        url = URL(self._base + target.origin, encoded=True)
        headers = upstream_headers(request)
        data: Any = None
        body: _CappedBody | None = None
        if request.body_exists:
            data = body = _CappedBody(request.content, self.max_body)
        read_timeout = route.read_timeout if route and route.read_timeout else self.read_timeout
        kind = "passthrough" if route is None else route.kind
        t0 = time.perf_counter()
        try:
            up = await self.session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False,
                timeout=self._timeout(read_timeout),
                compress=None, chunked=None, auto_decompress=False)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            # the client wraps the body's own error: ask the body what happened
            if body is not None and body.over:
                return denial("body_too_large", None, request.headers, self.rt.policy.locale,
                              status=413)
            if isinstance(e, TimeoutError):
                return self._upstream_error(request, "timeout", 504)
            log.warning("upstream request failed: %s: %s", type(e).__name__, e)
            return self._upstream_error(request, "connect", 502)
        self._latency[kind].observe(time.perf_counter() - t0)
        try:
            return await self._respond(request, up, lesson)
        finally:
            up.release()

    def _upstream_error(self, request: web.Request, reason: str, status: int) -> web.Response:
        self.metrics.upstream_errors.labels(reason).inc()
        return denial(rules.UPSTREAM_ERROR, None, request.headers, self.rt.policy.locale,
                      status=status)

    async def _respond(self, request: web.Request, up: aiohttp.ClientResponse,
                       lesson: Lesson | None,
                       ) -> web.StreamResponse:
        headers = response_headers(up.headers)
        if lesson is not None:
            remaining = lesson.decision.lesson_remaining or 0.0
            headers["X-Lesson-Remaining"] = str(max(math.floor(remaining), 0))
        length = up.content_length
        no_body = request.method == "HEAD" or up.status in (204, 304) or up.status < 200
        if not no_body and length is not None and length <= SMALL_BODY:
            try:
                body = await up.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                return self._upstream_error(request, "broken", 502)
            headers.popall("Content-Length", None)
            return web.Response(status=up.status, reason=up.reason, headers=headers, body=body)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if no_body:
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        conn: LiveConn | None = None
        if lesson is not None:
            conn = await self._hold_stream(request, up, lesson, up.headers.get("Content-Type", ""))
        await resp.prepare(request)
        try:
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.CancelledError) as e:
            # Upstream broke mid-body, the client left, or we cut the stream:
            # nothing more can be said on this response; end the connection.
            if isinstance(e, asyncio.CancelledError) and (conn is None or not conn.cutting):
                raise
            if request.transport is not None:
                request.transport.close()
        finally:
            if conn is not None:
                await self.live.discard(conn)
        return resp

    async def _hold_stream(self, request: web.Request, up: aiohttp.ClientResponse,
                           lesson: Lesson,
                           ctype: str) -> LiveConn:
        """A lesson body that streams: it is activity while open and is cut at
        the lesson's deadline."""
        task = asyncio.current_task()

        async def close(rule: str) -> None:
            up.close()
            if request.transport is not None:
                request.transport.close()
            if task is not None and task is not asyncio.current_task():
                task.cancel()

        conn = LiveConn(lesson.key, new_conn_id(), "stream", close, held=False,
                        student=lesson.student, route=lesson.route)
        deadline, rule = deadline_of(lesson.decision, self.clock)
        self.live.add(conn, deadline, rule)
        return conn

    # ------------------------------------------------------------ WebSocket

    async def websocket(self, request: web.Request, target: Target, route: Route | None,
                        lesson: Lesson | None,
                        decision: rules.Decision | None) -> web.StreamResponse:
        assert self.session is not None
        url = URL(self._base + target.origin, encoded=True)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "")
                     .split(",") if p.strip()]
        try:
            up_ws = await self.session.ws_connect(
                url, headers=upstream_headers(request, websocket=True), protocols=protocols,
                autoping=False, autoclose=False, max_msg_size=0, compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("upstream WebSocket failed: %s: %s", type(e).__name__, e)
            if lesson is not None and lesson.conn_id is not None:
                await self._release_quietly(lesson.key, lesson.conn_id)
            status = e.status if isinstance(e, aiohttp.WSServerHandshakeError) else 502
            if status < 400:
                status = 502
            return self._upstream_error(request, "connect", status if status >= 500 else 502)
        ws = web.WebSocketResponse(protocols=[up_ws.protocol] if up_ws.protocol else (),
                                   autoping=False, autoclose=False, max_msg_size=0)
        if lesson is not None:
            ws.headers["X-Lesson-Remaining"] = str(
                max(math.floor(lesson.decision.lesson_remaining or 0.0), 0))
            # live connections also get the exact cut-off time (Unix seconds)
            ws.headers["X-Lesson-Deadline"] = f"{deadline_of(lesson.decision, self.clock)[0]:.3f}"
        await ws.prepare(request)
        conn: LiveConn | None = None
        if lesson is not None:
            async def close(rule: str) -> None:
                code = CLOSE_CODES.get(rule, 4000)
                await asyncio.gather(ws.close(code=code, message=rule.encode()),
                                     up_ws.close(code=1001, message=b"lesson closed"),
                                     return_exceptions=True)

            conn = LiveConn(lesson.key, lesson.conn_id or new_conn_id(), "websocket", close,
                            held=lesson.conn_id is not None, student=lesson.student,
                            route=lesson.route)
            deadline, rule = deadline_of(lesson.decision, self.clock)
            self.live.add(conn, deadline, rule)
        else:
            self.live.untracked.add((ws, up_ws))
        try:
            await relay(ws, up_ws)
        finally:
            if conn is not None:
                await self.live.discard(conn)
            else:
                self.live.untracked.discard((ws, up_ws))
            if not up_ws.closed:
                await up_ws.close()
        return ws

    async def _release_quietly(self, key: str, conn_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.store.release(key, conn_id)


_NO_COOKIES: dict[str, str] = {}


class _BodyTooLarge(Exception):
    pass


class _CappedBody:
    """The client's body streamed upstream, stopped past the cap.

    Stopping raises inside aiohttp's request writer, which aborts the
    upstream connection before the final chunk (the upstream never sees a
    complete request) and reports a ClientError of its own: `over` tells
    the proxy it was the cap (413), not the upstream (502)."""

    __slots__ = ("content", "max_body", "over")

    def __init__(self, content: aiohttp.StreamReader, max_body: int | None) -> None:
        self.content = content
        self.max_body = max_body
        self.over = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        cap = self.max_body
        async for chunk in self.content.iter_any():
            seen += len(chunk)
            if cap is not None and seen > cap:
                self.over = True
                raise _BodyTooLarge
            yield chunk


def deadline_of(decision: rules.Decision, clock: Clock) -> tuple[float, str]:
    """When a lesson connection must close (on the store's clock), and the
    rule that closes it."""
    now = decision.step.now if decision.step is not None else clock.now()
    return now + (decision.lesson_remaining or 0.0), decision.end_rule


async def relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Both directions until either side closes; close frames pass through."""

    async def pump(src: Any, dst: Any) -> None:
        while True:
            msg = await src.receive()
            t = msg.type
            if t is WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif t is WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif t is WSMsgType.PING:
                await dst.ping(msg.data)
            elif t is WSMsgType.PONG:
                await dst.pong(msg.data)
            elif t is WSMsgType.CLOSE:
                code = msg.data if isinstance(msg.data, int) else 1000
                if code in _RESERVED_CLOSE:
                    code = 1000
                await dst.close(code=code, message=(msg.extra or "").encode()
                                if isinstance(msg.extra, str) else b"")
                return
            else:  # CLOSING, CLOSED, ERROR
                if not dst.closed:
                    await dst.close(code=1011 if t is WSMsgType.ERROR else 1000)
                return

    a = asyncio.ensure_future(pump(client, upstream))
    b = asyncio.ensure_future(pump(upstream, client))
    try:
        await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (a, b):
            if not t.done():
                t.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        if not client.closed:
            await client.close()


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for v in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in v.split(",") if t.strip())
    return tokens


def upstream_headers(request: web.Request, websocket: bool = False) -> CIMultiDict[str]:
    """End-to-end request headers, plus X-Forwarded-*."""
    src = request.headers
    drop = _NOT_FORWARDED_WS if websocket else _NOT_FORWARDED
    if "Connection" in src:  # it may name more hop-by-hop fields
        drop = drop | _connection_tokens(src)
    out = CIMultiDict([(k, v) for k, v in src.items() if k.lower() not in drop])
    peer = request.remote or ""
    prior = src.getall("X-Forwarded-For", None)
    out["X-Forwarded-For"] = f"{', '.join(prior)}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    host = src.get("Host")
    if host is not None:
        out["X-Forwarded-Host"] = host
    ctx = logs.current.get()
    out[logs.REQUEST_ID] = ctx.request_id if ctx is not None else logs.new_request_id()
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP
    if "Connection" in headers:
        drop = drop | _connection_tokens(headers)
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])
