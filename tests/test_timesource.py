"""The clocks: Redis TIME carried forward by the monotonic clock, the host's
clock, and the manual clock tests drive; and the deadline timers of each."""

from __future__ import annotations

import asyncio

import pytest

from gateway.timesource import RESYNC, ManualClock, StoreClock, SystemClock


class Ticks:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_store_clock_ignores_the_host_wall_clock_once_anchored() -> None:
    """After one reading, now() is the store's time plus monotonic time passed."""
    mono = Ticks()
    clock = StoreClock(mono=mono, wall=lambda: 5_000.0)  # host clock far off
    clock.observe(1_000.0)
    mono.t += 2.5
    assert clock.now() == 1_002.5
    assert clock.until(1_010.0) == 7.5


def test_store_clock_keeps_the_least_late_reading() -> None:
    """A reading that arrived late (loop lag) does not pull the clock back."""
    mono = Ticks()
    clock = StoreClock(mono=mono, wall=lambda: 0.0)
    clock.observe(1_000.0)
    mono.t += 1.0
    clock.observe(1_000.8)  # answered 0.2 s late
    assert clock.now() == 1_001.0
    mono.t += 1.0
    clock.observe(1_002.1)  # Redis's clock moved ahead: followed at once
    assert clock.now() == 1_002.1


def test_store_clock_follows_a_store_clock_stepped_back_within_resync() -> None:
    """A Redis clock stepped back is followed at the first reading after RESYNC."""
    mono = Ticks()
    clock = StoreClock(mono=mono, wall=lambda: 0.0)
    clock.observe(1_000.0)
    mono.t += RESYNC
    clock.observe(1_000.0 + RESYNC - 5.0)
    assert clock.now() == 1_000.0 + RESYNC - 5.0


def test_manual_clock_moves_only_when_advanced() -> None:
    """A ManualClock reads the same until advanced; until() follows it; it never goes back."""
    clock = ManualClock(1_000.0)
    assert clock.now() == clock.now() == 1_000.0
    clock.advance(2.5)
    assert clock.now() == 1_002.5 and clock.until(1_010.0) == 7.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1.0)
    assert clock.now() == 1_002.5


async def test_manual_clock_fires_timers_as_it_passes_them() -> None:
    """Timers fire in deadline order once the clock passes them, not before;
    a cancelled one never fires; one already due fires on the next loop pass."""
    clock = ManualClock(1_000.0)
    fired: list[str] = []
    clock.call_at(1_003.0, lambda: fired.append("b"))
    clock.call_at(1_001.0, lambda: fired.append("a"))
    clock.call_at(1_002.0, lambda: fired.append("x")).cancel()
    clock.advance(0.9)
    await asyncio.sleep(0)
    assert fired == [] and clock.pending() == 2
    clock.advance(5.0)
    await asyncio.sleep(0)
    assert fired == ["a", "b"] and clock.pending() == 0
    clock.call_at(900.0, lambda: fired.append("past"))
    assert fired == ["a", "b"]
    await asyncio.sleep(0)
    assert fired == ["a", "b", "past"]


async def test_running_clocks_time_their_timers_on_their_own_clock() -> None:
    """SystemClock and StoreClock fire a timer after the time left on their
    own clock, whatever the host's wall clock says."""
    loop = asyncio.get_running_loop()
    store = StoreClock(wall=lambda: 0.0)
    store.observe(5_000.0)
    for clock in (SystemClock(), store):
        done = loop.create_future()
        t0 = loop.time()
        clock.call_at(clock.now() + 0.1, lambda d=done: d.set_result(loop.time()))
        fired_at = await asyncio.wait_for(done, 2)
        assert 0.09 <= fired_at - t0 < 0.5
