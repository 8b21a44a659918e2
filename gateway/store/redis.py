"""The Redis store: every gateway instance on one Redis shares each student's clock.

Each store method is one Lua script (`store/lua/<op>.lua`), so a student's
clock is read and updated atomically in one round trip. Keys:

    tutorgate:{<key>}:clock   hash start, last, day, used
    tutorgate:{<key>}:conns   zset conn_id -> lease expiry

`<key>` is the student's keyed hash, never a raw id; the `{...}` hash tag
keeps one student's keys in one cluster slot.

Cheap by design. A redis-py call per request costs the proxy about as much
CPU as the proxying itself (~4,800 -> ~2,700 req/s, docs/design.md), and that cost
is the client's per-call work, not Redis. So this store speaks RESP itself on
one multiplexed connection: the calls made during one event-loop pass are
packed into one buffer and written once (a `loop.call_soon` flush); replies
come back in order, are parsed by hiredis and handed to their callers through
a FIFO of futures. No batch waits for the previous one to be answered.
`bench/store_bench.py` measures this against plain redis-py.

Failures cost milliseconds: connecting and every write have `op_timeout`
(a call fails at worst 2 x op_timeout after it was made, when it had to wait
for a connection first), nothing is retried (a connection that times out is
dropped; the next call reconnects), and every failure reaches the caller as
`StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from ..clock import ClockLimits, ClockState, Outcome, Step
from ..errors import StoreUnavailable
from ..timesource import StoreClock
from .base import LEASE_SECONDS, Cut, CutHandler

log = logging.getLogger("tutorgate.store.redis")

OnCall = Callable[[str, float, bool], None]
"""Metrics hook: (op, seconds, ok) once per store call; it must be cheap."""

# Seconds between PINGs on an idle subscriber connection: how long a silently
# dead one (no FIN: a partition, a frozen host) can go unnoticed, times two.
SUBSCRIBER_PING = 5.0
# Subscriber reconnect delay after an outage: first, then doubling up to a cap.
SUBSCRIBER_BACKOFF = (0.05, 1.0)
# Students per write in `renew` (a few ms of Redis time).
RENEW_CHUNK = 500

_OUTCOMES: Final[dict[bytes, Outcome]] = {
    b"allow": "allow", b"break_required": "break_required", b"daily_limit": "daily_limit"}


class _Script:
    """One atomic operation: a .lua file, run by EVALSHA (EVAL after NOSCRIPT)
    on two keys. The command heads are packed once."""

    def __init__(self, name: str) -> None:
        lua = resources.files("gateway.store").joinpath("lua")
        # every script starts with the shared store clock (_clock.lua)
        self.body = (lua.joinpath("_clock.lua").read_text("utf-8")
                     + lua.joinpath(f"{name}.lua").read_text("utf-8"))
        self.sha = hashlib.sha1(self.body.encode()).hexdigest()
        self._heads = (f"$7\r\nEVALSHA\r\n$40\r\n{self.sha}\r\n$1\r\n2\r\n",
                       f"$4\r\nEVAL\r\n{_bulk(self.body)}$1\r\n2\r\n")

    def command(self, argc: int, packed: str, *, load: bool = False) -> bytes:
        """The command for `argc` keys and args already packed by `_bulks`."""
        return f"*{argc + 3}\r\n{self._heads[load]}{packed}".encode()


def _bulk(arg: str) -> str:
    # RESP counts bytes: len() of the str is that for ASCII, the usual case
    return f"${len(arg) if arg.isascii() else len(arg.encode())}\r\n{arg}\r\n"


def _bulks(args: Iterable[str]) -> str:
    """Arguments as RESP bulk strings. Building one str and encoding it once
    costs half of hiredis.pack_command on the same arguments."""
    return "".join([f"${len(a)}\r\n{a}\r\n" if a.isascii() else _bulk(a) for a in args])


def _pack(*args: str) -> bytes:
    """One plain command."""
    return f"*{len(args)}\r\n{_bulks(args)}".encode()


ADVANCE = _Script("advance")
RELEASE = _Script("release")
TOUCH = _Script("touch")
RENEW = _Script("renew")
PEEK = _Script("peek")
_LEASE = _bulk(repr(LEASE_SECONDS))

# The fast path (RedisStore.advance): a lesson this instance saw allowed by
# Redis goes on without waiting for Redis while it is more than FAST_MARGIN
# seconds from its limit and from the quiet time that would end it. Nothing
# another instance does can end such a lesson sooner (see `_continue`), so
# the knowledge holds until then; the activity is written behind, coalesced
# per student, every TOUCH_EVERY seconds.
FAST_MARGIN = 1.0
TOUCH_EVERY = 0.25
KNOWN_MAX = 200_000


class _Known:
    """A lesson in progress as Redis last answered for it, and its touch
    command without the time (packed once)."""

    __slots__ = ("end", "head", "last", "limits", "quiet", "start", "start_s")

    def __init__(self, start_s: str, start: float, last: float, limits: ClockLimits,
                 head: bytes, end: float) -> None:
        self.start_s, self.start, self.last = start_s, start, last  # start_s: as Redis holds it
        self.limits, self.head = limits, head
        self.end = end                                     # the lesson or the day's limit
        self.quiet = limits.min_break - FAST_MARGIN        # idle this long: ask Redis


class _Touches:
    """Stands in the reply queue for one write of touches, which nobody
    awaits: counts their replies, reports the write as one `touch` call,
    sends a touch whose script Redis forgot (NOSCRIPT) again as EVAL, and
    forgets a lesson Redis no longer holds (evicted, flushed, replaced)."""

    __slots__ = ("failed", "items", "seen", "store", "t0")

    def __init__(self, store: RedisStore, items: list[tuple[str, _Known]]) -> None:
        self.store, self.items, self.seen = store, items, 0
        self.failed: str | None = None
        self.t0 = time.perf_counter()

    def done(self) -> bool:
        return False

    def set_result(self, reply: Any) -> None:
        if reply != 1:  # 1: touched
            key, known = self.items[self.seen]
            if reply == 0:  # not the lesson we knew: ask Redis next time
                if self.store._known.get(key) is known:
                    del self.store._known[key]
            elif _noscript(reply):
                self.store._retouch(key, known)
            else:
                self.failed = str(reply)
        self.seen += 1
        if self.seen == len(self.items):
            self._end()

    def set_exception(self, exc: BaseException) -> None:
        # the connection died: every lesson re-syncs with Redis anyway
        self.failed = str(exc)
        self.seen += 1
        if self.seen == len(self.items):
            self._end()

    def _end(self) -> None:
        if self.failed is not None:
            log.warning("redis store: activity written behind was refused: %s", self.failed)
        self.store._report("touch", self.t0, self.failed is None)


def _noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def _opt(raw: bytes | None) -> float | None:
    return None if raw is None else float(raw)


@dataclass(frozen=True)
class _Target:
    """Where Redis is, from a redis://, rediss:// or unix:// URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> _Target:
        u = urlsplit(url)
        if u.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL (redis://, rediss://, unix://): {url!r}")
        db = parse_qs(u.query).get("db", [""])[0]
        if u.scheme != "unix" and not db:
            db = u.path.lstrip("/")
        return cls(host=u.hostname or "127.0.0.1", port=u.port or 6379,
                   path=u.path if u.scheme == "unix" else None, tls=u.scheme == "rediss",
                   username=unquote(u.username) if u.username else None,
                   password=unquote(u.password) if u.password else None, db=int(db or 0))

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"


class _Conn(asyncio.Protocol):
    """One Redis connection. RESP2 replies come back in request order, so a
    FIFO of futures pairs them with their callers. On a subscriber
    connection, replies nobody waits for go to `push`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.push: Callable[[Any], None] | None = None
        self.error: str | None = None     # why it is dead; None while alive
        self.sent = 0                      # requests written
        self.answered = 0                  # replies handed to their requests

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                if self.waiters:
                    self.answered += 1
                    fut = self.waiters.popleft()
                    if not fut.done():  # its caller may have been cancelled
                        fut.set_result(reply)
                elif self.push is not None:
                    self.push(reply)
                else:
                    self.fail("redis sent a reply nobody asked for")
                    return
        except hiredis.ProtocolError as exc:
            self.fail(f"redis protocol error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"redis connection lost: {exc}" if exc else "redis closed the connection")

    def send(self, data: bytes, futs: Sequence[asyncio.Future[Any]] = ()) -> None:
        if self.transport is None:
            raise RuntimeError("no transport")
        self.waiters.extend(futs)
        self.sent += len(futs)
        self.transport.write(data)

    def fail(self, why: str) -> None:
        """Dead for good: drop the socket, fail every caller still waiting."""
        if self.error is None:
            self.error = why
            if self.transport is not None:
                self.transport.abort()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(StoreUnavailable(why))
        if self.push is not None:
            push, self.push = self.push, None
            push(StoreUnavailable(why))


class RedisStore:
    """The shared state store (see the module docstring)."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str = "tutorgate:", op_timeout: float = 0.25,
                 on_call: OnCall | None = None, clock: StoreClock | None = None) -> None:
        # Redis TIME between readings: every reply that carries it anchors it
        self.clock = clock or StoreClock()
        self._target = _Target.parse(url)
        self._prefix = prefix
        self._channel = f"{prefix}cuts"
        self._timeout = op_timeout
        self._on_call = on_call
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: _Conn | None = None
        self._connecting: asyncio.Task[None] | None = None
        # Requests of this loop pass (written by the next `_flush`), and
        # requests waiting for a connection.
        self._batch: list[bytes] = []
        self._batch_futs: list[asyncio.Future[Any]] = []
        self._backlog: list[bytes] = []
        self._backlog_futs: list[asyncio.Future[Any]] = []
        self._limit_args: dict[ClockLimits, str] = {}
        self._known: dict[str, _Known] = {}
        # fast-path activity not yet written (the touches of the next flush)
        self._touching: dict[str, _Known] = {}
        self._handlers: list[CutHandler] = []
        self._subscriber: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False

    # ----------------------------------------------------------- the clock

    async def start(self) -> None:
        """Connect ahead of the first call. An unreachable Redis is no error
        here: readiness reports it and calls raise StoreUnavailable."""
        try:
            await self.now()  # anchors the clock before the first deadline
        except StoreUnavailable:
            log.warning("redis store: %s does not answer (yet)", self._target)

    async def advance(self, key: str, limits: ClockLimits, day: int, seconds_to_day_end: float,
                      *, hold: str | None = None, now: float | None = None) -> Step:
        if hold is None and now is None:
            fast = self._continue(key, limits)
            if fast is not None:
                return fast
        lim = self._limit_args.get(limits) or self._limits(limits)
        k = f"{self._prefix}{{{key}}}:"
        packed = (_bulks((k + "clock", k + "conns", "" if now is None else repr(now))) + lim
                  + _bulks((str(day), repr(seconds_to_day_end))) + _LEASE + _bulk(hold or ""))
        self._touch_first(key)
        try:
            r = (await self._eval("advance", ADVANCE, ((12, packed),)))[0]
        except StoreUnavailable:
            self._forget()
            raise
        step = Step(_OUTCOMES[r[0]], float(r[1]), float(r[2]), _opt(r[3]), _opt(r[4]),
                    started=r[5] == 1, ended_duration=_opt(r[6]), break_taken=_opt(r[7]),
                    shadowed=tuple(_OUTCOMES[x] for x in r[8].split(b",")) if r[8] else (),
                    ended_start=_opt(r[9]) if len(r) > 9 else None)
        if now is None:
            self.clock.observe(step.now)
            self._learn(key, limits, step, r[2].decode())
        return step

    def _learn(self, key: str, limits: ClockLimits, step: Step, start_s: str) -> None:
        """Remember a lesson Redis just allowed, for the fast path, until the
        lesson limit or, with a daily limit, the moment today's lesson time
        runs out, whichever comes first (Redis's `remaining`). A shadowed
        daily limit takes the script every time: only it counts the shadowed
        denials."""
        if step.outcome != "allow" or step.shadowed or step.remaining is None or \
                (limits.daily_max is not None and not limits.enforce_daily):
            self._known.pop(key, None)
            return
        if len(self._known) >= KNOWN_MAX:
            # keep the lessons still going; if that is all of them, start over
            t = step.now
            self._known = {k: v for k, v in self._known.items() if v.end > t}
            if len(self._known) >= KNOWN_MAX:
                self._forget()
        end = min(step.start + limits.max_duration, step.now + step.remaining)
        self._known[key] = _Known(start_s, step.start, step.now, limits,
                                  self._touch_head(key, start_s), end)

    def _touch_head(self, key: str, start_s: str, *, load: bool = False) -> bytes:
        """touch.lua's command for this lesson up to its last argument, the
        time, which is appended per touch."""
        return TOUCH.command(4, _bulks((*self._keys(key), start_s)), load=load)

    def _forget(self) -> None:
        """Drop what the fast path knows: every lesson asks Redis again (the
        activity not yet written still is, if Redis can take it)."""
        self._known.clear()

    def _continue(self, key: str, limits: ClockLimits) -> Step | None:
        """The fast path: a lesson known in progress goes on without a round
        trip. It never starts a lesson or ends a break (those take the atomic
        script), only continues one Redis allowed, while it is more than
        FAST_MARGIN seconds from its limit and from its quiet-time end (this
        instance's own last activity of it + min_break: activity elsewhere
        only moves that later), and from the day's limit if there is one (a
        new local day only gives more). Nothing else ends a lesson early: a
        held connection or a shadowed rule always takes the script, a policy
        reload brings new limits, and a cut or a new connection to Redis
        (maybe a restarted one) forgets what was known. The activity is
        written behind (touch.lua), at most TOUCH_EVERY seconds late."""
        known = self._known.get(key)
        if known is None or known.limits is not limits:
            return None
        conn = self._conn
        if conn is None or conn.error is not None:
            return None
        t = self.clock.now()
        if t >= known.end - FAST_MARGIN or t - known.last >= known.quiet:
            return None
        if t > known.last:
            known.last = t
        touching = self._touching
        if not touching:
            assert self._loop is not None
            self._loop.call_later(TOUCH_EVERY, self._flush_touches)
        touching[key] = known
        return Step("allow", t, known.start, known.end - t, None)

    def _touch_first(self, key: str) -> None:
        """Queue the student's unwritten activity ahead of a script about to
        read it (same write, so Redis runs it first)."""
        known = self._touching.pop(key, None)
        if known is not None:
            self._queue_touches([(key, known)])

    def _flush_touches(self) -> None:
        items = list(self._touching.items())
        self._touching.clear()
        if items:
            self._queue_touches(items)

    def _queue_touches(self, items: list[tuple[str, _Known]], *, load: bool = False) -> None:
        conn = self._conn
        if self._closed or conn is None or conn.error is not None:
            return  # not written: the lessons re-sync through the script
        assert self._loop is not None
        # with load, EVAL: it caches the script again
        commands = [(self._touch_head(key, known.start_s, load=True) if load else known.head)
                    + _bulk(str(int(known.last * 1e6))).encode() for key, known in items]
        if not self._batch:
            self._loop.call_soon(self._flush)
        self._batch.extend(commands)
        waiter = cast(asyncio.Future[Any], _Touches(self, items))
        self._batch_futs.extend([waiter] * len(items))

    def _retouch(self, key: str, known: _Known) -> None:
        """A touch met NOSCRIPT (Redis's script cache was emptied): again, as EVAL."""
        self._queue_touches([(key, known)], load=True)

    async def release(self, key: str, conn_id: str, *, now: float | None = None) -> None:
        packed = _bulks((*self._keys(key), _now_arg(now), conn_id))
        await self._eval("release", RELEASE, ((4, packed),))

    async def renew(self, leases: Sequence[tuple[str, str]], *, now: float | None = None) -> None:
        # One script per student (its keys share a slot), RENEW_CHUNK students
        # per write: one giant write would hold Redis, and every other call
        # behind it, past op_timeout.
        by_key: dict[str, list[str]] = {}
        for key, conn_id in leases:
            by_key.setdefault(key, []).append(conn_id)
        t = _bulk(_now_arg(now)) + _LEASE
        calls = [(4 + len(ids), _bulks(self._keys(key)) + t + _bulks(ids))
                 for key, ids in by_key.items()]
        for i in range(0, len(calls), RENEW_CHUNK):
            await self._eval("renew", RENEW, calls[i:i + RENEW_CHUNK])

    async def peek(self, key: str, *, now: float | None = None) -> tuple[ClockState, float]:
        packed = _bulks((*self._keys(key), _now_arg(now)))
        self._touch_first(key)
        r = (await self._eval("peek", PEEK, ((3, packed),)))[0]
        state = ClockState(start=float(r[1] or 0), last=float(r[2] or 0), conns=int(r[5]),
                           day=int(float(r[3] or 0)), used=float(r[4] or 0))
        t = float(r[0])
        if now is None:
            self.clock.observe(t)
        return state, t

    async def now(self) -> float:
        sec, usec = await self._command("now", ("TIME",))
        t = float(sec + b"." + usec.rjust(6, b"0"))  # read as the scripts read it
        self.clock.observe(t)
        return t

    async def ping(self) -> bool:
        try:
            return bool(await self._command("ping", ("PING",)) == b"PONG")
        except StoreUnavailable:
            return False

    # ----------------------------------------------------------- cuts

    async def claim(self, key: str, token: str, ttl: float) -> bool:
        reply = await self._command("claim", ("SET", f"{self._prefix}{{{key}}}:claim:{token}",
                                              "1", "NX", "PX", str(int(ttl * 1000))))
        return reply is not None

    async def publish_cut(self, cut: Cut) -> None:
        msg = json.dumps({"key": cut.key, "rule": cut.rule, "origin": cut.origin})
        await self._command("publish", ("PUBLISH", self._channel, msg))

    async def subscribe_cuts(self, handler: CutHandler) -> None:
        """Register `handler`; the first call starts the subscriber task, which
        reconnects by itself. Returns once subscribed, or after a short wait
        while Redis is down (cuts published meanwhile are lost: pub/sub)."""
        self._handlers.append(handler)
        if self._subscriber is None:
            self._subscriber = asyncio.get_running_loop().create_task(
                self._listen(), name="tutorgate-redis-cuts")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, 4 * self._timeout)):
                await self._subscribed.wait()

    async def _listen(self) -> None:
        delay = SUBSCRIBER_BACKOFF[0]
        while True:
            conn: _Conn | None = None
            try:
                conn = await self._open(subscriber=True)
                inbox: asyncio.Queue[Any] = asyncio.Queue()
                conn.push = inbox.put_nowait
                conn.send(_pack("SUBSCRIBE", self._channel))
                pinged = False
                while True:
                    try:
                        async with asyncio.timeout(SUBSCRIBER_PING):
                            msg = await inbox.get()
                    except TimeoutError:
                        if pinged:
                            raise StoreUnavailable(
                                "redis did not answer the subscriber's PING") from None
                        conn.send(_pack("PING"))
                        pinged = True
                        continue
                    pinged = False
                    if isinstance(msg, StoreUnavailable):
                        raise msg
                    if msg[0] == b"message":
                        await self._dispatch(msg[2])
                    elif msg[0] == b"subscribe":
                        self._subscribed.set()
                        delay = SUBSCRIBER_BACKOFF[0]
            except StoreUnavailable as exc:
                self._subscribed.clear()
                log.warning("cuts subscriber: %s; reconnecting in %.2fs", exc, delay)
            except Exception:  # a bug here must not end fleet-wide cuts for good
                self._subscribed.clear()
                log.exception("cuts subscriber failed; reconnecting in %.2fs", delay)
            finally:
                if conn is not None:
                    conn.fail("subscriber stopped")
            await asyncio.sleep(delay)
            delay = min(delay * 2, SUBSCRIBER_BACKOFF[1])

    async def _dispatch(self, data: bytes) -> None:
        try:
            d = json.loads(data)
            cut = Cut(key=str(d["key"]), rule=str(d["rule"]), origin=str(d["origin"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", self._channel)
            return
        self._known.pop(cut.key, None)  # the fast path must ask Redis again
        for handler in list(self._handlers):
            try:
                result = handler(cut)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # one failing handler must not stop the others
                log.exception("a cut handler failed")

    async def close(self) -> None:
        if self._touching and not self._closed:
            # the last activity written behind: replies come in order, so the
            # touches are answered when the PING is
            self._flush_touches()
            await self.ping()
        self._closed = True
        for task in (self._subscriber, self._connecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._subscriber = self._connecting = None
        self._handlers.clear()
        if self._conn is not None:
            self._conn.fail("redis store closed")
        self._fail_waiting("redis store closed")

    # ----------------------------------------------------------- calls

    def _keys(self, key: str) -> tuple[str, str]:
        k = f"{self._prefix}{{{key}}}:"
        return k + "clock", k + "conns"

    def _limits(self, limits: ClockLimits) -> str:
        """advance.lua's arguments for `limits`, packed once per policy profile."""
        if len(self._limit_args) > 64:  # policy reloads: keep the cache bounded
            self._limit_args.clear()
        packed = _bulks((repr(limits.max_duration), repr(limits.min_break),
                         "" if limits.daily_max is None else repr(limits.daily_max),
                         "1" if limits.enforce_break else "0",
                         "1" if limits.enforce_daily else "0"))
        self._limit_args[limits] = packed
        return packed

    async def _eval(self, op: str, script: _Script, calls: Sequence[tuple[int, str]]) -> list[Any]:
        """Run `script` once per (argc, packed keys and args) in `calls`, all
        written in this loop pass."""
        return await self._checked(op, [script.command(n, a) for n, a in calls], script, calls)

    async def _command(self, op: str, args: Sequence[str]) -> Any:
        return (await self._checked(op, [_pack(*args)]))[0]

    async def _checked(self, op: str, commands: list[bytes], script: _Script | None = None,
                       calls: Sequence[tuple[int, str]] = ()) -> list[Any]:
        """Send, recover a flushed script cache, turn error replies into
        StoreUnavailable, and report the call either way."""
        t0 = time.perf_counter()
        try:
            replies = await self._send(commands)
            again = [i for i, r in enumerate(replies) if _noscript(r)] if script else []
            if again:
                assert script is not None
                # The script cache was emptied (SCRIPT FLUSH, a restart, a
                # failover): EVAL runs the script and caches it again.
                redo = await self._send([script.command(*calls[i], load=True) for i in again])
                for i, r in zip(again, redo, strict=True):
                    replies[i] = r
            for r in replies:
                if isinstance(r, hiredis.ReplyError):
                    raise StoreUnavailable(f"redis refused {op}: {r}")
        except StoreUnavailable:
            self._report(op, t0, False)
            raise
        self._report(op, t0, True)
        return replies

    def _report(self, op: str, t0: float, ok: bool) -> None:
        if self._on_call is not None:
            try:
                self._on_call(op, time.perf_counter() - t0, ok)
            except Exception:  # metrics must never fail a call
                log.exception("on_call hook failed")

    async def _send(self, commands: list[bytes]) -> list[Any]:
        """Queue packed commands for this loop pass's write; their replies."""
        if self._closed:
            raise StoreUnavailable("redis store closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if not self._batch:
            loop.call_soon(self._flush)
        futs = [loop.create_future() for _ in commands]
        self._batch.extend(commands)
        self._batch_futs.extend(futs)
        if len(futs) == 1:
            return [await futs[0]]
        return list(await asyncio.gather(*futs))  # gather retrieves every failure

    def _flush(self) -> None:
        """Write everything queued during the last loop pass, in one write."""
        data, futs = b"".join(self._batch), self._batch_futs
        self._batch, self._batch_futs = [], []
        if not futs:  # failed by close() meanwhile
            return
        conn = self._conn
        if conn is not None and conn.error is None:
            self._write(conn, data, futs)
            return
        self._backlog.append(data)
        self._backlog_futs.extend(futs)
        if self._connecting is None and not self._closed:
            assert self._loop is not None
            self._connecting = self._loop.create_task(self._reconnect())

    def _write(self, conn: _Conn, data: bytes, futs: list[asyncio.Future[Any]]) -> None:
        try:
            conn.send(data, futs)
        except Exception as exc:  # whatever breaks, no caller may wait forever
            conn.fail(f"redis write failed: {exc!r}")
            for fut in futs:
                if not fut.done():
                    fut.set_exception(StoreUnavailable(f"redis write failed: {exc!r}"))
            return
        # One timer per write, not per call: if the last of these requests
        # is unanswered by then, the connection is stuck; drop it.
        assert self._loop is not None
        self._loop.call_later(self._timeout, self._deadline, conn, conn.sent)

    def _deadline(self, conn: _Conn, sent: int) -> None:
        if conn.answered < sent:
            conn.fail(f"redis did not answer within {self._timeout}s")

    async def _reconnect(self) -> None:
        try:
            conn = await self._open()
        except StoreUnavailable as exc:
            self._fail_waiting(str(exc), batch=False)
        else:
            # maybe a restarted or failed-over Redis: what it holds may differ
            # from what the fast path knew
            self._forget()
            self._conn = conn
            data, futs = b"".join(self._backlog), self._backlog_futs
            self._backlog, self._backlog_futs = [], []
            if futs:
                self._write(conn, data, futs)
        finally:
            self._connecting = None

    def _fail_waiting(self, why: str, batch: bool = True) -> None:
        futs = self._backlog_futs
        self._backlog, self._backlog_futs = [], []
        if batch:
            futs += self._batch_futs
            self._batch, self._batch_futs = [], []
        for fut in futs:
            if not fut.done():
                fut.set_exception(StoreUnavailable(why))

    async def _open(self, *, subscriber: bool = False) -> _Conn:
        """A new connection, set up (AUTH, SELECT, and SCRIPT LOAD unless it
        is for the subscriber) within op_timeout."""
        loop = asyncio.get_running_loop()
        t = self._target
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(self._timeout):
                if t.path is not None:
                    _, conn = await loop.create_unix_connection(_Conn, t.path)
                else:
                    _, conn = await loop.create_connection(
                        _Conn, t.host, t.port, ssl=ssl.create_default_context() if t.tls else None)
                setup: list[bytes] = []
                if t.password is not None:
                    auth = ("AUTH", t.password) if t.username is None else (
                        "AUTH", t.username, t.password)
                    setup.append(_pack(*auth))
                if t.db:
                    setup.append(_pack("SELECT", str(t.db)))
                if not subscriber:
                    # touches go as EVALSHA and nobody awaits them: the script
                    # is there before the first
                    setup.append(_pack("SCRIPT", "LOAD", TOUCH.body))
                if setup:
                    futs = [loop.create_future() for _ in setup]
                    conn.send(b"".join(setup), futs)
                    for reply in await asyncio.gather(*futs):
                        if isinstance(reply, hiredis.ReplyError):
                            raise StoreUnavailable(
                                f"redis refused the connection setup: {reply}")
        except (OSError, TimeoutError) as exc:
            if conn is not None:
                conn.fail("setup failed")
            why = str(exc) or f"no answer within {self._timeout}s"
            raise StoreUnavailable(f"redis unreachable at {t}: {why}") from exc
        except StoreUnavailable:
            if conn is not None:
                conn.fail("setup failed")
            raise
        return conn


def _now_arg(now: float | None) -> str:
    return "" if now is None else repr(now)
