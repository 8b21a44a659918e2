"""Open lesson connections (WebSockets, streams) and their cut-offs.

Each connection carries a deadline computed on the shared clock by
clock.lesson_deadline (the lesson limit, the daily limit or the curfew), so every instance
holding the same student's connections cuts them at the same moment. A
deadline is one timer of that clock (`Clock.call_at`): on a running clock a
heap entry in the event loop, which holds up at 10,000 connections where
one APScheduler job each would not (10k APScheduler date jobs took ~0.7 s
just to add); on a test's `ManualClock`, one that fires as it is advanced.
Revocations that no deadline predicts (a policy reload) come through the
store's pub/sub.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .codes import CLOSE_CODES, ENFORCING, Rule
from .metrics import Metrics
from .policy import Route
from .rules import Student
from .store.base import Cut, StateStore
from .timesource import Clock, Timer

log = logging.getLogger("tutorgate.live")

__all__ = ["CLOSE_CODES", "ENFORCING", "Kind", "LiveConn", "LiveRegistry", "new_conn_id"]

Kind = Literal["websocket", "stream"]

_ids = itertools.count()
_INSTANCE_TAG = os.urandom(4).hex()


def new_conn_id() -> str:
    """Unique across instances: connection leases share one Redis zset."""
    return f"{_INSTANCE_TAG}-{next(_ids)}"


@dataclass(eq=False)
class LiveConn:
    key: str
    conn_id: str
    kind: Kind
    close: Callable[[str], Awaitable[None]]   # cut with this rule code
    deadline: float = 0.0                      # Unix time on the store's clock
    rule: str = Rule.LESSON_LIMIT
    held: bool = True                          # holds a lease in the store
    student: Student | None = None             # to recompute deadlines on a reload
    route: Route | None = None
    timer: Timer | None = field(default=None, repr=False)
    cutting: bool = False


class LiveRegistry:
    """This instance's open lesson connections, by student."""

    def __init__(self, store: StateStore, metrics: Metrics, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or store.clock
        self.metrics = metrics
        self.by_key: dict[str, set[LiveConn]] = {}
        # Pass-through WebSockets: no deadline, but closed with 1001 on shutdown.
        self.untracked: set[tuple[Any, Any]] = set()
        # audit hook: (connection, rule) for every enforcing cut
        self.on_cut_event: Callable[[LiveConn, str], None] | None = None

    def __len__(self) -> int:
        return sum(len(s) for s in self.by_key.values())

    def add(self, conn: LiveConn, deadline: float, rule: str) -> None:
        self.by_key.setdefault(conn.key, set()).add(conn)
        self.metrics.open_connections.labels(conn.kind).inc()
        self.schedule(conn, deadline, rule)

    def schedule(self, conn: LiveConn, deadline: float, rule: str) -> None:
        """(Re)arm the cut-off. `deadline` is on the store's clock, and so is
        the time left to it: the host's wall clock, maybe off by a minute,
        never enters (the timer itself runs on the loop's monotonic clock)."""
        if conn.timer is not None:
            conn.timer.cancel()
        conn.deadline, conn.rule = deadline, rule
        conn.timer = self.clock.call_at(deadline, functools.partial(self._fire, conn))

    def _fire(self, conn: LiveConn) -> None:
        conn.timer = None
        asyncio.get_running_loop().create_task(self.cut(conn, conn.rule, late_of=conn.deadline))

    async def cut(self, conn: LiveConn, rule: str, late_of: float | None = None) -> None:
        if conn.cutting:
            return
        conn.cutting = True
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        # Counted as the close starts: the close handshake may take a while.
        if rule in ENFORCING:
            self.metrics.connections_cut.labels(rule, conn.kind).inc()
            if self.on_cut_event is not None:
                self.on_cut_event(conn, rule)
        if late_of is not None:
            self.metrics.cut_lateness.observe(max(-self.clock.until(late_of), 0.0))
        try:
            await conn.close(rule)
        except Exception:  # a broken socket must not stop the other cuts
            log.exception("closing a %s connection failed", conn.kind)

    async def discard(self, conn: LiveConn) -> None:
        """The connection ended (either side): forget it, release its lease."""
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conns = self.by_key.get(conn.key)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        if not conns:
            del self.by_key[conn.key]
        self.metrics.open_connections.labels(conn.kind).dec()
        if conn.held:
            try:
                await self.store.release(conn.key, conn.conn_id)
            except Exception:  # lease expires by itself (LEASE_SECONDS)
                log.warning("could not release a connection lease; it will expire")

    async def on_cut(self, cut: Cut) -> None:
        """A cut published by any instance: close this student's connections."""
        for conn in list(self.by_key.get(cut.key, ())):
            await self.cut(conn, cut.rule)

    async def renew_leases(self) -> None:
        pairs = [(c.key, c.conn_id) for conns in self.by_key.values() for c in conns if c.held]
        if pairs:
            await self.store.renew(pairs)

    async def close_all(self, rule: str) -> None:
        """Shutdown: close everything (WebSockets get 1001 from their closer)."""
        await asyncio.gather(*(self.cut(c, rule) for conns in list(self.by_key.values())
                               for c in list(conns)), return_exceptions=True)
        await asyncio.gather(*(side.close(code=1001, message=b"going away")
                               for pair in list(self.untracked) for side in pair),
                             return_exceptions=True)

    def all(self) -> list[LiveConn]:
        return [c for conns in self.by_key.values() for c in conns]
