"""Operators: hot reload, fleet push, shadow mode, daily limit, regions (end to end)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from kit import ARTS, SUBJECT, elapse, metric, near_local_midnight, policy_text, spawn_gateway

LIVE = "/classroom/arts/room/live"


def sid() -> str:
    return "stu-" + uuid.uuid4().hex[:10]


async def remaining(http: aiohttp.ClientSession, url: str, student: str,
                    **headers: str) -> tuple[int, str | None]:
    async with http.get(url, headers={"X-Student-Id": student, **headers}) as r:
        await r.read()
        return r.status, r.headers.get("X-Lesson-Remaining")


async def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_reload_under_live_traffic(tmp_path: Path, upstream, gateways, http):
    """A valid policy written to the watched file applies to the next decision
    while requests flow and a WebSocket stays open: nothing is dropped."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(max_duration="1h", min_break="10m"))
    gw = await gateways(path.read_text(), upstream.url, policy_path=str(path))
    old_sha = gw.gateway.policy.sha
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            async with http.get(gw.url(ARTS), headers={"X-Student-Id": sid()}) as r:
                statuses.append(r.status)
                await r.read()

    async with http.ws_connect(gw.ws_url(LIVE), headers={"X-Student-Id": sid()}) as ws:
        task = asyncio.create_task(traffic())
        await asyncio.sleep(0.3)
        path.write_text(policy_text(max_duration="20m", min_break="10m"))
        await wait_for(lambda: gw.gateway.policy.sha != old_sha, 4.0)
        await asyncio.sleep(0.3)
        stop.set()
        await task
        await ws.send_str("still here")
        assert (await ws.receive(timeout=2)).data == "still here"
    assert statuses and set(statuses) == {200}
    st, rem = await remaining(http, gw.url(SUBJECT), sid())
    assert st == 200 and rem is not None and 1190 <= int(rem) <= 1200
    assert metric(gw, "tutorgate_policy_info", sha=gw.gateway.policy.sha) == 1
    assert metric(gw, "tutorgate_policy_info", sha=old_sha) == 0


async def test_reload_moves_open_connection_deadlines(tmp_path: Path, upstream, gateways, http):
    """Shortening max_duration reschedules an open lesson WebSocket's cut-off."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(max_duration="1h"))
    gw = await gateways(path.read_text(), upstream.url, policy_path=str(path),
                        manual_clock=True)
    clock = gw.gateway.clock
    t0 = clock.now()
    async with http.ws_connect(gw.ws_url(LIVE), headers={"X-Student-Id": sid()}) as ws:
        sha = gw.gateway.policy.sha
        path.write_text(policy_text(max_duration="3s"))
        await wait_for(lambda: gw.gateway.policy.sha != sha, 3.0)  # the 1 s file watch
        await elapse(gw, t0 + 2.8 - clock.now())
        assert metric(gw, "tutorgate_connections_cut_total") == 0
        await elapse(gw, 0.3)
        msg = await ws.receive(timeout=1)  # past the new deadline: cut at once
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "lesson_limit"


@pytest.mark.skipif(near_local_midnight(), reason="the day would change mid-test")
async def test_reload_adding_a_daily_limit_cuts_at_it(tmp_path: Path, upstream, gateways,
                                                       http):
    """A reload that sets daily_max moves an open lesson WebSocket's cut-off
    to the daily limit when that comes before the lesson limit."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(max_duration="1h"))
    gw = await gateways(path.read_text(), upstream.url, policy_path=str(path),
                        manual_clock=True)
    clock = gw.gateway.clock
    t0 = clock.now()
    async with http.ws_connect(gw.ws_url(LIVE), headers={"X-Student-Id": sid()}) as ws:
        sha = gw.gateway.policy.sha
        path.write_text(policy_text(max_duration="1h", extra="daily_max: 3s"))
        await wait_for(lambda: gw.gateway.policy.sha != sha, 3.0)  # the 1 s file watch
        await elapse(gw, t0 + 2.8 - clock.now())
        assert metric(gw, "tutorgate_connections_cut_total") == 0
        await elapse(gw, 0.3)
        msg = await ws.receive(timeout=1)  # past the daily limit: cut at once
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "daily_limit"


