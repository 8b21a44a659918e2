"""End-to-end: the real proxy, a real upstream, real sockets (both stores)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from kit import (
    ARTS,
    FORBIDDEN,
    SUBJECT,
    body_chunks,
    elapse,
    free_port,
    headers_of,
    metric,
    near_local_time,
    policy_text,
)
from yarl import URL


def sid() -> str:
    return "stu-" + uuid.uuid4().hex[:10]


async def get(http: aiohttp.ClientSession, url: str | URL, student: str | None = None,
              grade: str | None = None, **kw):  # type: ignore[no-untyped-def]
    headers = dict(kw.pop("headers", {}))
    if student is not None:
        headers["X-Student-Id"] = student
    if grade is not None:
        headers["X-Student-Grade"] = grade
    async with http.request(kw.pop("method", "GET"), url, headers=headers, **kw) as r:
        return r.status, r.headers, await r.read()


async def test_passthrough_is_transparent(upstream, gateways, http):
    """Unmatched routes: method, raw path, query, body and end-to-end headers
    reach the upstream unchanged, X-Forwarded-* are set, and no store call is made."""
    gw = await gateways(policy_text(), upstream.url)
    body = os.urandom(300_000)
    url = URL(gw.url("/plain/a%20b/?q=x%2Fy&a=1&a=2"), encoded=True)
    st, hdrs, raw = await get(http, url, method="POST",
                              data=body, headers={"X-Custom": "v", "Cookie": "a=1",
                                                  "Connection": "x-drop", "X-Drop": "1"})
    assert st == 200 and hdrs["X-Upstream"] == "echo"
    echo = __import__("json").loads(raw)
    assert echo["path"] == "/plain/a%20b/?q=x%2Fy&a=1&a=2"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    h = headers_of(echo)
    assert h["x-custom"] == "v" and h["cookie"] == "a=1"
    assert "x-drop" not in h
    assert h.get("connection") != "x-drop"
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert "X-Lesson-Remaining" not in hdrs
    assert metric(gw, "tutorgate_store_latency_seconds_count") == 0


async def test_no_default_headers_added_upstream(upstream, gateways, http):
    """The proxy adds no User-Agent/Accept/Accept-Encoding of its own."""
    gw = await gateways(policy_text(), upstream.url)
    async with http.get(gw.url("/plain/"), skip_auto_headers=("User-Agent", "Accept",
                                                             "Accept-Encoding")) as r:
        echo = await r.json()
    h = headers_of(echo)
    assert "user-agent" not in h and "accept-encoding" not in h and "accept" not in h
    # nor a Content-Type for a body that came without one, read whole or streamed
    async def stream() -> AsyncIterator[bytes]:
        yield b"x" * 10

    for body in (b"raw bytes", stream()):
        async with http.post(gw.url("/plain/"), data=body, skip_auto_headers=(
                "User-Agent", "Accept", "Accept-Encoding", "Content-Type")) as r:
            echo = await r.json()
        h = headers_of(echo)
        assert "content-type" not in h and "user-agent" not in h and "accept" not in h


async def test_upstream_cookies_not_shared_between_students(upstream, gateways, http):
    """The upstream client keeps no cookie jar: one student's Set-Cookie never
    rides on another's request."""
    gw = await gateways(policy_text(), upstream.url)
    st, hdrs, _ = await get(http, gw.url("/plain/login"), headers={"X-Echo-Cookie": "alice"})
    assert st == 200 and "alice" in hdrs.get("Set-Cookie", "")
    async with aiohttp.ClientSession() as other, other.get(gw.url("/plain/next")) as r:
        echo = await r.json()
    assert "cookie" not in headers_of(echo)


async def test_gzip_body_passes_untouched(upstream, gateways, http):
    """Content-Encoding bodies are forwarded as they are (no decompression)."""
    import gzip
    gw = await gateways(policy_text(), upstream.url)
    data = gzip.compress(b"hello" * 1000)
    st, _, raw = await get(http, gw.url("/plain/gz"), method="POST", data=data,
                           headers={"Content-Encoding": "gzip"})
    assert st == 200
    echo = __import__("json").loads(raw)
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()


async def test_large_download_streams(upstream, gateways, http):
    """A body larger than the in-memory threshold streams through intact."""
    gw = await gateways(policy_text(), upstream.url)
    n = 5 * 1024 * 1024 + 3
    st, _, raw = await get(http, gw.url(f"/files/download?n={n}"))
    assert st == 200 and len(raw) == n and raw == b"x" * n


