"""Clock skew: an instance whose wall clock is off acts on the Redis clock.

A real `tutorgate serve --redis` process runs under libfaketime, its wall
clock a minute behind or ahead of Redis's; lesson cut-offs, the status
countdown and X-Lesson-Remaining must all follow Redis TIME.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import RedisServer
from kit import Upstream, free_port, policy_text

LESSON = 5.0  # max_duration of the policy below, seconds


async def _redis_time(r: aioredis.Redis) -> float:
    sec, usec = await r.time()
    return sec + usec / 1e6


async def _spawn(policy: Path, upstream: str, redis_url: str, shift: str,
                 fake_monotonic: bool) -> AsyncIterator[str]:
    if shutil.which("faketime") is None:  # never a silent skip
        pytest.fail("faketime is not installed (apt-get install faketime)")
    port, admin = free_port(), free_port()
    exe = Path(sys.executable).parent / "tutorgate"
    env = {**os.environ, "TUTORGATE_ID_SECRET": "skew"}
    if not fake_monotonic:
        # what real skew is: NTP error moves the wall clock, not the monotonic one
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    proc = await asyncio.create_subprocess_exec(
        "faketime", "-f", shift, str(exe), "serve", "--policy", str(policy),
        "--upstream", upstream, "--redis", redis_url, "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin}",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{admin}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None, f"gateway exited {proc.returncode}"
                assert time.monotonic() < deadline, "gateway did not start"
                await asyncio.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(("shift", "fake_monotonic"), [
    ("-60s", False), ("+60s", False), ("-60s", True)])
async def test_skewed_instance_cuts_on_the_redis_clock(
        tmp_path: Path, upstream: Upstream, redis_server: RedisServer, shift: str,
        fake_monotonic: bool) -> None:
    """An instance 60 s off cuts a lesson WebSocket within 1 s of the Redis-clock
    deadline, and its status countdown and X-Lesson-Remaining agree with Redis."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(max_duration=f"{LESSON:g}s", min_break="3s"))
    ahead = shift.startswith("+")
    who = {"X-Student-Id": f"skew-{ahead:d}{fake_monotonic:d}-{time.time_ns()}"}
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        async for host in _spawn(policy, upstream.url, redis_server.url, shift,
                                 fake_monotonic):
            async with aiohttp.ClientSession() as s:
                t0 = await _redis_time(r)
                async with s.ws_connect(f"ws://{host}/classroom/subject/live",
                                        headers=who) as ws:
                    t1 = await _redis_time(r)  # the lesson started in [t0, t1]
                    deadline = float(ws._response.headers["X-Lesson-Deadline"])
                    assert t0 + LESSON - 0.5 <= deadline <= t1 + LESSON + 0.5

                    async with s.get(f"http://{host}/_tutorgate/status", headers=who) as resp:
                        status = await resp.json()
                    now = await _redis_time(r)
                    assert status["state"] == "lesson"
                    assert abs(status["lesson_remaining"] - (deadline - now)) <= 1.0

                    async with s.get(f"http://{host}/classroom/subject/page",
                                     headers=who) as resp:
                        assert resp.status == 200
                        left = int(resp.headers["X-Lesson-Remaining"])
                    now = await _redis_time(r)
                    assert abs(left - (deadline - now)) <= 1.0

                    msg = await ws.receive(timeout=LESSON + 5)
                    cut_at = await _redis_time(r)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert (ws.close_code, msg.extra) == (4001, "lesson_limit")
                assert abs(cut_at - deadline) <= 1.0, f"cut {cut_at - deadline:+.2f}s off"
    finally:
        await r.aclose()
