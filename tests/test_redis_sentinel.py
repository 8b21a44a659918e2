"""The Redis layer behind Sentinel: the master found by name, a Sentinel
password, and a Sentinel failover under load without a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from topologies import SentinelSet

from gateway.clock import ClockLimits
from gateway.errors import StoreUnavailable
from gateway.store.base import Cut
from gateway.store.redis import RedisStore

L = ClockLimits(max_duration=1800.0, min_break=600.0)
DAY, DAY_END = 20_000, 40_000.0


async def test_sentinel_names_the_master_and_needs_its_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sentinels with a password of their own: with TUTORGATE_REDIS_SENTINEL_PASSWORD
    the store finds the master and runs the clock; without it, StoreUnavailable."""
    s = SentinelSet(tmp_path, sentinel_password="sentinel-pw")
    try:
        store = RedisStore(s.url)
        try:
            try:
                await store.advance("sp", L, DAY, DAY_END)
                raise AssertionError("sentinels without their password answered")
            except StoreUnavailable:
                pass
        finally:
            await store.close()
        monkeypatch.setenv("TUTORGATE_REDIS_SENTINEL_PASSWORD", "sentinel-pw")
        store = RedisStore(s.url)
        try:
            assert (await store.advance("sp", L, DAY, DAY_END)).started
            heard: asyncio.Queue[Cut] = asyncio.Queue()
            await store.subscribe_cuts(heard.put_nowait)
            await store.publish_cut(Cut("sp", "curfew", "x"))
            assert (await asyncio.wait_for(heard.get(), 2)).key == "sp"
        finally:
            await store.close()
    finally:
        s.stop()


async def test_sentinel_failover_under_load(tmp_path: Path) -> None:
    """The master dies under load: requests are refused no longer than the
    failover (kill until Sentinel names the replica) + 2 s, the clock
    started before the kill holds, and the instance needs no restart."""
    s = SentinelSet(tmp_path)
    store = RedisStore(s.url)
    keys = [f"sent-{i}" for i in range(10)]
    log: dict[str, list[tuple[float, bool, float | None]]] = {k: [] for k in keys}
    until = asyncio.Event()

    async def one(key: str) -> None:
        while not until.is_set():
            try:
                st = await store.advance(key, L, DAY, DAY_END)
                log[key].append((time.monotonic(), True, st.start))
            except StoreUnavailable:
                log[key].append((time.monotonic(), False, None))
            store.fast.drop(key)             # the script every time
            await asyncio.sleep(0.02)

    load = asyncio.gather(*(one(k) for k in keys))
    old = s.master.port
    try:
        await asyncio.sleep(1.0)
        before = {k: log[k][-1][2] for k in keys}
        killed = time.monotonic()
        s.master.kill()
        promoted = None
        while time.monotonic() - killed < 30:
            if promoted is None and await asyncio.to_thread(s.current_master) != old:
                promoted = time.monotonic()
            if promoted is not None and all(log[k][-1][1] and log[k][-1][0] > promoted
                                            for k in keys):
                break
            await asyncio.sleep(0.1)
    finally:
        until.set()
        await load
        await store.close()
        s.stop()
    assert promoted is not None, "Sentinel never promoted the replica"
    failover = promoted - killed
    worst = 0.0
    for k in keys:
        bad = [t for t, ok, _ in log[k] if not ok]
        back = [t for t, ok, _ in log[k] if ok and bad and t > bad[-1]]
        assert back, f"{k} never came back (failover {failover:.2f}s)"
        worst = max(worst, back[0] - killed)
        assert log[k][-1][2] == before[k], "the clock replicated before the kill must hold"
    assert worst <= failover + 2.0, (worst, failover)
    print(f"sentinel failover {failover:.2f}s; longest refusal {worst:.2f}s")
