"""Fleet policy: publish a policy to Redis so every instance switches together.

`tutorgate policy push` stores the policy text under `tutorgate:policy`
(with the time it was pushed) and announces it on the `tutorgate:policy`
channel. Each gateway on that Redis listens and applies it at once; one
that was down catches up at start (the newer of its file and the pushed
policy wins) and after every reconnect. This is off the hot path, so it
uses plain redis-py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("tutorgate.fleet")

POLICY_KEY = "tutorgate:policy"
CHANNEL = "tutorgate:policy"


def _hash(got: dict[bytes, bytes]) -> tuple[bytes, float] | None:
    """The pushed text (bytes: anything may be in Redis, the gateway decodes
    and validates it) and when it was pushed; None if nothing usable is."""
    if not got or not got.get(b"text"):
        return None
    try:
        pushed_at = float(got.get(b"pushed_at", b"0"))
    except ValueError:
        log.error("policy push refused: %s: pushed_at is not a time", POLICY_KEY)
        return None
    return got[b"text"], pushed_at


def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


async def push_policy(url: str, text: str) -> int:
    """Store and announce; returns how many instances heard it."""
    r = _client(url)
    try:
        pushed_at = repr(time.time())
        await r.hset(POLICY_KEY, mapping={"text": text, "pushed_at": pushed_at})
        return int(await r.publish(CHANNEL, pushed_at))
    finally:
        await r.aclose()


async def fetch_policy(url: str) -> tuple[bytes, float] | None:
    """The pushed policy text and when it was pushed, if any."""
    r = _client(url)
    try:
        return _hash(await r.hgetall(POLICY_KEY))  # type: ignore[arg-type]
    finally:
        await r.aclose()


async def follow(url: str, apply: Callable[[bytes, float], None],
                 stop: asyncio.Event) -> None:
    """Apply every pushed policy until `stop`; reconnects by itself, and
    re-reads the stored policy after each (re)connect so none is missed."""
    delay = 0.2
    while not stop.is_set():
        r = _client(url)
        try:
            async with r.pubsub() as ps:
                await ps.subscribe(CHANNEL)
                pushed = _hash(await r.hgetall(POLICY_KEY))  # type: ignore[arg-type]
                if pushed is not None:
                    _apply(apply, pushed)
                delay = 0.2
                while not stop.is_set():
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    pushed = _hash(await r.hgetall(POLICY_KEY))  # type: ignore[arg-type]
                    if pushed is not None:
                        _apply(apply, pushed)
        except (RedisError, OSError) as e:
            log.warning("policy channel lost (%s); retrying in %.1fs", type(e).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            await r.aclose()


def _apply(apply: Callable[[bytes, float], None], pushed: tuple[bytes, float]) -> None:
    # a bug in applying one push must not end the follower: later pushes
    # (the fix) must still arrive
    try:
        apply(*pushed)
    except Exception:
        log.exception("applying a pushed policy failed")