async def test_invalid_reload_keeps_old_policy(tmp_path: Path, upstream, gateways, http):
    """An invalid policy is refused: the old one stays live and the failure is counted."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(max_duration="1h"))
    gw = await gateways(path.read_text(), upstream.url, policy_path=str(path))
    sha = gw.gateway.policy.sha
    path.write_text(policy_text(max_duration="forever"))
    os.utime(path, (time.time() + 5, time.time() + 5))
    await wait_for(lambda: metric(gw, "tutorgate_policy_reload_failures_total") == 1)
    assert gw.gateway.policy.sha == sha
    st, rem = await remaining(http, gw.url(SUBJECT), sid())
    assert st == 200 and rem is not None and int(rem) > 3000
    assert metric(gw, "tutorgate_policy_info", sha=sha) == 1


async def test_policy_push_switches_all_instances(tmp_path: Path, upstream, gateways, http,
                                                  private_redis):
    """`tutorgate policy push` switches every instance on the Redis within a second."""
    pol = policy_text(max_duration="1h")
    a = await gateways(pol, upstream.url, redis_url=private_redis.url)
    b = await gateways(pol, upstream.url, redis_url=private_redis.url)
    await asyncio.sleep(0.5)  # both followers subscribed
    new = tmp_path / "new.yaml"
    new.write_text(policy_text(max_duration="15m"))
    exe = Path(sys.executable).parent / "tutorgate"
    t = time.monotonic()
    out = subprocess.run([str(exe), "policy", "push", str(new), "--redis", private_redis.url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    await wait_for(lambda: a.gateway.policy.sha == b.gateway.policy.sha != "" and
                   a.gateway.policy.model.lesson.max_duration == 900, 3.0)
    assert time.monotonic() - t < 3.0
    for g in (a, b):
        st, rem = await remaining(http, g.url(SUBJECT), sid())
        assert st == 200 and rem is not None and 890 <= int(rem) <= 900


async def test_shadow_mode_denies_nothing_and_counts(upstream, gateways, http):
    """mode: shadow lets everything through and counts shadow_deny per rule."""
    gw = await gateways(policy_text(max_duration="1s", min_break="1h", extra="mode: shadow"),
                        upstream.url, manual_clock=True)
    async with http.get(gw.url("/api/photo-search")) as r:
        assert r.status == 200
    s = sid()
    async with http.get(gw.url(SUBJECT), headers={"X-Student-Id": s,
                                                  "X-Student-Grade": "preschool"}) as r:
        assert r.status == 200
    st, _ = await remaining(http, gw.url(SUBJECT), s)
    await elapse(gw, 1.1)
    st, _ = await remaining(http, gw.url(SUBJECT), s)
    assert st == 200
    assert metric(gw, "tutorgate_decisions_total", decision="shadow_deny",
                  rule="forbidden_feature") == 1
    assert metric(gw, "tutorgate_decisions_total", decision="shadow_deny", rule="preschool") == 1
    assert metric(gw, "tutorgate_decisions_total", decision="shadow_deny",
                  rule="break_required") == 1
    assert metric(gw, "tutorgate_decisions_total", decision="deny") == 0


async def test_shadow_one_rule(upstream, gateways, http):
    """shadow_rules: [preschool] shadows that rule only; the others still deny."""
    gw = await gateways(policy_text(extra="shadow_rules: [preschool]"), upstream.url)
    async with http.get(gw.url(ARTS), headers={"X-Student-Id": sid(),
                                               "X-Student-Grade": "preschool"}) as r:
        assert r.status == 200
    async with http.get(gw.url("/api/photo-search")) as r:
        assert r.status == 403


@pytest.mark.skipif(near_local_midnight(), reason="the day would change mid-test")
async def test_daily_limit_across_lessons(upstream, gateways, http, store_url):
    """daily_max counts lesson time over several lessons: once used up, 429 daily_limit."""
    gw = await gateways(policy_text(max_duration="1s", min_break="1s", extra="daily_max: 2s"),
                        upstream.url, redis_url=store_url, manual_clock=True)
    clock = gw.gateway.clock
    s = sid()
    for _ in range(2):
        t = clock.now()
        st, _ = await remaining(http, gw.url(ARTS), s)
        assert st == 200
        await elapse(gw, max(0.0, t + 0.6 - clock.now()))
        assert (await remaining(http, gw.url(ARTS), s))[0] == 200
        await elapse(gw, max(0.0, t + 2.1 - clock.now()))
    async with http.get(gw.url(ARTS), headers={"X-Student-Id": s}) as r:
        body = await r.json()
        assert r.status == 429 and body["rule"] == "daily_limit"
        assert body["retry_after"] > 0


async def test_region_and_stage_overrides(upstream, gateways, http):
    """A region's vacation closes subject classes for its students only; a
    stage's lesson length applies to its grades."""
    import datetime as dt

    from kit import TZ
    today = dt.datetime.now(TZ).date()
    first, last = today - dt.timedelta(days=1), today + dt.timedelta(days=1)
    extra = (f"stages: {{senior: {{lesson: {{max_duration: 45m}}}}}}\n"
             f"regions: {{'650000': {{rest_days: {{vacations: [{{name: winter, "
             f"start: {first}, end: {last}}}]}}}}}}\n")
    gw = await gateways(policy_text(max_duration="30m", extra=extra), upstream.url)
    async with http.get(gw.url(SUBJECT), headers={"X-Student-Id": sid(),
                                                  "X-Student-Region": "650000"}) as r:
        assert r.status == 403 and (await r.json())["rule"] == "rest_day"
    st, rem = await remaining(http, gw.url(SUBJECT), sid(), **{"X-Student-Region": "110000"})
    assert st == 200
    assert metric(gw, "tutorgate_unknown_region_total") == 1
    st, rem = await remaining(http, gw.url(SUBJECT), sid(), **{"X-Student-Grade": "11"})
    assert st == 200 and rem is not None and 2690 <= int(rem) <= 2700
    st, rem = await remaining(http, gw.url(SUBJECT), sid(), **{"X-Student-Grade": "8"})
    assert rem is not None and 1790 <= int(rem) <= 1800


def test_sighup_reloads(tmp_path: Path, upstream_process):
    """SIGHUP re-reads the policy file at once."""
    path = tmp_path / "p.yaml"
    path.write_text(policy_text(max_duration="1h"))
    gw = spawn_gateway(str(path), upstream_process)
    try:
        assert "tutorgate_policy_reloads_total 0.0" in gw.admin("/metrics")[1]
        path.write_text(policy_text(max_duration="2h"))
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 3
        while "tutorgate_policy_reloads_total 1.0" not in gw.admin("/metrics")[1]:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
    finally:
        gw.stop()


_ = json
