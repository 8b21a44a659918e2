"""The Redis store: every gateway instance on one Redis shares each student's clock.

Each store method is one Lua script (`store/lua/<op>.lua`), so a student's
clock is read and updated atomically in one round trip. Keys:

    tutorgate:{<key>}:clock   hash start, last, day, used
    tutorgate:{<key>}:conns   zset conn_id -> lease expiry

`<key>` is the student's keyed hash, never a raw id; the `{...}` hash tag
keeps one student's keys in one cluster slot (`tutorgate:` is the client's
prefix, `TUTORGATE_REDIS_PREFIX`).

Cheap by design. A redis-py call per request costs the proxy about as much
CPU as the proxying itself (~4,800 -> ~2,700 req/s, docs/design.md), and that
cost is the client's per-call work, not Redis. So the store talks through
the project's own client (`gateway/redis/`): the calls of one event-loop pass
go out in one write per server, and a lesson known in progress does not wait
for Redis at all (`fastpath.py`). `bench/store_bench.py` measures this
against plain redis-py.

Every failure reaches the caller as `StoreUnavailable`, in milliseconds
(`op_timeout`; see `gateway/redis/node.py`).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from typing import Final

from ..clock import ClockLimits, ClockState, Outcome, Step
from ..errors import StoreUnavailable
from ..redis import RedisClient
from ..redis.client import OnCall
from ..redis.pubsub import Subscription
from ..redis.resp import Script, bulk, bulks
from ..timesource import StoreClock
from .base import LEASE_SECONDS, Cut, CutHandler
from .fastpath import FAST_MARGIN, KNOWN_MAX, TOUCH, TOUCH_EVERY, FastPath

__all__ = ["ADVANCE", "FAST_MARGIN", "KNOWN_MAX", "TOUCH_EVERY", "RedisStore"]

log = logging.getLogger("tutorgate.store.redis")

# Students per write in `renew` (a few ms of Redis time).
RENEW_CHUNK = 500

_OUTCOMES: Final[dict[bytes, Outcome]] = {
    b"allow": "allow", b"break_required": "break_required", b"daily_limit": "daily_limit"}

ADVANCE = Script("gateway.store", "advance", prelude="_clock")
RELEASE = Script("gateway.store", "release", prelude="_clock")
RENEW = Script("gateway.store", "renew", prelude="_clock")
PEEK = Script("gateway.store", "peek", prelude="_clock")
_LEASE = bulk(repr(LEASE_SECONDS))


def _opt(raw: bytes | None) -> float | None:
    return None if raw is None else float(raw)


def _now_arg(now: float | None) -> str:
    return "" if now is None else repr(now)


class RedisStore:
    """The shared state store (see the module docstring). Given a URL it
    owns its client; given a client (shared with audit and fleet), it
    leaves closing it to its owner."""

    kind = "redis"

    def __init__(self, redis: str | RedisClient, *, op_timeout: float = 0.25,
                 on_call: OnCall | None = None, clock: StoreClock | None = None) -> None:
        self._owns = not isinstance(redis, RedisClient)
        self.client = redis if isinstance(redis, RedisClient) else RedisClient(
            redis, op_timeout=op_timeout, on_call=on_call)
        # Redis TIME between readings: every reply that carries it anchors it
        self.clock = clock or StoreClock()
        self._prefix = self.client.prefix
        self._channel = f"{self._prefix}cuts"
        self._limit_args: dict[ClockLimits, str] = {}
        self.fast = FastPath(self.client, self.clock, lambda key: bulks(self._keys(key)))
        self.client.preload(TOUCH)  # touches are EVALSHA nobody awaits: loaded first
        self.client.on_reset(self.fast.forget)
        self._handlers: list[CutHandler] = []
        self._cuts: Subscription | None = None
        self._closed = False

    # ----------------------------------------------------------- the clock

    async def start(self) -> None:
        """Connect ahead of the first call. An unreachable Redis is no error
        here: readiness reports it and calls raise StoreUnavailable."""
        try:
            await self.now()  # anchors the clock before the first deadline
        except StoreUnavailable:
            log.warning("redis store: %s does not answer (yet)", self.client.target)

    async def advance(self, key: str, limits: ClockLimits, day: int, seconds_to_day_end: float,
                      *, hold: str | None = None, now: float | None = None) -> Step:
        if hold is None and now is None:
            fast = self.fast.step(key, limits)
            if fast is not None:
                return fast
        lim = self._limit_args.get(limits) or self._limits(limits)
        k = f"{self._prefix}{{{key}}}:"
        packed = (bulks((k + "clock", k + "conns", _now_arg(now))) + lim
                  + bulks((str(day), repr(seconds_to_day_end))) + _LEASE + bulk(hold or ""))
        self.fast.touch_first(key)
        try:
            r = (await self.client.eval("advance", ADVANCE, k, ((12, packed),)))[0]
        except StoreUnavailable:
            self.fast.forget()
            raise
        step = Step(_OUTCOMES[r[0]], float(r[1]), float(r[2]), _opt(r[3]), _opt(r[4]),
                    started=r[5] == 1, ended_duration=_opt(r[6]), break_taken=_opt(r[7]),
                    shadowed=tuple(_OUTCOMES[x] for x in r[8].split(b",")) if r[8] else (),
                    ended_start=_opt(r[9]) if len(r) > 9 else None)
        if now is None:
            self.clock.observe(step.now)
            self.fast.learn(key, limits, step, r[2].decode())
        return step

    async def release(self, key: str, conn_id: str, *, now: float | None = None) -> None:
        keys = self._keys(key)
        packed = bulks((*keys, _now_arg(now), conn_id))
        await self.client.eval("release", RELEASE, keys[0], ((4, packed),))

    async def renew(self, leases: Sequence[tuple[str, str]], *, now: float | None = None) -> None:
        # One script per student (its keys share a slot), RENEW_CHUNK students
        # per write: one giant write would hold Redis, and every other call
        # behind it, past op_timeout. On a cluster, one write per node.
        by_key: dict[str, list[str]] = {}
        for key, conn_id in leases:
            by_key.setdefault(key, []).append(conn_id)
        t = bulk(_now_arg(now)) + _LEASE
        groups: dict[object, list[tuple[str, tuple[int, str]]]] = {}
        for key, ids in by_key.items():
            node = self.client.node_for(key)
            groups.setdefault(node, []).append(
                (key, (4 + len(ids), bulks(self._keys(key)) + t + bulks(ids))))
        for calls in groups.values():
            for i in range(0, len(calls), RENEW_CHUNK):
                chunk = calls[i:i + RENEW_CHUNK]
                await self.client.eval("renew", RENEW, self._keys(chunk[0][0])[0],
                                       [c for _, c in chunk])

    async def peek(self, key: str, *, now: float | None = None) -> tuple[ClockState, float]:
        keys = self._keys(key)
        packed = bulks((*keys, _now_arg(now)))
        self.fast.touch_first(key)
        r = (await self.client.eval("peek", PEEK, keys[0], ((3, packed),)))[0]
        state = ClockState(start=float(r[1] or 0), last=float(r[2] or 0), conns=int(r[5]),
                           day=int(float(r[3] or 0)), used=float(r[4] or 0))
        t = float(r[0])
        if now is None:
            self.clock.observe(t)
        return state, t

    async def now(self) -> float:
        sec, usec = await self.client.command("now", "TIME")
        t = float(sec + b"." + usec.rjust(6, b"0"))  # read as the scripts read it
        self.clock.observe(t)
        return t

    async def ping(self) -> bool:
        try:
            return bool(await self.client.command("ping", "PING") == b"PONG")
        except StoreUnavailable:
            return False

    # ----------------------------------------------------------- cuts

    async def claim(self, key: str, token: str, ttl: float) -> bool:
        k = f"{self._prefix}{{{key}}}:claim:{token}"
        reply = await self.client.command("claim", "SET", k, "1", "NX", "PX",
                                          str(int(ttl * 1000)), key=k)
        return reply is not None

    async def publish_cut(self, cut: Cut) -> None:
        msg = json.dumps({"key": cut.key, "rule": cut.rule, "origin": cut.origin})
        await self.client.command("publish", "PUBLISH", self._channel, msg)

    async def subscribe_cuts(self, handler: CutHandler) -> None:
        """Register `handler`; the first call starts the subscription, which
        reconnects by itself. Returns once subscribed, or after a short wait
        while Redis is down (cuts published meanwhile are lost: pub/sub)."""
        self._handlers.append(handler)
        if self._cuts is None:
            self._cuts = Subscription(self.client.open_pubsub, [self._channel], self._dispatch)
        await self._cuts.start(max(1.0, 4 * self.client.timeout))

    async def _dispatch(self, channel: str, data: bytes) -> None:
        try:
            d = json.loads(data)
            cut = Cut(key=str(d["key"]), rule=str(d["rule"]), origin=str(d["origin"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", self._channel)
            return
        self.fast.drop(cut.key)  # the fast path must ask Redis again
        for handler in list(self._handlers):
            try:
                result = handler(cut)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # one failing handler must not stop the others
                log.exception("a cut handler failed")

    async def close(self) -> None:
        if not self._closed:
            # the last activity written behind
            await self.fast.close(max(1.0, 4 * self.client.timeout))
        self._closed = True
        if self._cuts is not None:
            await self._cuts.close()
            self._cuts = None
        self._handlers.clear()
        if self._owns:
            await self.client.close()

    # ----------------------------------------------------------- calls

    def _keys(self, key: str) -> tuple[str, str]:
        k = f"{self._prefix}{{{key}}}:"
        return k + "clock", k + "conns"

    def _limits(self, limits: ClockLimits) -> str:
        """advance.lua's arguments for `limits`, packed once per policy profile."""
        if len(self._limit_args) > 64:  # policy reloads: keep the cache bounded
            self._limit_args.clear()
        packed = bulks((repr(limits.max_duration), repr(limits.min_break),
                        "" if limits.daily_max is None else repr(limits.daily_max),
                        "1" if limits.enforce_break else "0",
                        "1" if limits.enforce_daily else "0"))
        self._limit_args[limits] = packed
        return packed
