"""The in-memory store: one process, one event loop, no persistence.

It runs `clock.advance` directly, so it is the reference the Redis store's
Lua is tested against. Entries are forgotten once their break and their
day are over, so memory stays bounded by the students of the last day.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace

from ..clock import ClockLimits, ClockState, Step, advance
from ..timesource import Clock, SystemClock
from .base import LEASE_SECONDS, Cut, CutHandler

_EMPTY = ClockState()


class MemoryStore:
    kind = "memory"

    def __init__(self, clock: Clock | None = None) -> None:
        # the lesson clock runs on this clock: it is the process's one clock
        # (the host's, or a test's ManualClock)
        self.clock: Clock = clock or SystemClock()
        self._clock = self.clock.now
        self._states: dict[str, ClockState] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._expires: dict[str, float] = {}
        self._handlers: list[CutHandler] = []
        self._claims: dict[tuple[str, str], float] = {}
        self._ops = 0

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _state(self, key: str, now: float) -> ClockState:
        st = self._states.get(key) or _EMPTY
        leases = self._leases.get(key)
        live = 0
        if leases:
            for cid, until in list(leases.items()):
                if until <= now:
                    del leases[cid]
            live = len(leases)
            if not leases:
                del self._leases[key]
        # stored states keep conns from their last step: set it from the leases
        return st if st.conns == live else replace(st, conns=live)

    def _sweep(self, now: float) -> None:
        # Amortised: every 4096 operations, drop students long gone.
        self._ops += 1
        if self._ops & 4095:
            return
        for key, exp in list(self._expires.items()):
            if exp <= now and key not in self._leases:
                self._states.pop(key, None)
                del self._expires[key]

    async def advance(self, key: str, limits: ClockLimits, day: int, seconds_to_day_end: float,
                      *, hold: str | None = None, now: float | None = None) -> Step:
        t = self._now(now)
        self._sweep(t)
        state = self._state(key, t)
        step, new = advance(state, t, limits, day, seconds_to_day_end)
        if step.outcome == "allow":
            if hold is not None:
                self._leases.setdefault(key, {})[hold] = t + LEASE_SECONDS
            self._states[key] = new
            # keep until the break after the longest possible lesson, and the day
            self._expires[key] = max(new.start + limits.max_duration + limits.min_break,
                                     t + seconds_to_day_end) + 60
        return step

    async def release(self, key: str, conn_id: str, *, now: float | None = None) -> None:
        t = self._now(now)
        leases = self._leases.get(key)
        until = None if leases is None else leases.pop(conn_id, None)
        if leases is not None and not leases:
            del self._leases[key]
        # A lapsed lease (not yet pruned) stopped counting at its expiry: its
        # release is no activity (the same rule as store/lua/release.lua).
        if until is not None and until > t:
            st = self._states.get(key)
            if st is not None:
                self._states[key] = replace(st, last=max(st.last, t))

    async def renew(self, leases: Sequence[tuple[str, str]], *, now: float | None = None) -> None:
        t = self._now(now)
        for key, cid in leases:
            held = self._leases.get(key)
            # Only a live lease is extended: a lapsed one is not revived.
            if held is not None and held.get(cid, 0.0) > t:
                held[cid] = t + LEASE_SECONDS
                st = self._states.get(key)
                if st is not None:
                    self._states[key] = replace(st, last=max(st.last, t))

    async def peek(self, key: str, *, now: float | None = None) -> tuple[ClockState, float]:
        t = self._now(now)
        return self._state(key, t), t

    async def claim(self, key: str, token: str, ttl: float) -> bool:
        t = self._clock()
        if len(self._claims) > 100_000:
            self._claims = {k: v for k, v in self._claims.items() if v > t}
        if self._claims.get((key, token), 0.0) > t:
            return False
        self._claims[(key, token)] = t + ttl
        return True

    async def publish_cut(self, cut: Cut) -> None:
        for h in list(self._handlers):
            r = h(cut)
            if inspect.isawaitable(r):
                await r

    async def subscribe_cuts(self, handler: CutHandler) -> None:
        self._handlers.append(handler)

    async def now(self) -> float:
        return self._clock()

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._handlers.clear()
