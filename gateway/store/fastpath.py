"""The Redis store's fast path: lessons known to be in progress, and their
activity written behind.

A lesson this instance saw allowed by Redis goes on without waiting for
Redis while it is more than FAST_MARGIN seconds from its limit and from the
quiet time that would end it. Nothing another instance does can end such a
lesson sooner (see `FastPath.step`), so the knowledge holds until then; the
activity is written behind (touch.lua), coalesced per student, every
TOUCH_EVERY seconds, as commands nobody awaits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from ..clock import ClockLimits, Step, quiet_end
from ..redis import RedisClient
from ..redis.node import Node
from ..redis.resp import Script, bulk, noscript
from ..timesource import StoreClock

log = logging.getLogger("tutorgate.store.redis")

FAST_MARGIN = 1.0
TOUCH_EVERY = 0.25
KNOWN_MAX = 200_000

TOUCH = Script("gateway.store", "touch", prelude="_clock")


class Known:
    """A lesson in progress as Redis last answered for it, the node that
    holds it, and its touch command without the time (packed once)."""

    __slots__ = ("end", "head", "keys", "last", "limits", "node", "quiet", "start", "start_s")

    def __init__(self, start_s: str, start: float, last: float, limits: ClockLimits,
                 keys: str, node: Node, end: float) -> None:
        self.start_s, self.start, self.last = start_s, start, last  # start_s: as Redis holds it
        self.limits, self.keys, self.node = limits, keys, node
        self.head = TOUCH.command(4, keys + bulk(start_s))
        self.end = end                                     # the lesson or the day's limit
        # how long after its last activity the lesson ends by quiet time
        # (clock.quiet_end's, read once, not a call per request), less the margin
        self.quiet = quiet_end(0.0, limits) - FAST_MARGIN


class Touches:
    """Stands in a node's reply queue for one write of touches, which nobody
    awaits: counts their replies, reports the write as one `touch` call,
    sends a touch whose script Redis forgot (NOSCRIPT) again as EVAL, and
    forgets a lesson Redis no longer holds (evicted, flushed, replaced, moved)."""

    __slots__ = ("failed", "fast", "finished", "items", "seen", "t0")

    def __init__(self, fast: FastPath, items: list[tuple[str, Known]]) -> None:
        self.fast, self.items, self.seen = fast, items, 0
        self.failed: str | None = None
        self.t0 = time.perf_counter()
        self.finished = asyncio.get_running_loop().create_future()

    def done(self) -> bool:
        return False

    def set_result(self, reply: Any) -> None:
        if reply != 1:  # 1: touched
            key, known = self.items[self.seen]
            if noscript(reply):
                self.fast.queue([(key, known)], load=True)
            else:  # not the lesson we knew, or not here: ask Redis next time
                self.fast.drop(key, known)
                if reply != 0:
                    self.failed = str(reply)
        # _count, inlined: this runs for about every request (one touch each)
        self.seen += 1
        if self.seen == len(self.items):
            self._finish()

    def set_exception(self, exc: BaseException) -> None:
        # the connection died: every lesson re-syncs with Redis anyway
        self.failed = str(exc)
        self._count()

    def _count(self) -> None:
        self.seen += 1
        if self.seen == len(self.items):
            self._finish()

    def _finish(self) -> None:
        if self.failed is not None:
            log.warning("redis store: activity written behind was refused: %s", self.failed)
        self.fast.client.report("touch", self.t0, self.failed is None)
        self.fast.pending.discard(self)
        self.finished.set_result(None)


class FastPath:
    """The lessons this instance knows in progress (see the module docstring)."""

    def __init__(self, client: RedisClient, clock: StoreClock,
                 keys: Callable[[str], str]) -> None:
        self.client, self.clock, self._keys = client, clock, keys
        self._known: dict[str, Known] = {}
        # activity not yet written (the touches of the next flush)
        self._touching: dict[str, Known] = {}
        self.pending: set[Touches] = set()
        self.closed = False

    def __contains__(self, key: str) -> bool:
        return key in self._known

    def __len__(self) -> int:
        return len(self._known)

    def forget(self) -> None:
        """Every lesson asks Redis again (the activity not yet written still
        is, if Redis can take it)."""
        self._known.clear()

    def drop(self, key: str, known: Known | None = None) -> None:
        if known is None or self._known.get(key) is known:
            self._known.pop(key, None)

    def learn(self, key: str, limits: ClockLimits, step: Step, start_s: str) -> None:
        """Remember a lesson Redis just allowed until the lesson limit or,
        with a daily limit, the moment today's lesson time runs out,
        whichever comes first (Redis's `remaining`). A shadowed daily limit
        takes the script every time: only it counts the shadowed denials."""
        node = self.client.node_for(key)
        if step.outcome != "allow" or step.shadowed or step.remaining is None or \
                node is None or (limits.daily_max is not None and not limits.enforce_daily):
            self._known.pop(key, None)
            return
        if len(self._known) >= KNOWN_MAX:
            # keep the lessons still going; if that is all of them, start over
            t = step.now
            self._known = {k: v for k, v in self._known.items() if v.end > t}
            if len(self._known) >= KNOWN_MAX:
                self.forget()
        # Redis's `remaining` is clock.limit_end(start, used, limits) - now, as
        # the script computed it with the day's `used` it holds
        end = step.now + step.remaining
        self._known[key] = Known(start_s, step.start, step.now, limits, self._keys(key),
                                 node, end)

    def step(self, key: str, limits: ClockLimits) -> Step | None:
        """A lesson known in progress goes on without a round trip. It never
        starts a lesson or ends a break (those take the atomic script), only
        continues one Redis allowed, while it is more than FAST_MARGIN
        seconds from its limit and from its quiet-time end (this instance's
        own last activity of it + min_break: activity elsewhere only moves
        that later), and from the day's limit if there is one (a new local
        day only gives more). Nothing else ends a lesson early: a held
        connection or a shadowed rule always takes the script, a policy
        reload brings new limits, and a cut or a new connection to Redis
        (maybe a restarted or failed-over one) forgets what was known."""
        known = self._known.get(key)
        if known is None or known.limits is not limits or not known.node.up:
            return None
        t = self.clock.now()
        if t >= known.end - FAST_MARGIN or t - known.last >= known.quiet:
            return None
        if t > known.last:
            known.last = t
        touching = self._touching
        if not touching:
            asyncio.get_running_loop().call_later(TOUCH_EVERY, self.flush)
        touching[key] = known
        return Step("allow", t, known.start, known.end - t, None)

    def touch_first(self, key: str) -> None:
        """Queue the student's unwritten activity ahead of a script about to
        read it (same write to the same node, so Redis runs it first)."""
        known = self._touching.pop(key, None)
        if known is not None:
            self.queue([(key, known)])

    def flush(self) -> None:
        items = list(self._touching.items())
        self._touching.clear()
        if not items:
            return
        first = items[0][1].node
        for _, known in items:
            if known.node is not first:
                break
        else:  # one node (any Redis but a cluster): no grouping to pay for
            self.queue(items)
            return
        by_node: dict[Node, list[tuple[str, Known]]] = {}
        for item in items:
            by_node.setdefault(item[1].node, []).append(item)
        for group in by_node.values():
            self.queue(group)

    def queue(self, items: list[tuple[str, Known]], *, load: bool = False) -> None:
        node = items[0][1].node
        if self.closed or not node.up:
            return  # not written: the lessons re-sync through the script
        # with load, EVAL: it caches the script again
        commands = []
        for _, known in items:
            us = str(int(known.last * 1e6))  # digits: len() is the byte count (resp.bulk)
            commands.append((TOUCH.command(4, known.keys + bulk(known.start_s), load=True)
                             if load else known.head) + f"${len(us)}\r\n{us}\r\n".encode())
        waiter = Touches(self, items)
        self.pending.add(waiter)
        node.queue(commands, [cast(asyncio.Future[Any], waiter)] * len(items))

    async def close(self, within: float) -> None:
        """Write the last activity and wait (up to `within`) for Redis to take it."""
        self.flush()
        self.closed = True
        if self.pending:
            await asyncio.wait([w.finished for w in self.pending], timeout=within)
