"""One Redis connection: RESP over asyncio's protocol API, hiredis parsing.

RESP2 replies come back in request order, so a FIFO of futures pairs them
with their callers. On a subscriber connection, replies nobody waits for go
to `push`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis

from ..errors import StoreUnavailable
from .resp import pack
from .url import Addr, RedisTarget


class Conn(asyncio.Protocol):
    """A connection and its waiting callers (see the module docstring)."""

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

    async def ask(self, *commands: bytes) -> list[Any]:
        """Send and await replies (setup and discovery, not the hot path)."""
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in commands]
        self.send(b"".join(commands), futs)
        return list(await asyncio.gather(*futs))

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


def auth_commands(username: str | None, password: str | None) -> list[bytes]:
    if password is None:
        return []
    return [pack("AUTH", password) if username is None else pack("AUTH", username, password)]


async def open_conn(target: RedisTarget, addr: Addr | None, within: float,
                    setup: Sequence[bytes] = (), *, password: str | bool | None = True,
                    check: Callable[[list[Any]], str | None] | None = None) -> Conn:
    """A new connection to `addr` (None: the target's unix socket), set up
    (AUTH with the target's credentials unless `password` says otherwise,
    then `setup`) within `within`. `check` reads the setup replies and
    names what is wrong, if anything. Every failure is StoreUnavailable."""
    loop = asyncio.get_running_loop()
    conn: Conn | None = None
    where = target.path if addr is None else f"{addr[0]}:{addr[1]}"
    try:
        async with asyncio.timeout(within):
            if addr is None:
                assert target.path is not None
                _, conn = await loop.create_unix_connection(Conn, target.path)
            else:
                ctx = target.ssl_context()
                _, conn = await loop.create_connection(
                    Conn, addr[0], addr[1], ssl=ctx, server_hostname=addr[0] if ctx else None)
            if password is True:
                cmds = auth_commands(target.username, target.password)
            else:
                cmds = auth_commands(None, password or None)
            cmds += setup
            if cmds:
                replies = await conn.ask(*cmds)
                bad = next((str(r) for r in replies if isinstance(r, hiredis.ReplyError)), None)
                if bad is None and check is not None:
                    bad = check(replies[len(cmds) - len(setup):])
                if bad is not None:
                    raise StoreUnavailable(f"redis at {where} refused the connection setup: {bad}")
    except (OSError, TimeoutError) as exc:
        if conn is not None:
            conn.fail("setup failed")
        why = str(exc) or f"no answer within {within}s"
        raise StoreUnavailable(f"redis unreachable at {where}: {why}") from exc
    except BaseException:
        if conn is not None:
            conn.fail("setup failed")
        raise
    return conn
