"""A subscription that outlives outages and failovers.

A task holds a connection of its own (`RedisClient.open_pubsub`), SUBSCRIBEs
its channels, hands every message to its handler, PINGs an idle connection
(a silently dead one, with no FIN, is noticed within 2 x PING_EVERY) and
reconnects with a growing delay. Messages published while it is not
subscribed are lost (that is pub/sub): `on_subscribed` runs after every
(re)subscription so its owner can catch up from what Redis stores.

On a cluster, plain PUBLISH is broadcast over the cluster bus to every node,
so one subscription on any node hears the whole cluster: a cut or a policy
push reaches every instance whichever node each one listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import StoreUnavailable
from .conn import Conn
from .resp import pack

log = logging.getLogger("tutorgate.redis.pubsub")

# Seconds between PINGs on an idle subscriber connection.
PING_EVERY = 5.0
# Reconnect delay after an outage: first, then doubling up to a cap.
BACKOFF = (0.05, 1.0)

OnMessage = Callable[[str, bytes], Awaitable[None]]


class Subscription:
    """Channels, a handler, and the task that keeps them subscribed."""

    def __init__(self, open_conn: Callable[[], Awaitable[Conn]], channels: list[str],
                 on_message: OnMessage,
                 on_subscribed: Callable[[], Awaitable[None]] | None = None) -> None:
        self._open = open_conn
        self.channels = channels
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._delay = BACKOFF[0]

    async def start(self, wait: float) -> None:
        """Start listening; return once subscribed or after `wait` seconds
        (Redis down: the task keeps trying)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"tutorgate-redis-{'+'.join(self.channels)}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.subscribed.wait()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            conn: Conn | None = None
            try:
                conn = await self._open()
                await self._listen(conn)
            except StoreUnavailable as exc:
                log.warning("subscriber %s: %s; reconnecting in %.2fs",
                            self.channels, exc, self._delay)
            except Exception:  # a bug here must not end the subscription for good
                log.exception("subscriber %s failed; reconnecting in %.2fs",
                              self.channels, self._delay)
            finally:
                self.subscribed.clear()
                if conn is not None:
                    conn.fail("subscriber stopped")
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, BACKOFF[1])

    async def _listen(self, conn: Conn) -> None:
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        conn.push = inbox.put_nowait
        conn.send(pack("SUBSCRIBE", *self.channels))
        pinged, pending = False, len(self.channels)
        while True:
            try:
                async with asyncio.timeout(PING_EVERY):
                    msg = await inbox.get()
            except TimeoutError:
                if pinged:
                    raise StoreUnavailable("redis did not answer the subscriber's PING") from None
                conn.send(pack("PING"))
                pinged = True
                continue
            pinged = False
            if isinstance(msg, StoreUnavailable):
                raise msg
            if msg[0] == b"message":
                await self._handle(msg[1].decode(), msg[2])
            elif msg[0] == b"subscribe":
                pending -= 1
                if pending == 0:
                    self._delay = BACKOFF[0]
                    if self._on_subscribed is not None:
                        await self._on_subscribed()
                    self.subscribed.set()

    async def _handle(self, channel: str, data: bytes) -> None:
        try:
            await self._on_message(channel, data)
        except Exception:  # one bad message must not end the subscription
            log.exception("handling a message on %s failed", channel)
