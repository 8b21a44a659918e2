"""Live lesson connections: WebSockets and streams, their cut-offs (both stores)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from kit import ARTS, SUBJECT, TZ, elapse, metric, policy_text, spawn_gateway

from gateway.store.memory import MemoryStore
from gateway.timesource import ManualClock

LIVE = "/classroom/arts/room/live"
STREAM = "/classroom/arts/room/stream"


def sid() -> str:
    return "stu-" + uuid.uuid4().hex[:10]


def who(s: str) -> dict[str, str]:
    return {"X-Student-Id": s}


async def test_websocket_echo_and_close_codes(upstream, gateways, http):
    """A WebSocket relays text and binary both ways, negotiates the upstream's
    subprotocol, and passes the upstream's close code through."""
    gw = await gateways(policy_text(max_duration="30m"), upstream.url)
    async with http.ws_connect(gw.ws_url(LIVE), headers=who(sid()),
                               protocols=("chat.v1",)) as ws:
        assert ws.protocol == "chat.v1"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=2)).data == "hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=2)).data == b"\x00\x01"
        await ws.send_str("close:4321")
        msg = await ws.receive(timeout=2)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4321
    # pings and pongs pass through both ways
    async with http.ws_connect(gw.ws_url(LIVE), headers=who(sid()), autoping=False) as ws:
        await ws.ping(b"are-you-there")
        msg = await ws.receive(timeout=2)
        assert msg.type == aiohttp.WSMsgType.PONG and msg.data == b"are-you-there"
    # pass-through WebSockets work too
    async with http.ws_connect(gw.ws_url("/plain/live")) as ws:
        await ws.send_str("x")
        assert (await ws.receive(timeout=2)).data == "x"


async def test_websocket_cut_at_lesson_limit(upstream, gateways, http, store_url):
    """An open lesson WebSocket is closed at the lesson limit with a 4000-4999
    code and reason lesson_limit, not before it and within a second of it."""
    gw = await gateways(policy_text(max_duration="2s", min_break="5s"), upstream.url,
                        redis_url=store_url, manual_clock=True)
    clock = gw.gateway.clock
    t0 = clock.now()
    async with http.ws_connect(gw.ws_url(LIVE), headers=who(sid())) as ws:
        await elapse(gw, max(0.0, t0 + 1.8 - clock.now()))
        assert metric(gw, "tutorgate_connections_cut_total") == 0
        await elapse(gw, 0.3)
        msg = await ws.receive(timeout=1)  # past the deadline: cut at once
        closed_at = clock.now()
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert 4000 <= msg.data <= 4999 and msg.extra == "lesson_limit"
    assert 1.9 <= closed_at - t0 <= 3.0, closed_at - t0
    assert metric(gw, "tutorgate_connections_cut_total", rule="lesson_limit",
                  kind="websocket") == 1


async def test_websocket_cut_at_curfew(upstream, gateways, http):
    """A lesson WebSocket open when the curfew starts is closed with reason curfew."""
    clock = ManualClock()
    start = (dt.datetime.fromtimestamp(clock.now(), TZ)
             + dt.timedelta(seconds=3)).replace(microsecond=0)
    end = start + dt.timedelta(hours=1)
    if end.date() != start.date():
        pytest.skip("too close to local midnight")
    gw = await gateways(policy_text(max_duration="1h", curfew=(f"{start:%H:%M:%S}",
                                                                f"{end:%H:%M:%S}")),
                        upstream.url, store=MemoryStore(clock))
    async with http.ws_connect(gw.ws_url(LIVE), headers=who(sid())) as ws:
        await elapse(gw, start.timestamp() - 0.2 - clock.now())
        assert metric(gw, "tutorgate_connections_cut_total") == 0
        await elapse(gw, 0.4)
        msg = await ws.receive(timeout=1)  # past the curfew start: cut at once
        closed_at = clock.now()
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "curfew"
    assert 4000 <= msg.data <= 4999
    assert abs(closed_at - start.timestamp()) < 1.0
    # reconnecting is refused while the rule holds, before any upstream connection
    opened = upstream.ws_opened
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await http.ws_connect(gw.ws_url(LIVE), headers=who(sid()))
    assert e.value.status == 403
    assert upstream.ws_opened == opened


async def test_curfew_backstop_decides_on_the_gateway_clock(upstream, gateways, http):
    """The curfew backstop job cuts a connection when the gateway's clock (not
    the host's) is inside the curfew."""
    clock = ManualClock()
    start = (dt.datetime.fromtimestamp(clock.now(), TZ)
             + dt.timedelta(hours=1)).replace(microsecond=0)
    end = start + dt.timedelta(hours=1)
    if end.date() != start.date():
        pytest.skip("too close to local midnight")
    gw = await gateways(policy_text(max_duration="3h", curfew=(f"{start:%H:%M:%S}",
                                                                f"{end:%H:%M:%S}")),
                        upstream.url, store=MemoryStore(clock))
    async with http.ws_connect(gw.ws_url(LIVE), headers=who(sid())) as ws:
        # the host's clock is an hour before the curfew, the gateway's inside it;
        # the backstop runs before the connection's own timer gets its turn
        clock.advance(start.timestamp() + 60 - clock.now())
        await gw.gateway.curfew_cut()
        assert metric(gw, "tutorgate_connections_cut_total", rule="curfew") == 1
        msg = await ws.receive(timeout=1)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "curfew"


