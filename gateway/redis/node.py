"""One Redis server as the client sees it: its connection, batching, reconnect.

The calls made during one event-loop pass are packed into one buffer and
written once (a `loop.call_soon` flush); replies come back in order through
the connection's FIFO of futures. No batch waits for the previous one to be
answered. A dead connection is replaced by the next call (one attempt at a
time; the calls meanwhile wait for it, and fail with it).

Failures cost milliseconds: connecting and every write have `timeout` (a
call fails at worst 2 x timeout after it was made, when it had to wait for a
connection first), nothing is retried here, and every failure reaches the
caller as `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import StoreUnavailable
from .conn import Conn

Opener = Callable[[], Awaitable[Conn]]


class Node:
    """A server (or, for Sentinel, whichever server is the master now)."""

    def __init__(self, name: str, opener: Opener, timeout: float,
                 on_connect: Callable[[Node], None], on_fail: Callable[[Node], None]) -> None:
        self.name = name
        self._open = opener
        self._timeout = timeout
        self._on_connect, self._on_fail = on_connect, on_fail
        self.conn: Conn | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[None] | None = None
        # requests of this loop pass (written by the next `_flush`), and
        # requests waiting for a connection
        self._batch: list[bytes] = []
        self._batch_futs: list[asyncio.Future[Any]] = []
        self._backlog: list[bytes] = []
        self._backlog_futs: list[asyncio.Future[Any]] = []
        self.closed = False

    @property
    def up(self) -> bool:
        """Connected and not known dead (the fast path's condition)."""
        conn = self.conn
        return conn is not None and conn.error is None

    def queue(self, commands: list[bytes], futs: list[asyncio.Future[Any]]) -> None:
        """Queue packed commands for this loop pass's write; `futs` (one per
        command, or any object with set_result/set_exception/done) get the replies."""
        if self.closed:
            raise StoreUnavailable("redis client closed")
        if not self._batch:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)
        self._batch.extend(commands)
        self._batch_futs.extend(futs)

    def _flush(self) -> None:
        """Write everything queued during the last loop pass, in one write."""
        data, futs = b"".join(self._batch), self._batch_futs
        self._batch, self._batch_futs = [], []
        if not futs:  # failed by close() meanwhile
            return
        conn = self.conn
        if conn is not None and conn.error is None:
            self._write(conn, data, futs)
            return
        self._backlog.append(data)
        self._backlog_futs.extend(futs)
        if self._connecting is None and not self.closed:
            assert self._loop is not None
            self._connecting = self._loop.create_task(self._reconnect())

    def _write(self, conn: Conn, data: bytes, futs: list[asyncio.Future[Any]]) -> None:
        try:
            conn.send(data, futs)
        except Exception as exc:  # whatever breaks, no caller may wait forever
            conn.fail(f"redis write failed: {exc!r}")
            _fail(futs, f"redis write failed: {exc!r}")
            return
        # One timer per write, not per call: if the last of these requests
        # is unanswered by then, the connection is stuck; drop it.
        assert self._loop is not None
        self._loop.call_later(self._timeout, self._deadline, conn, conn.sent)

    def _deadline(self, conn: Conn, sent: int) -> None:
        if conn.answered < sent:
            conn.fail(f"redis did not answer within {self._timeout}s")
            self._on_fail(self)

    async def _reconnect(self) -> None:
        try:
            conn = await self._open()
        except StoreUnavailable as exc:
            self._fail_waiting(str(exc), batch=False)
            self._on_fail(self)
        else:
            if self.closed:
                conn.fail("redis client closed")
                self._fail_waiting("redis client closed")
                return
            self.conn = conn
            # maybe a restarted or failed-over Redis: what callers knew of it may differ
            self._on_connect(self)
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
        _fail(futs, why)

    async def close(self, why: str = "redis client closed") -> None:
        self.closed = True
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.conn is not None:
            self.conn.fail(why)
        self._fail_waiting(why)


def _fail(futs: list[asyncio.Future[Any]], why: str) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_exception(StoreUnavailable(why))
