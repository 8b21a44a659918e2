"""Fleet policy: publish a policy to Redis so every instance switches together.

`tutorgate policy push` stores the policy text under `tutorgate:policy`
(with the time it was pushed) and announces it on the `tutorgate:policy`
channel (`tutorgate:` is the client's prefix). Each gateway on that Redis
listens and applies it at once; one that was down catches up at start (the
newer of its file and the pushed policy wins) and after every reconnect.
On a cluster the announcement is a plain PUBLISH, which reaches every node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .redis import RedisClient
from .redis.pubsub import Subscription

log = logging.getLogger("tutorgate.fleet")

# Names under the client's prefix (the defaults spelled out for readers).
POLICY = "policy"
POLICY_KEY = "tutorgate:policy"
CHANNEL = "tutorgate:policy"
# The push and the reads are off the hot path: a slow Redis may take this long.
TIMEOUT = 5.0


def _hash(reply: Any, key: str) -> tuple[bytes, float] | None:
    """The pushed text (bytes: anything may be in Redis, the gateway decodes
    and validates it) and when it was pushed; None if nothing usable is."""
    got = dict(zip(reply[::2], reply[1::2], strict=True)) if reply else {}
    if not got.get(b"text"):
        return None
    try:
        pushed_at = float(got.get(b"pushed_at", b"0"))
    except ValueError:
        log.error("policy push refused: %s: pushed_at is not a time", key)
        return None
    return got[b"text"], pushed_at


async def push_policy(url: str, text: str) -> int:
    """Store and announce; returns how many subscribers heard it (on a
    cluster: those of the node the announcement went to)."""
    client = RedisClient(url, op_timeout=TIMEOUT)
    try:
        key = client.prefix + POLICY
        pushed_at = repr(time.time())
        await client.command(None, "HSET", key, "text", text, "pushed_at", pushed_at, key=key)
        return int(await client.command(None, "PUBLISH", key, pushed_at, key=key))
    finally:
        await client.close()


async def fetch_policy(client: RedisClient) -> tuple[bytes, float] | None:
    """The pushed policy text and when it was pushed, if any."""
    key = client.prefix + POLICY
    return _hash(await client.command(None, "HGETALL", key, key=key), key)


async def follow(client: RedisClient, apply: Callable[[bytes, float], None],
                 stop: asyncio.Event) -> None:
    """Apply every pushed policy until `stop`; reconnects by itself, and
    re-reads the stored policy after each (re)subscription so none is missed."""

    async def catch_up() -> None:
        pushed = await fetch_policy(client)
        if pushed is not None:
            _apply(apply, pushed)

    async def on_message(channel: str, data: bytes) -> None:
        await catch_up()

    sub = Subscription(client.open_pubsub, [client.prefix + POLICY], on_message, catch_up)
    try:
        await sub.start(0)
        await stop.wait()
    finally:
        await sub.close()


def _apply(apply: Callable[[bytes, float], None], pushed: tuple[bytes, float]) -> None:
    # a bug in applying one push must not end the follower: later pushes
    # (the fix) must still arrive
    try:
        apply(*pushed)
    except Exception:
        log.exception("applying a pushed policy failed")