async def test_stream_ends_at_lesson_limit(upstream, gateways, http, store_url):
    """A server-sent-event stream on a lesson route ends at the limit."""
    gw = await gateways(policy_text(max_duration="2s", min_break="5s"), upstream.url,
                        redis_url=store_url, manual_clock=True)
    clock = gw.gateway.clock
    t0 = clock.now()
    got = 0
    async with http.get(gw.url(STREAM), headers=who(sid())) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert int(r.headers["X-Lesson-Remaining"]) in (1, 2)
        while got <= 3:  # the stream flows (ticks 0.1 s apart)
            await r.content.readany()
            got += 1
        await elapse(gw, max(0.0, t0 + 1.8 - clock.now()))
        assert metric(gw, "tutorgate_connections_cut_total") == 0
        await elapse(gw, 0.3)
        real_t0 = time.monotonic()
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                            aiohttp.ClientConnectionError)):
            async for _ in r.content.iter_any():
                got += 1
                if time.monotonic() - real_t0 > 1:  # past the deadline: cut at once
                    pytest.fail("stream not cut")
    took = clock.now() - t0
    assert got > 3 and 1.9 <= took <= 3.0, took
    assert metric(gw, "tutorgate_connections_cut_total", rule="lesson_limit",
                  kind="stream") == 1


async def test_open_websocket_keeps_lesson_going(upstream, gateways, http, store_url):
    """While a lesson WebSocket is open, quiet time does not end the lesson:
    an HTTP request after more than min_break continues the same lesson."""
    gw = await gateways(policy_text(max_duration="6s", min_break="1s"), upstream.url,
                        redis_url=store_url, manual_clock=True)
    s = sid()
    async with http.ws_connect(gw.ws_url(LIVE), headers=who(s)):
        await elapse(gw, 2.5)
        async with http.get(gw.url(ARTS), headers=who(s)) as r:
            remaining = int(r.headers["X-Lesson-Remaining"])
    assert remaining <= 4, f"a new lesson started: remaining {remaining}"


async def test_denied_upgrade_never_reaches_upstream(upstream, gateways, http):
    """A denied WebSocket upgrade gets the plain HTTP denial (JSON) and no
    upstream connection is made."""
    gw = await gateways(policy_text(), upstream.url)
    opened = upstream.ws_opened
    for headers, status in (({}, 401), ({"X-Student-Id": sid(), "X-Student-Grade": "preschool"},
                                        403)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(gw.ws_url(LIVE), headers=headers)
        assert e.value.status == status
    assert upstream.ws_opened == opened


async def test_two_instances_cut_together(upstream, gateways, http, redis_server):
    """One student, two WebSockets on two gateway instances sharing Redis:
    both close together at the shared lesson deadline."""
    pol = policy_text(max_duration="3s", min_break="5s")
    a = await gateways(pol, upstream.url, redis_url=redis_server.url)
    b = await gateways(pol, upstream.url, redis_url=redis_server.url)
    s = sid()
    async with http.ws_connect(a.ws_url(LIVE), headers=who(s)) as w1:
        await asyncio.sleep(1.0)
        async with http.ws_connect(b.ws_url(LIVE), headers=who(s)) as w2:
            m1, m2 = await asyncio.gather(w1.receive(timeout=6), w2.receive(timeout=6))
            t = time.time()
    assert m1.extra == m2.extra == "lesson_limit"
    assert m1.type == m2.type == aiohttp.WSMsgType.CLOSE
    assert time.time() - t < 1.0


async def test_policy_revocation_cuts_across_instances(upstream, gateways, http, redis_server):
    """A cut published by one instance closes the student's connections on
    every instance within a second."""
    from gateway.store.base import Cut
    pol = policy_text(max_duration="1h")
    a = await gateways(pol, upstream.url, redis_url=redis_server.url)
    b = await gateways(pol, upstream.url, redis_url=redis_server.url)
    s = sid()
    async with http.ws_connect(b.ws_url(LIVE), headers=who(s)) as ws:
        await asyncio.sleep(0.3)
        key = a.gateway.pseudonym(s)
        t = time.time()
        await a.gateway.store.publish_cut(Cut(key, "policy", "test"))
        msg = await ws.receive(timeout=3)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "policy"
    assert time.time() - t < 1.0


def test_sigterm_closes_websockets_with_1001(tmp_path: Path, upstream_process):
    """On SIGTERM the gateway closes live connections with 1001, lets an
    ordinary request in flight finish, and exits 0."""
    pol = tmp_path / "p.yaml"
    pol.write_text(policy_text(max_duration="1h"))
    gw = spawn_gateway(str(pol), upstream_process)
    try:
        async def scenario() -> tuple[aiohttp.WSMessage, aiohttp.WSMessage]:
            async with aiohttp.ClientSession() as http, \
                    http.ws_connect(gw.ws_url(LIVE), headers=who(sid())) as lesson_ws, \
                    http.ws_connect(gw.ws_url("/plain/live")) as plain_ws:
                slow = asyncio.create_task(http.get(gw.url("/plain/slow?s=1.5")))
                await asyncio.sleep(0.3)
                gw.proc.send_signal(signal.SIGTERM)
                m1 = await lesson_ws.receive(timeout=5)
                m2 = await plain_ws.receive(timeout=5)
                async with await slow as r:
                    assert r.status == 200 and (await r.json())["path"] == "/plain/slow?s=1.5"
                return m1, m2
        m1, m2 = asyncio.run(scenario())
        assert m1.type == aiohttp.WSMsgType.CLOSE and m1.data == 1001
        assert m2.type == aiohttp.WSMsgType.CLOSE and m2.data == 1001
        assert gw.proc.wait(10) == 0
    finally:
        gw.stop()


_ = (SUBJECT, json)