async def test_upload_streams_with_length(upstream, gateways, http):
    """A streamed upload arrives whole, with its Content-Length kept."""
    gw = await gateways(policy_text(), upstream.url)
    n = 8 * 1024 * 1024
    async with http.post(gw.url("/plain/up"), data=body_chunks(n),
                         headers={"Content-Length": str(n)}) as r:
        echo = await r.json()
    assert echo["body_length"] == n
    assert headers_of(echo).get("content-length") == str(n)


async def test_body_cap_gives_413(upstream, gateways, http):
    """With a body cap, a larger declared body is refused with 413 before it goes upstream."""
    gw = await gateways(policy_text(), upstream.url, max_body=1000)
    before = len(upstream.seen)
    st, _, _ = await get(http, gw.url("/plain/up"), method="POST", data=b"x" * 5000)
    assert st == 413
    assert len(upstream.seen) == before


async def test_upstream_down_502_and_timeout_504(gateways, http, upstream):
    """Upstream unreachable -> 502 JSON upstream_error; upstream too slow -> 504."""
    dead = await gateways(policy_text(), f"http://127.0.0.1:{free_port()}")
    st, hdrs, raw = await get(http, dead.url("/plain/x"))
    assert st == 502 and hdrs["Content-Type"].startswith("application/json")
    assert __import__("json").loads(raw)["rule"] == "upstream_error"
    slow = await gateways(policy_text(), upstream.url, read_timeout=0.3)
    st, _, raw = await get(http, slow.url("/plain/slow?s=2"))
    assert st == 504 and __import__("json").loads(raw)["rule"] == "upstream_error"
    assert metric(slow, "tutorgate_upstream_errors_total", reason="timeout") == 1


async def test_upstream_5xx_passes_back(upstream, gateways, http):
    """The upstream's own 5xx answers pass back unchanged."""
    gw = await gateways(policy_text(), upstream.url)
    st, hdrs, _ = await get(http, gw.url("/plain/x"), headers={"X-Echo-Status": "503"})
    assert st == 503 and hdrs["X-Upstream"] == "echo"


async def test_dot_segments_do_not_bypass_routes(upstream, gateways, http):
    """/x/../classroom/subject/... and //classroom/... are matched as the
    enforced route they resolve to."""
    gw = await gateways(policy_text(), upstream.url)
    for path in ("/plain/../classroom/subject/m", "//classroom/subject/m",
                 "/classroom/./subject/m"):
        async with http.get(URL(gw.url(path), encoded=True)) as r:
            assert r.status == 401, path


# ------------------------------------------------------------------ decisions

async def test_decisions_and_denial_bodies(upstream, gateways, http, store_url):
    """Each static rule answers with its status and JSON body; allowed lesson
    requests carry X-Lesson-Remaining."""
    gw = await gateways(policy_text(max_duration="30m", min_break="10m"), upstream.url,
                        redis_url=store_url)
    st, hdrs, raw = await get(http, gw.url(FORBIDDEN), student=sid())
    assert st == 403 and __import__("json").loads(raw) == {
        "rule": "forbidden_feature", "message": __import__("json").loads(raw)["message"],
        "retry_after": None}
    assert "Retry-After" not in hdrs
    assert (await get(http, gw.url(SUBJECT)))[0] == 401
    assert (await get(http, gw.url(SUBJECT), student="bad id"))[0] == 400
    assert (await get(http, gw.url(SUBJECT), student=sid(), grade="13"))[0] == 400
    assert (await get(http, gw.url(ARTS), student=sid(), grade="preschool"))[0] == 403
    st, hdrs, _ = await get(http, gw.url(SUBJECT), student=sid(), grade="5")
    assert st == 200 and 1799 <= int(hdrs["X-Lesson-Remaining"]) <= 1800
    assert metric(gw, "tutorgate_decisions_total", decision="deny", rule="bad_identity") == 2


async def test_html_denial_for_browsers(upstream, gateways, http):
    """A browser gets a Chinese page with the wait time; an API client JSON."""
    gw = await gateways(policy_text(max_duration="1s", min_break="30s"), upstream.url,
                        manual_clock=True)
    s = sid()
    assert (await get(http, gw.url(SUBJECT), student=s))[0] == 200
    await elapse(gw, 1.1)
    st, hdrs, raw = await get(http, gw.url(SUBJECT), student=s,
                              headers={"Accept": "text/html,*/*;q=0.8"})
    assert st == 429 and hdrs["Content-Type"].startswith("text/html")
    page = raw.decode()
    assert "课间休息" in page and "秒" in page
    assert 28 <= int(hdrs["Retry-After"]) <= 30


