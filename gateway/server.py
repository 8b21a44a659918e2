"""The HTTP server's connection layer: slow, idle and surplus clients, and
logs that hostile input cannot flood.

aiohttp's server has no request-head timeout: a client that trickles header
bytes holds its socket for the keep-alive timeout (an hour by default), and
a thousand of them exhaust the process's open files, so that even the admin
port stops answering. Here every connection gets one lazily rescheduled
timer (not one per request), a cap on open connections leaves file
descriptors for upstream sockets, Redis and the admin port, and aiohttp's
per-request tracebacks for malformed requests become one warning line a
second per kind.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import HttpProcessingError

from .metrics import Metrics

log = logging.getLogger("tutorgate.server")

HEADER_TIMEOUT = 10.0
# aiohttp's own default is an hour; 75 s is what browsers and nginx expect.
KEEPALIVE_TIMEOUT = 75.0
# File descriptors kept out of the connection budget: Redis, the admin port
# and its scrapers, the policy and calendar files, logs, DNS.
FD_RESERVE = 128
# How many of the oldest connections one new arrival looks at for one to evict:
# bounds the work an accept does at the cap, whatever the number of connections.
EVICT_SCAN = 256

# Sent to a connection refused at the cap, before any request is read.
_BUSY_BODY = (b'{"rule": "too_many_connections", "message": "the gateway is at its connection '
              b'limit; try again", "retry_after": 1}\n')
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


# ---------------------------------------------------------------- logging

class RateLimitedLog:
    """At most one line per kind per `interval` seconds; the next line of a
    kind says how many were held back since the last one.

    A client can make the server fail a request as often as it likes; what
    it must not be able to do is fill the disk or bury the one line an
    operator needs."""

    MAX_KINDS = 512  # kinds are class names and fixed texts; this is a backstop

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def emit(self, level: int, kind: str, msg: str, *args: object,
             exc_info: BaseException | None = None) -> bool:
        """Log unless this kind logged within the interval; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        if last is None and len(self._last) >= self.MAX_KINDS:
            self._last.clear()
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held and last is not None:
            msg += f" ({held} more like it in the last {now - last:.0f}s not logged)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short printable line: parser errors quote the
    client's bytes, which may hold newlines and control characters."""
    text = " ".join(str(exc).split())
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text[:limit] + ("..." if len(text) > limit else "")


# ---------------------------------------------------------------- limits

@dataclass(frozen=True)
class ConnLimits:
    header_timeout: float = HEADER_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    max_connections: int | None = None  # None: no cap


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. above fs.nr_open
            return soft, soft
        return soft, target
    return soft, soft


