"""The shipped nginx example (deploy/nginx) against real nginx: clients see
what serve would answer, pass-through never reaches tutorgate, and lessons
are one clock across nginx+authz and serve."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from authz_kit import STATEFUL, STATELESS, assert_same_denial, fetch, rules_policy
from kit import ARTS, SUBJECT, free_port, metric, near_local_midnight

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("nginx_local", ROOT / "deploy/nginx/local.py")
assert _spec is not None and _spec.loader is not None
nginx_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nginx_local)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[object]:
    """Factory: start the example for (app, authz, serve) addresses; returns its base URL."""
    if shutil.which(nginx_local.NGINX) is None:
        pytest.fail("nginx is not installed (apt-get install nginx)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(app: str, authz: str, serve: str) -> str:
        port = free_port()
        d = tmp_path / f"nginx-{port}"
        conf = nginx_local.write(d, nginx_local.render(app, authz, serve, port))
        procs.append(nginx_local.start(d, conf, port))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def addr(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture
async def stack(redis_server, upstream, gateways, nginx):  # type: ignore[no-untyped-def]
    """nginx with the example config, tutorgate authz and serve on one Redis."""
    redis_server.flush()
    text = rules_policy()
    authz = await gateways(text, "", redis_url=redis_server.url)
    serve = await gateways(text, upstream.url, redis_url=redis_server.url)
    base = nginx(addr(upstream.url), addr(authz.base), addr(serve.base))
    return base, authz, serve


@pytest.mark.skipif(near_local_midnight(), reason="rest_day and curfew regions move at midnight")
async def test_clients_see_what_serve_answers(stack, http):  # type: ignore[no-untyped-def]
    """Through nginx, every rule's denial has serve's status, body and Retry-After."""
    base, authz, serve = stack
    for rule, path, headers in STATELESS:
        for extra in ({}, {"Accept": "text/html", "Accept-Language": "en"}):
            got = await fetch(http, base + path, {**headers, **extra})
            want = await fetch(http, serve.url(path), {**headers, **extra})
            assert_same_denial(got, want, rule)
    for rule, headers in STATEFUL:
        first = await fetch(http, base + SUBJECT, headers)
        assert first.status == 200 and first.headers.get("x-upstream") == "echo", rule
    await asyncio.sleep(1.1)
    for rule, headers in STATEFUL:
        got = await fetch(http, base + SUBJECT, headers)
        want = await fetch(http, serve.url(SUBJECT), headers)
        assert_same_denial(got, want, rule)
    # the decisions were taken (and counted) by the decision service
    assert metric(authz, "tutorgate_decisions_total", decision="deny",
                  rule="break_required") == 1


async def test_state_unavailable_through_nginx(upstream, gateways, nginx, http):  # type: ignore[no-untyped-def]
    """The store down: nginx gives serve's 503, not its own 500."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    text = rules_policy()
    authz = await gateways(text, "", redis_url=dead)
    serve = await gateways(text, upstream.url, redis_url=dead)
    base = nginx(addr(upstream.url), addr(authz.base), addr(serve.base))
    headers = {"X-Student-Id": "s-down"}
    got = await fetch(http, base + SUBJECT, headers)
    want = await fetch(http, serve.url(SUBJECT), headers)
    assert_same_denial(got, want, "state_unavailable")


async def test_decision_service_down_is_503(upstream, nginx, http):  # type: ignore[no-untyped-def]
    """tutorgate not answering: lesson requests get a 503 state_unavailable, not forwarded."""
    gone = f"127.0.0.1:{free_port()}"
    base = nginx(addr(upstream.url), gone, gone)
    r = await fetch(http, base + SUBJECT, {"X-Student-Id": "s"})
    assert r.status == 503 and r.json()["rule"] == "state_unavailable"
    assert not upstream.seen


async def test_allowed_lessons_carry_remaining_and_pass_through_never_asks(stack, http, upstream):  # type: ignore[no-untyped-def]
    """Allowed lesson answers carry X-Lesson-Remaining; other paths are not checked."""
    base, authz, _ = stack
    r = await fetch(http, base + ARTS + "?x=1", {"X-Student-Id": "s-ok"})
    assert r.status == 200 and r.headers["x-upstream"] == "echo"
    assert int(r.headers["x-lesson-remaining"]) in (59, 60)
    assert upstream.seen[-1]["path"] == ARTS + "?x=1"
    checks = metric(authz, "tutorgate_authz_checks_total")
    for path in ("/", "/static/app.js", "/classroom/", "/api/other"):
        r = await fetch(http, base + path, {"X-Student-Id": "s-ok"})
        assert r.status == 200 and "x-lesson-remaining" not in r.headers, path
    assert metric(authz, "tutorgate_authz_checks_total") == checks
    # a ";parameters" segment is asked about (an upstream may cut it)
    r = await fetch(http, base + "/api/photo-search;x=1/a")
    assert r.status == 403 and r.json()["rule"] == "forbidden_feature"
    # a client's own copy of the target headers never decides
    r = await fetch(http, base + "/api/photo-search",
                    {"X-Forwarded-Uri": "/static/x", "X-Original-URI": "/static/x"})
    assert r.status == 403 and r.json()["rule"] == "forbidden_feature"


async def test_lesson_continues_through_serve_and_websockets_go_to_serve(stack, http):  # type: ignore[no-untyped-def]
    """A lesson begun through nginx+authz is the lesson serve continues; a lesson
    WebSocket through nginx is held by serve (it gets a deadline)."""
    base, authz, serve = stack
    sid = {"X-Student-Id": "s-continue"}
    r = await fetch(http, base + SUBJECT, sid)
    assert r.status == 200
    await asyncio.sleep(1.1)
    r = await fetch(http, serve.url(SUBJECT), sid)
    assert r.status == 200 and int(r.headers["x-lesson-remaining"]) <= 58
    assert metric(authz, "tutorgate_lessons_started_total") == 1
    assert metric(serve, "tutorgate_lessons_started_total") == 0
    ws_url = base.replace("http://", "ws://") + "/classroom/arts/room/live"
    async with http.ws_connect(ws_url, headers=sid) as ws:
        assert "X-Lesson-Deadline" in ws._response.headers
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "hi"
    assert metric(serve, "tutorgate_decisions_total", decision="allow") == 2


def raw_get(base: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `target` byte for byte (a client library would normalise it)."""
    import socket

    host, port = addr(base).split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
                  .encode("latin-1"))
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_encoded_slashes_nginx_resolves_away_are_refused(stack, upstream):  # type: ignore[no-untyped-def]
    """nginx decodes %2F before it picks a location: /classroom/subject/..%2Fx
    is /classroom/ to nginx (pass-through) but a lesson page to a platform
    that keeps %2F in a segment. Such paths are asked about and refused."""
    base, _, _ = stack
    for target in ("/classroom/subject/..%2Fmath", "/classroom/subject/x/..%2f..%2F",
                   "/classroom/subject/%2e%2e%2fmath", "/api/photo-search%2F..",
                   "/classroom/subject/..%5Cmath", "/api\\photo-search"):
        status, body = await asyncio.to_thread(raw_get, base, target)
        assert status == 400, (target, status, body[:200])
        assert json.loads(body)["rule"] == "bad_path", target
    assert not upstream.seen
    # the query string is not a path; pass-through stays unasked
    status, _ = await asyncio.to_thread(raw_get, base, "/static/x?next=%2Fa%5Cb")
    assert status == 200 and upstream.seen[-1]["path"] == "/static/x?next=%2Fa%5Cb"