async def test_lesson_limit_break_and_recovery(upstream, gateways, http, store_url):
    """A lesson ends at max_duration, the break lasts min_break (429 with
    Retry-After), and a new lesson starts after it."""
    gw = await gateways(policy_text(max_duration="2s", min_break="2s"), upstream.url,
                        redis_url=store_url, manual_clock=True)
    s = sid()
    t0 = gw.gateway.clock.now()
    st, hdrs, _ = await get(http, gw.url(SUBJECT), student=s)
    assert st == 200 and int(hdrs["X-Lesson-Remaining"]) in (1, 2)
    await elapse(gw, 1.0)
    assert (await get(http, gw.url(ARTS), student=s))[0] == 200
    await elapse(gw, max(0, t0 + 2.2 - gw.gateway.clock.now()))
    st, hdrs, raw = await get(http, gw.url(SUBJECT), student=s)
    assert st == 429 and __import__("json").loads(raw)["rule"] == "break_required"
    ra = int(hdrs["Retry-After"])
    assert 1 <= ra <= 2
    await elapse(gw, ra + 0.2)
    st, hdrs, _ = await get(http, gw.url(SUBJECT), student=s)
    assert st == 200 and int(hdrs["X-Lesson-Remaining"]) >= 1


async def test_status_endpoint(upstream, gateways, http, store_url):
    """GET /_tutorgate/status tells lesson/break state and seconds remaining
    without counting as activity."""
    gw = await gateways(policy_text(max_duration="1s", min_break="5s"), upstream.url,
                        redis_url=store_url, manual_clock=True)
    s = sid()
    async with http.get(gw.url("/_tutorgate/status"), headers={"X-Student-Id": s}) as r:
        assert (await r.json())["state"] == "free"
    await get(http, gw.url(SUBJECT), student=s)
    async with http.get(gw.url("/_tutorgate/status"), headers={"X-Student-Id": s}) as r:
        body = await r.json()
    assert body["state"] == "lesson" and body["lesson_remaining"] in (0, 1)
    await elapse(gw, 1.1)
    async with http.get(gw.url("/_tutorgate/status"), headers={"X-Student-Id": s}) as r:
        body = await r.json()
    assert body["state"] == "break" and body["rule"] == "break_required"
    assert 3 <= body["break_remaining"] <= 5
    async with http.get(gw.url("/_tutorgate/status")) as r:
        assert r.status == 401


async def test_admin_endpoints(upstream, gateways, http, store_url):
    """/healthz and /readyz answer 200; /metrics has the contract's metrics
    and no student value."""
    gw = await gateways(policy_text(), upstream.url, redis_url=store_url)
    s = "alice-secret-id"
    await get(http, gw.url(SUBJECT), student=s)
    async with http.get(gw.admin + "/healthz") as r:
        assert r.status == 200
    async with http.get(gw.admin + "/readyz") as r:
        assert r.status == 200
    async with http.get(gw.admin + "/metrics") as r:
        text = await r.text()
    for name in ("tutorgate_decisions_total", "tutorgate_active_lessons",
                 "tutorgate_connections_cut_total", "tutorgate_policy_info",
                 "tutorgate_calendar_covered_until_timestamp"):
        assert name in text
    assert s not in text
    assert metric(gw, "tutorgate_active_lessons") == 1


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_redis_outage(upstream, gateways, http, private_redis, mode):
    """Redis stopped mid-test: lesson requests get 503 state_unavailable
    (fail_closed) or pass and are counted (fail_open), each within
    milliseconds; pass-through keeps working; readyz says 503; and it all
    recovers by itself when Redis returns."""
    gw = await gateways(policy_text(extra=f"failure_mode: {mode}"), upstream.url,
                        redis_url=private_redis.url)
    s = sid()
    assert (await get(http, gw.url(SUBJECT), student=s))[0] == 200
    private_redis.stop()
    t = time.monotonic()
    st, _, raw = await get(http, gw.url(SUBJECT), student=s)
    took = time.monotonic() - t
    if mode == "fail_closed":
        assert st == 503 and __import__("json").loads(raw)["rule"] == "state_unavailable"
    else:
        assert st == 200
        assert metric(gw, "tutorgate_fail_open_total") >= 1
    assert took < 1.0, f"a dead Redis cost {took:.2f}s"
    assert (await get(http, gw.url("/plain/x")))[0] == 200
    async with http.get(gw.admin + "/readyz") as r:
        assert r.status == 503
    assert metric(gw, "tutorgate_store_errors_total") >= 1
    private_redis.start()
    deadline = time.monotonic() + 5
    while True:
        st, _, _ = await get(http, gw.url(SUBJECT), student=s)
        if st == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert st == 200
    async with http.get(gw.admin + "/readyz") as r:
        assert r.status == 200