def default_max_connections(open_files: int, pool_size: int) -> int:
    """Client connections that fit in `open_files`: each proxied request
    also holds an upstream socket (at most `pool_size` of them), and
    FD_RESERVE stays free for everything else."""
    room = max(open_files - FD_RESERVE, 32)
    upstream = min(pool_size, room // 2)
    return max(room - upstream, 16)


class ConnGuard:
    """One listener's connections: the cap, the timeouts, the counts.

    `open` is in accept order (dicts keep insertion order), so the oldest
    connection without a request under way is found from the front."""

    def __init__(self, limits: ConnLimits, metrics: Metrics | None = None,
                 logger: logging.Logger = log) -> None:
        self.limits = limits
        self.open: dict[GuardedHandler, None] = {}
        self.metrics = metrics
        self.logs = RateLimitedLog(logger)
        self._refused: dict[str, Any] = {}
        self._timeouts: dict[str, Any] = {}
        if metrics is not None:
            self._refused = {r: metrics.connections_refused.labels(r)
                             for r in ("limit", "evicted")}
            self._timeouts = {k: metrics.client_timeouts.labels(k) for k in ("head", "idle")}

    def admit(self, handler: GuardedHandler) -> bool:
        """Take a new connection; at the cap, close the oldest one that has
        no request under way to make room, or refuse this one."""
        cap = self.limits.max_connections
        if cap is not None and len(self.open) >= cap:
            victim = self._oldest_waiting()
            if victim is None:
                self._count(self._refused, "limit")
                self.logs.emit(logging.WARNING, "refused",
                               "connection refused: %d client connections open "
                               "(TUTORGATE_MAX_CONNECTIONS)", len(self.open))
                return False
            self._count(self._refused, "evicted")
            self.open.pop(victim, None)
            victim.force_close()
        self.open[handler] = None
        return True

    def _oldest_waiting(self) -> GuardedHandler | None:
        busy = []
        found = None
        for i, h in enumerate(self.open):
            if i >= EVICT_SCAN:
                break
            if h.waiting():
                found = h
                break
            busy.append(h)
        # busy ones go to the back: the next search starts with others
        for h in busy:
            del self.open[h]
            self.open[h] = None
        return found

    def forget(self, handler: GuardedHandler) -> None:
        self.open.pop(handler, None)

    def timed_out(self, kind: str) -> None:
        self._count(self._timeouts, kind)

    @staticmethod
    def _count(cells: dict[str, Any], key: str) -> None:
        cell = cells.get(key)
        if cell is not None:
            cell.inc()


# ---------------------------------------------------------------- the protocol

# aiohttp's own, called directly: super() builds an object per call
_data_received = web_protocol.RequestHandler.data_received


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's connection protocol with a request-head deadline, a place
    under the connection cap, and rate-limited error logs."""

    __slots__ = ("_admitted", "_guard", "_head_deadline", "_head_timer")

    def __init__(self, manager: web_server.Server, *, guard: ConnGuard, **kw: Any) -> None:
        super().__init__(manager, **kw)
        self._guard = guard
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(self):
            assert isinstance(transport, asyncio.Transport)
            transport.write(BUSY)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        # the first request's head is due this long after the connection opened
        self._arm(self._loop.time() + self._guard.limits.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.forget(self)
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._admitted:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        _data_received(self, data)
        if self._request_count != count:
            self._head_deadline = None  # a whole head arrived
        elif self._head_deadline is None and data:
            # No head completed, so the parser left the waiter and the
            # messages as they were: idle before these bytes means they
            # are the first of a keep-alive connection's next request.
            # (Checked after parsing: a head that comes whole, the usual
            # case, costs no clock reading and no timer work.)
            waiter = self._waiter
            if waiter is not None and not waiter.done() and not self._messages:
                self._arm(self._loop.time() + self._guard.limits.header_timeout)

    def waiting(self) -> bool:
        """No request under way: its head not complete yet, or idle between
        keep-alive requests. Closing such a connection loses no answer."""
        if self._request_count == 0:
            return True
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _arm(self, deadline: float) -> None:
        self._head_deadline = deadline
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(deadline, self._check_head)

    def _check_head(self) -> None:
        # One timer per connection, moved forward lazily: a request whose
        # head arrives in time costs two attribute writes, not a timer.
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self._force_close:
            return
        if self._loop.time() < deadline:
            self._head_timer = self._loop.call_at(deadline, self._check_head)
            return
        self._head_deadline = None
        self._guard.timed_out("head")
        self.force_close()

    def _process_keepalive(self) -> None:
        closed = self._force_close
        super()._process_keepalive()
        if self._force_close and not closed:
            self._guard.timed_out("idle")

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if not isinstance(exc, BaseException):
            exc = None
        guard = self._guard
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            # the client's fault: answered 4xx; no traceback, one line a second
            kind = type(exc).__name__
            if guard.metrics is not None:
                guard.metrics.malformed_requests.labels(kind).inc()
            guard.logs.emit(logging.WARNING, kind, "malformed request: %s: %s", kind,
                            one_line(exc))
            return
        # Ours: a genuine internal error keeps its traceback, but one kind of
        # failure cannot write one per request.
        what = str(args[0]) if args else "error"
        what = what.split(" from ")[0]  # aiohttp adds the client's address
        kind = f"{what}:{type(exc).__name__}" if exc is not None else what
        guard.logs.emit(logging.ERROR, kind, "%s", what, exc_info=exc)


class GuardedServer(web_server.Server):
    """aiohttp's Server making GuardedHandler connections."""

    def __init__(self, like: web_server.Server, guard: ConnGuard) -> None:
        super().__init__(like.request_handler, request_factory=like.request_factory,
                         handler_cancellation=like.handler_cancellation, loop=like._loop,
                         **like._kwargs)
        self.guard = guard

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """web.AppRunner whose server applies ConnLimits (sites take it as is)."""

    def __init__(self, app: web.Application, guard: ConnGuard, **kw: Any) -> None:
        kw.setdefault("keepalive_timeout", guard.limits.keepalive_timeout)
        super().__init__(app, **kw)
        self.guard = guard

    async def setup(self) -> None:
        """Start the app; if a resource fails to start, release the ones its
        cleanup contexts had started before raising (aiohttp leaves them)."""
        try:
            await super().setup()
        except BaseException:
            await self._cleanup_server()
            raise

    async def _make_server(self) -> web_server.Server:
        return GuardedServer(await super()._make_server(), self.guard)
