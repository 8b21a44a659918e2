"""The state store interface every store implements.

A store owns the per-student lesson clock and its connection leases. Its
one hot operation, `advance`, reads and updates a student's clock
atomically (one Lua call on Redis). Stores raise `StoreUnavailable` and
nothing else of their own: the proxy decides fail-open or fail-closed in
one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..clock import ClockLimits, ClockState, Step
from ..timesource import Clock

# A connection lease lives this long unless renewed, so connections of a
# crashed instance stop counting as activity by themselves.
LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class Cut:
    """A fleet-wide order to close a student's live lesson connections."""

    key: str          # the student's keyed hash
    rule: str         # lesson_limit | curfew | policy
    origin: str       # instance that sent it


CutHandler = Callable[[Cut], Awaitable[None] | None]


class StateStore(Protocol):
    kind: str  # "memory" or "redis"

    @property
    def clock(self) -> Clock:
        """The clock the lesson clock runs on: every deadline uses it."""
        ...

    async def advance(self, key: str, limits: ClockLimits, day: int, seconds_to_day_end: float,
                      *, hold: str | None = None, now: float | None = None) -> Step:
        """One lesson request for student `key`. `hold` = a connection id to
        lease if the step allows (a WebSocket or stream about to open).
        `now` = None uses the store's own clock."""
        ...

    async def release(self, key: str, conn_id: str, *, now: float | None = None) -> None:
        """A held connection closed: the activity lasted until now."""
        ...

    async def renew(self, leases: Sequence[tuple[str, str]], *, now: float | None = None) -> None:
        """Extend the leases of connections still open on this instance."""
        ...

    async def peek(self, key: str, *, now: float | None = None) -> tuple[ClockState, float]:
        """The student's clock (live leases counted in `conns`) and the store's now."""
        ...

    async def claim(self, key: str, token: str, ttl: float) -> bool:
        """True for the first caller (fleet-wide) to claim `token` for this
        student within `ttl` seconds: one report per ended lesson."""
        ...

    async def publish_cut(self, cut: Cut) -> None:
        """Tell every instance sharing this store to close `cut.key`'s connections."""
        ...

    async def subscribe_cuts(self, handler: CutHandler) -> None:
        """Call `handler` for every cut published (this instance's included)."""
        ...

    async def now(self) -> float:
        """The store's clock, asked now (Redis TIME; the host clock in memory)."""
        ...

    async def ping(self) -> bool:
        """True when the store answers (readiness)."""
        ...

    async def close(self) -> None: ...