async def test_race_two_instances_one_lesson_no_lost_break(upstream, gateways, redis_server):
    """Many concurrent first requests for one student through two gateway
    instances start exactly one lesson; once it is over, a concurrent burst
    through both instances is all break_required: the break is not lost."""
    pol = policy_text(max_duration="2s", min_break="30s")
    a = await gateways(pol, upstream.url, redis_url=redis_server.url)
    b = await gateways(pol, upstream.url, redis_url=redis_server.url)
    s = sid()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def burst() -> list[tuple[int, str | None]]:
            async def one(g):  # type: ignore[no-untyped-def]
                async with http.get(g.url(SUBJECT), headers={"X-Student-Id": s}) as r:
                    await r.read()
                    return r.status, r.headers.get("X-Lesson-Remaining")
            return await asyncio.gather(*(one(a if i % 2 else b) for i in range(120)))

        first = await burst()
        assert {st for st, _ in first} == {200}
        started = (metric(a, "tutorgate_lessons_started_total") +
                   metric(b, "tutorgate_lessons_started_total"))
        assert started == 1
        await asyncio.sleep(2.2)
        second = await burst()
    assert {st for st, _ in second} == {429}
    assert (metric(a, "tutorgate_lessons_started_total") +
            metric(b, "tutorgate_lessons_started_total")) == 1


async def test_jwt_identity_end_to_end(upstream, gateways, http, monkeypatch):
    """source: jwt: a signed token in a bearer header or the named cookie
    identifies the student; a bad or expired token is identity_required."""
    import jwt as pyjwt
    monkeypatch.setenv("TEST_JWT_KEY", "k" * 32)
    extra = ("identity: {source: jwt, jwt: {algorithm: HS256, key_env: TEST_JWT_KEY, "
             "cookie: session}}")
    gw = await gateways(policy_text(max_duration="30m", extra=extra), upstream.url)
    good = pyjwt.encode({"sub": sid(), "grade": "5", "exp": int(time.time()) + 60},
                        "k" * 32, algorithm="HS256")
    expired = pyjwt.encode({"sub": sid(), "exp": int(time.time()) - 60}, "k" * 32,
                           algorithm="HS256")
    st, hdrs, _ = await get(http, gw.url(SUBJECT), headers={"Authorization": f"Bearer {good}"})
    assert st == 200 and "X-Lesson-Remaining" in hdrs
    async with aiohttp.ClientSession(cookies={"session": good}) as browser, \
            browser.get(gw.url(SUBJECT)) as r:
        assert r.status == 200
    for headers in ({"Authorization": f"Bearer {expired}"}, {"Authorization": "Bearer x.y.z"},
                    {"X-Student-Id": sid()}):
        st, _, raw = await get(http, gw.url(SUBJECT), headers=headers)
        assert st == 401 and __import__("json").loads(raw)["rule"] == "identity_required"


@pytest.mark.skipif(near_local_time(23, 0, 180),
                    reason="the demo's 23:00 curfew would cut the lesson short")
async def test_demo_countdown_through_the_gateway(http):
    """The demo: its auth stand-in turns cookies into identity headers, the
    lesson page is served through the gateway, and the status endpoint the
    page's countdown reads answers for that student."""
    from aiohttp import web
    from kit import free_port

    from gateway.app import Gateway
    from gateway.demo.run import demo_auth, demo_policy
    from gateway.demo.site import make_site
    from gateway.settings import Settings
    site = web.AppRunner(make_site())
    await site.setup()
    sport, gport = free_port(), free_port()
    await web.TCPSite(site, "127.0.0.1", sport).start()
    gw = Gateway(Settings(policy_path="", upstream=f"http://127.0.0.1:{sport}",
                          id_secret=b"demo"), demo_policy())
    app = gw.main_app()
    app.middlewares.append(demo_auth)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", gport).start()
    try:
        cookies = {"demo_sid": sid(), "demo_grade": "3"}
        async with aiohttp.ClientSession(cookies=cookies) as browser:
            async with browser.get(f"http://127.0.0.1:{gport}/classroom/arts/drawing") as r:
                page = await r.text()
                assert r.status == 200 and "/_tutorgate/status" in page
                assert 44 <= int(r.headers["X-Lesson-Remaining"]) <= 45
            async with browser.get(f"http://127.0.0.1:{gport}/_tutorgate/status") as r:
                st = await r.json()
            assert st["state"] == "lesson" and 43 <= st["lesson_remaining"] <= 45
            async with browser.get(f"http://127.0.0.1:{gport}/api/photo-search") as r:
                assert r.status == 403
    finally:
        await runner.cleanup()
        await site.cleanup()
