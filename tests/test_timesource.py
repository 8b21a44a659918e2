"""The store clock: Redis TIME carried forward by the monotonic clock."""

from __future__ import annotations

from gateway.timesource import RESYNC, StoreClock


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
