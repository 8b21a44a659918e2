"""The audit trail through a Redis outage: denials it causes are counted per
interval, the buffer stays bounded, and writing it back never stalls the loop."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from conftest import RedisServer
from kit import FORBIDDEN, SUBJECT, Upstream, metric, policy_text, start_gateway

from gateway.audit import STREAM

EXE = str(Path(sys.executable).parent / "tutorgate")


class Ticker:
    """The longest the event loop went without running a 1 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - t - 0.001)

    async def stop(self) -> float:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst


async def _load(gw: Any, http: Any, path: str, seconds: float, conc: int = 8) -> dict[int, int]:
    statuses: dict[int, int] = {}
    end = time.monotonic() + seconds

    async def one(n: int) -> None:
        i = 0
        while time.monotonic() < end:
            i += 1
            async with http.get(gw.url(path), headers={"X-Student-Id": f"s{n}-{i % 50}"}) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1

    await asyncio.gather(*(one(n) for n in range(conc)))
    return statuses


async def _events(url: str) -> list[dict[str, str]]:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return [f for _, f in await r.xrange(STREAM)]  # type: ignore[misc]
    finally:
        await r.aclose()


async def test_outage_denials_are_aggregated_and_the_flush_does_not_stall(
        private_redis: RedisServer, upstream: Upstream, http: Any) -> None:
    """During a Redis outage under lesson load the 503s become one deny event
    per second with a count (summed by `audit report`), the buffer stays small,
    and writing thousands of buffered events back stalls the loop < 50 ms."""
    gw = await start_gateway(policy_text(), upstream.url, redis_url=private_redis.url)
    audit = gw.gateway.audit
    assert audit is not None
    try:
        private_redis.stop()
        statuses = await _load(gw, http, SUBJECT, 3.0)
        denied = statuses.get(503, 0)
        assert denied > 300 and set(statuses) == {503}
        # other events keep coming while Redis is down (cuts, lesson ends...)
        for i in range(10_000):
            audit.record("lesson_end", f"k{i}", None, "subject", "base", duration=1.0)
        assert len(audit) < 10_000 + 20   # the 503s added a handful, not one each
        private_redis.start()
        # The stall measured is the flush's own: a full collection of this
        # pytest process (a thousand tests' objects by the end of a suite
        # run) can pause the loop longer than the flush ever does, and
        # `serve` tunes its collector anyway (app.tune_gc).
        gc.collect()
        gc.disable()
        try:
            ticker = Ticker()
            deadline = time.monotonic() + 15
            while len(audit) or audit._agg:
                assert time.monotonic() < deadline, "the buffer was not written back"
                await asyncio.sleep(0.05)
            stall = await ticker.stop()
        finally:
            gc.enable()
        events = await _events(private_redis.url)
        outage = [e for e in events if e["event"] == "deny"]
        assert outage and all(e["rule"] == "state_unavailable" and e["student"] == ""
                              and float(e["interval"]) <= 1.5 for e in outage)
        assert sum(int(e["count"]) for e in outage) == denied
        assert len(outage) <= 6
        assert sum(e["event"] == "lesson_end" for e in events) == 10_000
        assert stall < 0.05, f"the loop stalled {stall * 1000:.0f} ms writing the buffer"
        day = events[0]["time"][:10]
        out = subprocess.run([EXE, "audit", "report", "--redis", private_redis.url, "--day",
                              day, "--format", "json"], capture_output=True, text=True,
                             timeout=30)
        assert json.loads(out.stdout)["denials"] == {"state_unavailable": denied}, out.stderr
        print(f"outage: {denied} denials -> {len(outage)} events; flush of "
              f"{len(events)} events, worst loop stall {stall * 1000:.1f} ms")
    finally:
        await gw.stop()


async def test_audit_buffer_is_bounded_and_drops_are_counted(
        private_redis: RedisServer, upstream: Upstream, http: Any) -> None:
    """With Redis down, events past the buffer's bound (events or bytes) drop
    the oldest, counted in tutorgate_audit_dropped_total; the rest is written."""
    gw = await start_gateway(policy_text(), upstream.url, redis_url=private_redis.url)
    audit = gw.gateway.audit
    assert audit is not None
    audit.max_events, audit.max_bytes = 100, 10**9
    try:
        private_redis.stop()
        statuses = await _load(gw, http, FORBIDDEN, 1.0, conc=4)
        sent = statuses[403]
        assert sent > 150
        assert len(audit) == 100
        assert metric(gw, "tutorgate_audit_dropped_total", reason="buffer_full") == sent - 100
        audit.max_events, audit.max_bytes = 10**6, 50_000
        for i in range(1_000):
            audit.record("cut", f"k{i}", "lesson_limit", "subject", "base")
        assert audit.buffered_bytes <= 50_000
        assert metric(gw, "tutorgate_audit_dropped_total") > sent - 100 + 900
        kept = len(audit)
        private_redis.start()
        deadline = time.monotonic() + 10
        while len(audit):
            assert time.monotonic() < deadline, "the buffer was not written back"
            await asyncio.sleep(0.05)
        assert len(await _events(private_redis.url)) == kept
    finally:
        await gw.stop()
