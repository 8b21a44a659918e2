"""Hostile input through a running gateway: paths that try to walk around a
route, absolute-form targets, and identities of any bytes or sent twice.

Each path attack goes through a real gateway to a real upstream (aiohttp,
and nginx in a process of its own); whatever reaches the upstream must be,
as the upstream reads it, a path no route enforces (the requests carry no
identity, so anything a route enforces is refused)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kit import free_port, metric, policy_text

PREFIXES = ("/classroom/subject/", "/classroom/arts/", "/api/photo-search")

# (raw target, status through the gateway without identity; None = any 2xx
# as long as what the upstream reads is unenforced)
ATTACKS: list[tuple[str, int | None]] = [
    ("/classroom/subject/.", 401),
    ("/classroom/subject/math/..", 401),
    ("/classroom/subject/./math", 401),
    ("//classroom//subject/math", 401),
    ("/x/../classroom/subject/math", 401),
    ("/classroom/%73ubject/math", 401),
    ("/classroom/subject;x=1/math", 401),
    ("/classroom/subject/%2e", 401),
    ("/classroom/subject/math/%2E%2e", 401),
    ("/x/..;/classroom/subject/math", 400),
    ("/classroom/subject/..;", 400),
    ("/classroom/subject%3Bx/math", 401),
    ("/api/photo-search;x=1", 403),
    ("/api/photo-search/.", 403),
    ("/api/%70hoto-search", 403),
    ("/x/..;/api/photo-search", 400),
    ("/api/photo-search/..", None),
    ("/api/photo-search/%2e%2e", None),
    ("/api/photo-search/%2e%2e/", None),
    ("/classroom/subject%2Fmath", 400),
    ("/classroom/subject%2fmath", 400),
    ("/classroom\\subject/math", 400),
    ("/api%5Cphoto-search", 400),
    ("/other/%00", 400),
    ("/other/%zz", 400),
    ("/other/%", 400),
    ("/other/%252e%252e/api/photo-search", 400),
    ("/other/a#b", 400),
]


def readings(served: str) -> list[str]:
    """How upstreams may read the path they served: as is, or Tomcat-style
    with `;parameters` cut off every segment."""
    tomcat = "/".join(seg.split(";", 1)[0] for seg in served.split("/"))
    return [served, tomcat]


def enforced(path: str, fold: bool = False) -> bool:
    p = path.lower() if fold else path
    return any(p.startswith(x) for x in PREFIXES)


async def raw_request(port: int, target: str | bytes, headers: bytes = b"",
                      method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
    """One request sent byte for byte (no client normalises the path)."""
    t = target.encode("latin-1") if isinstance(target, str) else target
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(method + b" " + t + b" HTTP/1.1\r\nHost: gw.test\r\n" + headers
                 + b"Connection: close\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), hdrs, body


# ---------------------------------------------------------------- upstreams

async def start_reader_upstream() -> tuple[str, web.AppRunner, list[dict[str, Any]]]:
    """An aiohttp upstream answering with its own reading of the path."""
    seen: list[dict[str, Any]] = []

    async def served(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            seen.append({"ws": True, "path": request.path, "raw": request.raw_path})
            await ws.close()
            return ws
        info = {"path": request.path, "raw": request.raw_path,
                "host": request.headers.get("Host")}
        seen.append(info)
        return web.json_response(info)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", served)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner, seen


@pytest.fixture
async def reader_upstream():  # type: ignore[no-untyped-def]
    url, runner, seen = await start_reader_upstream()
    yield url, seen
    await runner.cleanup()


@pytest.fixture
def nginx_upstream(tmp_path: Path):  # type: ignore[no-untyped-def]
    """nginx on a free port answering with `$uri`, its reading of the path."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed (scripts/test installs it)")
    port = free_port()
    for d in ("logs", "tmp"):
        (tmp_path / d).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {tmp_path}/logs/error.log warn;
