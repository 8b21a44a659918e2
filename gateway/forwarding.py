"""Forwarding: HTTP and WebSocket relay to the upstream. No rules.

What a request may do was decided before it gets here (enforcement.py);
an enforced lesson comes with a `Watch`, the only thing forwarding knows
of it: the headers it adds to the answer and the live connection it opens
for a body that streams or a WebSocket, so the lesson can be cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import logs
from .codes import CLOSE_CODES, Rule
from .live import Kind, LiveConn, LiveRegistry
from .messages import Locale
from .metrics import Metrics
from .paths import Target
from .responses import denial
from .settings import UPSTREAM_POOL

log = logging.getLogger("tutorgate.proxy")

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
# Bodies up to this size are read whole: one write is cheaper than a stream.
SMALL_BODY = 256 * 1024
# Close codes a close frame must never carry (RFC 6455 7.4.1).
_RESERVED_CLOSE = frozenset({1004, 1005, 1006, 1015})

Closer = Callable[[str], Awaitable[None]]


class Observer(Protocol):
    def observe(self, value: float) -> None: ...


class Watch(Protocol):
    """An enforced lesson, as forwarding sees it."""

    def headers(self, websocket: bool) -> Mapping[str, str]:
        """Headers the answer carries (X-Lesson-Remaining ...)."""
        ...

    def open(self, kind: Kind, close: Closer) -> LiveConn:
        """A connection that stays open (a streamed body, a WebSocket) is
        activity until it ends, and `close(rule)` cuts it at the deadline."""
        ...

    async def refused(self) -> None:
        """The upstream refused the WebSocket: the lease taken for it goes."""
        ...


class UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's client request, adding nothing the client did not send.

    aiohttp fills in Accept, Accept-Encoding, User-Agent, and a Content-Type
    for bodies; a transparent proxy must not. Its own way to skip them (a
    session's skip_auto_headers) copies the headers into two more multidicts
    on every request; this costs nothing."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS


class Forwarder:
    """The upstream session and the relay of one request or WebSocket."""

    def __init__(self, upstream: str, metrics: Metrics, live: LiveRegistry,
                 locale: Callable[[], Locale], max_body: int | None = None,
                 read_timeout: float | None = 300.0) -> None:
        self.upstream = URL(upstream.rstrip("/"))
        # the canonical target is appended as it is (encoded=True): never re-quoted
        self._base = str(self.upstream)
        self.metrics = metrics
        self.live = live
        self.locale = locale  # the live policy's, for transport denials
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        # upstream_latency's series by kind: labels() is a call per request
        self._latency: dict[str, Observer] = {}

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

    # ------------------------------------------------------------ HTTP

    async def forward(self, request: web.Request, target: Target, kind: str,
                      read_timeout: float | None = None, watch: Watch | None = None,
                      ) -> web.StreamResponse:
        """Relay one request; `kind` labels the latency (passthrough, lesson,
        forbidden), `read_timeout` overrides the default one."""
        assert self.session is not None
        if self.max_body is not None and (request.content_length or 0) > self.max_body:
            return denial(Rule.BODY_TOO_LARGE, None, request.headers, self.locale())
        url = URL(self._base + target.path + target.query, encoded=True)
        rid = logs.request_id()  # once: it goes upstream and back
        headers = upstream_headers(request, rid=rid)
        data: Any = None
        body: _CappedBody | None = None
        if request.body_exists:
            data = body = _CappedBody(request.content, self.max_body)
        t0 = time.perf_counter()
        try:
            up = await self.session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False,
                timeout=self._timeout(read_timeout or self.read_timeout),
                compress=None, chunked=None, auto_decompress=False)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            # the client wraps the body's own error: ask the body what happened
            if body is not None and body.over:
                return denial(Rule.BODY_TOO_LARGE, None, request.headers, self.locale())
            if isinstance(e, TimeoutError):
                return self._upstream_error(request, "timeout", 504)
            log.warning("upstream request failed: %s: %s", type(e).__name__, e)
            return self._upstream_error(request, "connect", 502)
        latency = self._latency.get(kind)
        if latency is None:
            latency = self._latency[kind] = self.metrics.upstream_latency.labels(kind)
        latency.observe(time.perf_counter() - t0)
        try:
            return await self._respond(request, up, watch, rid)
        finally:
            up.release()

    def _upstream_error(self, request: web.Request, reason: str, status: int) -> web.Response:
        self.metrics.upstream_errors.labels(reason).inc()
        return denial(Rule.UPSTREAM_ERROR, None, request.headers, self.locale(), status=status)

    async def _respond(self, request: web.Request, up: aiohttp.ClientResponse,
                       watch: Watch | None, rid: str) -> web.StreamResponse:
        headers = response_headers(up.headers, rid)
        if watch is not None:
            headers.update(watch.headers(False))
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
        conn = None if watch is None else _hold_stream(request, up, watch)
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

    # ------------------------------------------------------------ WebSocket

    async def websocket(self, request: web.Request, target: Target,
                        watch: Watch | None = None) -> web.StreamResponse:
        """Connect upstream first (a refusal is 502), then relay both ways."""
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
            if watch is not None:
                await watch.refused()
            status = e.status if isinstance(e, aiohttp.WSServerHandshakeError) else 502
            return self._upstream_error(request, "connect", status if status >= 500 else 502)
        ws = web.WebSocketResponse(protocols=[up_ws.protocol] if up_ws.protocol else (),
                                   autoping=False, autoclose=False, max_msg_size=0)
        ws.headers[logs.REQUEST_ID] = logs.request_id()
        if watch is not None:
            ws.headers.update(watch.headers(True))
        await ws.prepare(request)
        conn: LiveConn | None = None
        if watch is not None:
            async def close(rule: str) -> None:
                code = CLOSE_CODES.get(rule, 4000)
                await asyncio.gather(ws.close(code=code, message=rule.encode()),
                                     up_ws.close(code=1001, message=b"lesson closed"),
                                     return_exceptions=True)

            conn = watch.open("websocket", close)
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


def _hold_stream(request: web.Request, up: aiohttp.ClientResponse, watch: Watch) -> LiveConn:
    """A lesson body that streams: it is activity while open and is cut at
    the lesson's deadline."""
    task = asyncio.current_task()

    async def close(rule: str) -> None:
        up.close()
        if request.transport is not None:
            request.transport.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    return watch.open("stream", close)


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


def is_websocket(headers: Mapping[str, str]) -> bool:
    return headers.get("Upgrade", "").lower() == "websocket"


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for v in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in v.split(",") if t.strip())
    return tokens


def upstream_headers(request: web.Request, websocket: bool = False,
                     rid: str | None = None) -> CIMultiDict[str]:
    """End-to-end request headers, plus X-Forwarded-* and the request id
    (`rid`, default the request's: logs.request_id)."""
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
    out[logs.REQUEST_ID] = rid or logs.request_id()
    return out


def response_headers(headers: CIMultiDictProxy[str], rid: str | None = None,
                     ) -> CIMultiDict[str]:
    """End-to-end response headers, plus the request id the request went
    upstream with (set here, not in a response signal: that costs ~2% of a
    request's instructions)."""
    drop = HOP_BY_HOP
    if "Connection" in headers:
        drop = drop | _connection_tokens(headers)
    out = CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])
    out[logs.REQUEST_ID] = rid or logs.request_id()
    return out
