"""The connection layer (server.py): slow, idle and surplus clients, and
logs that hostile input cannot flood. Real sockets, real gateways."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from kit import metric, policy_text, spawn_gateway

from gateway.server import ConnGuard, ConnLimits, GuardedRunner, RateLimitedLog

HEAD = b"GET /plain/x HTTP/1.1\r\nHost: t\r\n\r\n"


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Read until the server closes; how long that took (fails past `seconds`)."""
    t0 = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), seconds):
        pass
    return time.monotonic() - t0


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """Send `data` a byte at a time, forever repeating its last line."""
    for b in data:
        writer.write(bytes([b]))
        await asyncio.sleep(every)
    while not writer.is_closing():
        writer.write(b"X-Slow: 1\r\n")
        await asyncio.sleep(every)


async def response_head(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return head


async def test_trickled_head_is_closed_at_header_timeout(upstream, gateways):
    """A client trickling header bytes is closed once the head is header_timeout late."""
    gw = await gateways(policy_text(), upstream.url, header_timeout=0.6)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    t = asyncio.ensure_future(trickle(writer, b"GET /plain/x HTTP/1.1\r\n", 0.05))
    try:
        took = await closed_within(reader, 5)
    finally:
        t.cancel()
        writer.close()
    assert 0.5 < took < 2.0
    assert metric(gw, "tutorgate_client_timeouts_total", kind="head") == 1
    assert upstream.seen == []


async def test_keepalive_next_head_has_header_timeout(upstream, gateways):
    """On a keep-alive connection the next request's head is due header_timeout
    after its first byte; requests that come whole keep the connection open."""
    gw = await gateways(policy_text(), upstream.url, header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    # well past the first head's deadline, whole requests are still served
    for _ in range(8):
        writer.write(HEAD)
        assert (await response_head(reader)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.15)
    t = asyncio.ensure_future(trickle(writer, b"GET /plain/y HTTP/1.1\r\n", 0.05))
    try:
        took = await closed_within(reader, 5)
    finally:
        t.cancel()
        writer.close()
    assert 0.4 < took < 1.5
    assert metric(gw, "tutorgate_client_timeouts_total", kind="head") == 1


async def test_idle_keepalive_connection_is_closed(upstream, gateways):
    """A keep-alive connection idle past keepalive_timeout is closed and counted."""
    gw = await gateways(policy_text(), upstream.url, keepalive_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(HEAD)
    assert (await response_head(reader)).startswith(b"HTTP/1.1 200 ")
    took = await closed_within(reader, 5)
    writer.close()
    assert 0.3 < took < 2.0
    assert metric(gw, "tutorgate_client_timeouts_total", kind="idle") == 1


async def test_cap_evicts_waiting_connections_then_refuses(upstream, gateways, http):
    """At max_connections a new client replaces the oldest connection with no
    request under way; when every connection is busy it gets 503 and is counted."""
    gw = await gateways(policy_text(), upstream.url, max_connections=4)
    idle = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(4)]
    for _, w in idle:
        w.write(b"GET /plain/x HTTP/1.1\r\n")  # a head that never ends
    await asyncio.sleep(0.1)
    async with http.get(gw.url("/plain/ok")) as r:
        assert r.status == 200
    assert metric(gw, "tutorgate_connections_refused_total", reason="evicted") >= 1
    assert await asyncio.wait_for(idle[0][0].read(), 2) == b""  # the oldest went first
    for _, w in idle:
        w.close()
    await asyncio.sleep(0.1)
    # four requests under way hold every place
    async with aiohttp.ClientSession() as s:
        slow = [asyncio.ensure_future(s.get(gw.url("/plain/slow?s=1"))) for _ in range(4)]
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        head = await response_head(reader)
        writer.close()
        for f in slow:
            (await f).release()
    assert head.startswith(b"HTTP/1.1 503 ")
    assert metric(gw, "tutorgate_connections_refused_total", reason="limit") == 1


async def test_chunked_and_malformed_requests_get_4xx_without_traceback(
        upstream, gateways, caplog):
    """Malformed HTTP and oversized heads get 4xx, one warning line per kind, no traceback."""
    gw = await gateways(policy_text(), upstream.url)
    bad = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",   # TLS on the HTTP port
        b"GET /x HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /x HTTP/9.9\r\n\r\n",
    ]
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        for raw in bad:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(raw)
            head = await asyncio.wait_for(reader.read(12), 5)
            writer.close()
            assert head[:7] == b"HTTP/1." and head[9:10] == b"4", (raw[:40], head)
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert records and all(r.exc_info is None for r in records)
    assert all(r.levelno == logging.WARNING for r in records)
    assert len(records) <= len(bad)  # each kind at most once a second
    assert metric(gw, "tutorgate_malformed_requests_total") == 3 * len(bad) - 3  # not TLS
    assert upstream.seen == []


async def test_handler_errors_answer_500_and_log_once(caplog):
    """A genuine internal error answers 500; a burst of them logs one line with
    its traceback, not one per request."""
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = web.Application()
    app.router.add_get("/", broken)
    runner = GuardedRunner(app, ConnGuard(ConnLimits()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    caplog.set_level(logging.INFO)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(50):
                async with s.get(f"http://127.0.0.1:{port}/") as r:
                    assert r.status == 500
    finally:
        await runner.cleanup()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_rate_limited_log_counts_what_it_held_back():
    """One line per kind per interval; the next line says how many were held back."""
    now = [0.0]
    logger = logging.getLogger("test.ratelimit")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    rl = RateLimitedLog(logger, 1.0, clock=lambda: now[0])
    for _ in range(100):
        rl.emit(logging.WARNING, "a", "kind a")
        rl.emit(logging.WARNING, "b", "kind b")
        now[0] += 0.005
    now[0] = 2.0
    rl.emit(logging.WARNING, "a", "kind a")
    assert lines == ["kind a", "kind b", "kind a (99 more like it in the last 2s not logged)"]


# ---------------------------------------------------------------- a real process

def _policy(tmp_path: Path) -> str:
    p = tmp_path / "policy.yaml"
    p.write_text(policy_text())
    return str(p)


def _raise_own_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.fail(f"the test needs {n} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def test_open_files_limit_is_raised_and_logged(tmp_path, upstream_process):
    """At start the soft open-files limit is raised to the hard one, and logged."""
    log_path = tmp_path / "gw.log"
    with open(log_path, "wb") as err:
        gw = spawn_gateway(_policy(tmp_path), upstream_process, stderr=err,
                           prefix=("prlimit", "--nofile=256:2048"))
        gw.stop()
    text = log_path.read_text()
    assert "open-files limit 2048 (raised from 256)" in text, text


def test_trickling_sockets_leave_admin_and_clients_served(tmp_path, upstream_process):
    """1,500 sockets trickling heads at a gateway limited to 1,024 open files:
    /healthz, /metrics and a normal client are still answered, and the trickling
    sockets are closed at the head timeout."""
    _raise_own_limit(4096)
    log_path = tmp_path / "gw.log"
    with open(log_path, "wb") as err:
        gw = spawn_gateway(_policy(tmp_path), upstream_process, stderr=err,
                           prefix=("prlimit", "--nofile=1024:1024"),
                           env={"TUTORGATE_HEADER_TIMEOUT": "3"})
    socks: list[socket.socket] = []
    try:
        for _ in range(1500):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", gw.port))
            socks.append(s)
        t0 = time.monotonic()
        # A socket whose connect completes late (the gateway accepts 1,500 in
        # a burst) must start with the request line too, or its first bytes
        # are a malformed request (400) instead of a trickled head.
        started: set[socket.socket] = set()
        while time.monotonic() - t0 < 2.0:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"a" if s in started else b"GET /x HTTP/1.1\r\nX-Slow: ")
                    started.add(s)
            assert gw.admin("/healthz")[0] == 200
            status, text = gw.admin("/metrics")
            assert status == 200 and "tutorgate_client_connections" in text
            import urllib.request
            with urllib.request.urlopen(gw.url("/plain/ok"), timeout=3) as r:
                assert r.status == 200
            time.sleep(0.2)
        # Past the 3 s head timeout. On a loaded machine the last sockets of the
        # accept queue are taken a little later: wait for them (10 s at most).
        deadline = time.monotonic() + 12.5
        while True:
            time.sleep(0.5)
            _, text = gw.admin("/metrics")
            values = _connection_values(text)
            timed_out = values['tutorgate_client_timeouts_total{kind="head"}']
            shed = sum(v for k, v in values.items()
                       if k.startswith("tutorgate_connections_refused"))
            if timed_out + shed >= 1500 - 5 or time.monotonic() > deadline:
                break
    finally:
        for s in socks:
            s.close()
        gw.stop()
    assert timed_out > 0 and timed_out + shed >= 1500 - 5, values
    assert values["tutorgate_client_connections"] < 50
    log = log_path.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-2000:]


def test_malformed_flood_gives_bounded_log(tmp_path, upstream_process):
    """2,000 malformed requests to `tutorgate serve`: every one gets 4xx, and
    the log holds a handful of one-line warnings and no traceback."""
    log_path = tmp_path / "gw.log"
    with open(log_path, "wb") as err:
        gw = spawn_gateway(_policy(tmp_path), upstream_process, stderr=err)
    start_lines = len(log_path.read_text().splitlines())
    kinds = [b"GET /x HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
             b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
             b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
             b"\x00\x01garbage\r\n\r\n"]
    statuses: dict[bytes, int] = {}
    try:
        for i in range(2000):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
                s.sendall(kinds[i % len(kinds)])
                head = s.recv(12)
            statuses[head[9:12]] = statuses.get(head[9:12], 0) + 1
    finally:
        gw.stop()
    lines = log_path.read_text().splitlines()[start_lines:]
    assert all(code.startswith(b"4") for code in statuses), statuses
    assert sum(statuses.values()) == 2000
    assert not any("Traceback" in line for line in lines), lines[:20]
    flood = [ln for ln in lines if "malformed request" in ln]
    assert 1 <= len(flood) <= 4 * 30, len(flood)  # a line a second per kind at most
    assert len(lines) < 200, lines[:20]


@pytest.mark.parametrize(("name", "value"), [
    ("TUTORGATE_HEADER_TIMEOUT", "soon"), ("TUTORGATE_HEADER_TIMEOUT", "0"),
    ("TUTORGATE_KEEPALIVE_TIMEOUT", "-5"), ("TUTORGATE_MAX_CONNECTIONS", "many")])
def test_bad_connection_settings_are_refused(tmp_path, monkeypatch, capsys, name, value):
    """A connection setting that is not a positive number stops serve with exit 2 and its name."""
    from gateway import cli
    monkeypatch.setenv(name, value)
    rc = cli.main(["serve", "--policy", _policy(tmp_path), "--upstream", "http://127.0.0.1:1"])
    assert rc == 2
    assert name in capsys.readouterr().err


def _connection_values(text: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(("tutorgate_client", "tutorgate_connections_refused"))}