pid {tmp_path}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}/tmp/body;
  proxy_temp_path {tmp_path}/tmp/proxy;
  fastcgi_temp_path {tmp_path}/tmp/fastcgi;
  uwsgi_temp_path {tmp_path}/tmp/uwsgi;
  scgi_temp_path {tmp_path}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type text/plain; return 200 "$uri"; }}
  }}
}}
""")
    proc = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(conf),
                             "-g", "daemon off;"], stderr=subprocess.PIPE)
    import socket
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                proc.kill()
                pytest.fail(f"nginx did not start: {err}")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


# ---------------------------------------------------------------- paths

@pytest.mark.parametrize(("target", "status"), ATTACKS, ids=[a for a, _ in ATTACKS])
async def test_attack_paths_behind_aiohttp(reader_upstream, gateways, target, status):
    """An attack path is refused, or enforced like the route aiohttp serves it as."""
    url, seen = reader_upstream
    gw = await gateways(policy_text(), url)
    got, _, body = await raw_request(gw.port, target)
    if status is not None:
        assert got == status, body
    if got == 200:
        served = json.loads(body)["path"]
        assert not any(enforced(r) for r in readings(served)), served
    else:
        assert not seen, seen
        if got == 400:
            assert json.loads(body)["rule"] == "bad_path"


@pytest.mark.parametrize(("target", "status"), ATTACKS, ids=[a for a, _ in ATTACKS])
async def test_attack_paths_behind_nginx(nginx_upstream, gateways, target, status):
    """An attack path is refused, or enforced like the route nginx serves it as."""
    gw = await gateways(policy_text(), nginx_upstream)
    got, _, body = await raw_request(gw.port, target)
    if status is not None:
        assert got == status, body
    if got == 200:
        served = body.decode()
        assert not any(enforced(r) for r in readings(served)), served


async def test_dotted_lesson_path_goes_upstream_as_matched(reader_upstream, gateways):
    """An identified student's /classroom/subject/. is a lesson, and the
    upstream receives the path that was matched: /classroom/subject/."""
    url, seen = reader_upstream
    gw = await gateways(policy_text(), url)
    got, hdrs, body = await raw_request(gw.port, "/classroom/subject/./math/../?q=/..%2F",
                                        b"X-Student-Id: hostile-1\r\n")
    assert got == 200, body
    assert "x-lesson-remaining" in hdrs
    assert seen[-1]["raw"] == "/classroom/subject/?q=/..%2F"


async def test_query_string_goes_upstream_as_it_came(reader_upstream, gateways):
    """The query is not a path: encoded slashes and dots in it pass unchanged."""
    url, seen = reader_upstream
    gw = await gateways(policy_text(), url)
    got, _, _ = await raw_request(gw.port, "/other//x/?a=%2F&b=/../c&d=%5c;e")
    assert got == 200
    assert seen[-1]["raw"] == "/other/x/?a=%2F&b=/../c&d=%5c;e"


async def test_path_parameters_go_upstream(reader_upstream, gateways):
    """`;parameters` stay in the forwarded path of a pass-through route."""
    url, seen = reader_upstream
    gw = await gateways(policy_text(), url)
    got, _, _ = await raw_request(gw.port, "/other;jsessionid=1/x")
    assert got == 200
    assert seen[-1]["raw"] == "/other;jsessionid=1/x"


async def test_bad_path_is_counted_without_route(reader_upstream, gateways):
    """bad_path on a pass-through path counts as a denial of category none."""
    url, _ = reader_upstream
    gw = await gateways(policy_text(), url)
    before = metric(gw, "tutorgate_decisions_total", decision="deny", rule="bad_path",
                    category="none")
    got, hdrs, body = await raw_request(gw.port, "/other%2Fx", b"Accept: text/html\r\n")
    assert got == 400
    assert hdrs["content-type"].startswith("text/html")
    assert b"bad_path" in body
    assert metric(gw, "tutorgate_decisions_total", decision="deny", rule="bad_path",
                  category="none") == before + 1


async def test_case_insensitive_paths(reader_upstream, gateways):
    """paths: {case_sensitive: false} enforces /API/Photo-Search and
    /Classroom/Subject/; by default they pass as other paths."""
    url, _ = reader_upstream
    gw = await gateways(policy_text(), url)
    assert (await raw_request(gw.port, "/API/Photo-Search"))[0] == 200
    gw = await gateways(policy_text(extra="paths: {case_sensitive: false}"), url)
    assert (await raw_request(gw.port, "/API/Photo-Search"))[0] == 403
    assert (await raw_request(gw.port, "/Classroom/SUBJECT/./math"))[0] == 401
    assert (await raw_request(gw.port, "/api/photo-search"))[0] == 403
    got, _, body = await raw_request(gw.port, "/Other")
    assert got == 200 and not enforced(json.loads(body)["path"], fold=True)


# ---------------------------------------------------------------- absolute form

async def test_absolute_form_is_decided_by_its_path(reader_upstream, gateways):
    """GET http://host/x is decided by /x and forwarded as /x to the configured
    upstream, whatever host or scheme the target names."""
    url, seen = reader_upstream
    gw = await gateways(policy_text(), url)
    got, _, _ = await raw_request(gw.port, "http://evil.example/classroom/subject/math")
    assert got == 401
    got, _, _ = await raw_request(gw.port, "http://evil.example/api/photo-search")
    assert got == 403
    got, _, body = await raw_request(gw.port, "http://evil.example:81/other/./x?q=1")
    assert got == 200, body
    assert seen[-1]["raw"] == "/other/x?q=1"
    assert seen[-1]["host"] == url.removeprefix("http://")
    got, _, body = await raw_request(gw.port, "evil://127.0.0.2:1/x")
    assert got == 200, body
    assert seen[-1]["raw"] == "/x"


# ---------------------------------------------------------------- WebSocket

WS_HEAD = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


async def test_websocket_paths_are_canonical(reader_upstream, gateways):
    """A WebSocket upgrade is matched and forwarded on the canonical path too."""
    url, seen = reader_upstream
    gw = await gateways(policy_text(), url)
    got, _, _ = await raw_request(gw.port, "/classroom/subject/.", WS_HEAD)
    assert got == 401
    got, _, _ = await raw_request(gw.port, "/classroom/subject%2Flive", WS_HEAD)
    assert got == 400
    got, _, _ = await raw_request(gw.port, "/other/x/../live", WS_HEAD)
    assert got == 101
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen[-1] == {"ws": True, "path": "/other/live", "raw": "/other/live"}


# ---------------------------------------------------------------- identity

JWT_POLICY = ("identity: {source: jwt, jwt: {algorithm: HS256, key_env: HOSTILE_JWT_KEY, "
              "cookie: session}}")


@pytest.mark.parametrize("path", ["/classroom/subject/math", "/_tutorgate/status"])
@pytest.mark.parametrize("head", [
    b"X-Student-Id: s-1\r\nX-Student-Grade: 5\r\nX-Student-Grade: preschool\r\n",
    b"X-Student-Id: s-1\r\nX-Student-Id: s-2\r\n",
    b"X-Student-Id: s-1\r\nX-Student-Region: 650000\r\nx-student-region: 110000\r\n",
    b"X-Student-Id: \xe5\xad\xa6\xff\r\n",
    b"X-Student-Id: s-1\r\nX-Student-Grade: \xff5\r\n",
], ids=["grade-twice", "id-twice", "region-twice", "id-non-utf8", "grade-non-utf8"])
async def test_bad_identity_headers(reader_upstream, gateways, caplog, path, head):
    """Identity headers sent twice, or with bytes >= 0x80, are bad_identity (400)
    on lessons and on the status endpoint, and nothing reaches the upstream."""
    url, seen = reader_upstream
    gw = await gateways(policy_text(), url)
    with caplog.at_level(logging.ERROR):
        got, _, body = await raw_request(gw.port, path, head)
    assert got == 400, body
    assert json.loads(body)["rule"] == "bad_identity"
    assert not seen
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("path", ["/classroom/subject/math", "/_tutorgate/status"])
@pytest.mark.parametrize("head", [
    b"Authorization: Bearer \xff\xfe.abc.def\r\n",
    b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.\xe5\xad\xa6.x\r\n",
    b"Cookie: session=\xe5\xad\xa6\xff\r\n",
    b"Cookie: session=abc\xff.def.ghi\r\n",
], ids=["bearer-ff", "bearer-utf8", "cookie-utf8", "cookie-ff"])
async def test_non_ascii_tokens_are_no_identity(reader_upstream, gateways, caplog,
                                                monkeypatch, path, head):
    """A bearer token or session cookie with non-ASCII bytes proves no identity:
    401 identity_required, never a 500 or a traceback."""
    monkeypatch.setenv("HOSTILE_JWT_KEY", "k" * 32)
    url, seen = reader_upstream
    gw = await gateways(policy_text(extra=JWT_POLICY), url)
    with caplog.at_level(logging.ERROR):
        got, _, body = await raw_request(gw.port, path, head)
    assert got == 401, body
    assert json.loads(body)["rule"] == "identity_required"
    assert not seen
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_jwt_authorization_twice_is_bad_identity(reader_upstream, gateways, monkeypatch):
    """Two Authorization headers: the gateway would check one and the
    upstream might read the other, so the request is bad_identity."""
    import jwt as pyjwt

    monkeypatch.setenv("HOSTILE_JWT_KEY", "k" * 32)
    url, seen = reader_upstream
    gw = await gateways(policy_text(extra=JWT_POLICY), url)
    tok = pyjwt.encode({"sub": "s-1", "exp": int(time.time()) + 60}, "k" * 32,
                       algorithm="HS256").encode()
    got, _, _ = await raw_request(gw.port, "/classroom/subject/math",
                                  b"Authorization: Bearer " + tok + b"\r\n")
    assert got == 200
    got, _, body = await raw_request(gw.port, "/classroom/subject/math",
                                     b"Authorization: Bearer " + tok + b"\r\n"
                                     b"Authorization: Bearer x.y.z\r\n")
    assert got == 400
    assert json.loads(body)["rule"] == "bad_identity"
    assert len(seen) == 1  # the first request only
