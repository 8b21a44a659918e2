"""Test kit: a real upstream and real gateways on loopback sockets, in-process.

The gateway runs its real aiohttp apps on real TCP ports (AppRunner +
TCPSite); only the process is shared with the test, so tests can reach
into `gw.gateway` for its metrics and store.

Time: `start_gateway(..., manual_clock=True)` gives a memory-store gateway a
`ManualClock`, and `elapse(gw, s)` lets `s` seconds pass on the gateway's
clock: advanced at once on a ManualClock, waited for in real time on any
other (Redis TIME runs a Redis store's lesson clock, and nothing in this
process can move it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import socket
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import WSMsgType, web

from gateway.app import Gateway
from gateway.policy import Policy, parse_policy
from gateway.settings import Settings
from gateway.store.base import StateStore
from gateway.store.memory import MemoryStore
from gateway.timesource import ManualClock

TZ = ZoneInfo("Asia/Shanghai")
SUBJECT = "/classroom/subject/math/1"
ARTS = "/classroom/arts/drawing/1"
FORBIDDEN = "/api/photo-search"


UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def near_local_time(hour: int, minute: int = 0, margin: float = 120.0) -> bool:
    """True within `margin` seconds of HH:MM in the policy zone."""
    n = dt.datetime.now(TZ)
    since = n.hour * 3600 + n.minute * 60 + n.second
    apart = abs(since - (hour * 3600 + minute * 60))
    return min(apart, 86400 - apart) < margin


def near_local_midnight(margin: float = 120.0) -> bool:
    """True near local midnight in the policy zone, where a test about
    "today" could see the day change under it."""
    return near_local_time(0, 0, margin)


def far_curfew() -> tuple[str, str]:
    """A curfew window 12 h from now: never in a test's way."""
    n = dt.datetime.now(TZ)
    return ((n + dt.timedelta(hours=12)).strftime("%H:%M"),
            (n + dt.timedelta(hours=13)).strftime("%H:%M"))


def policy_text(*, max_duration: str = "4s", min_break: str = "2s", extra: str = "",
                curfew: tuple[str, str] | None = None, rest_days: str | None = None,
                routes: str | None = None) -> str:
    start, end = curfew or far_curfew()
    rest = rest_days or "{weekends: false, statutory_holidays: false, vacations: []}"
    routes = routes or textwrap.dedent("""\
          - {prefix: /classroom/subject/, kind: lesson, category: subject}
          - {prefix: /classroom/arts/, kind: lesson, category: non_subject}
          - {prefix: /api/photo-search, kind: forbidden, feature: photo_search}
        """)
    return (f"version: 1\ntimezone: Asia/Shanghai\n"
            f"lesson: {{max_duration: {max_duration}, min_break: {min_break}}}\n"
            f'curfew: {{start: "{start}", end: "{end}"}}\n'
            f"rest_days: {rest}\n{extra}\nroutes:\n" + textwrap.indent(routes, "  "))


def make_policy(**kw: Any) -> Policy:
    return parse_policy(policy_text(**kw), "test-policy.yaml")


# ---------------------------------------------------------------- upstream

@dataclass
class Upstream:
    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    # requests whose body broke off before its end (what a cut-off upload looks like)
    broken: int = 0
    ws_opened: int = 0
    runner: web.AppRunner | None = None


async def _echo(request: web.Request) -> web.StreamResponse:
    up = request.app[UPSTREAM]
    h = hashlib.sha256()
    n = 0
    try:
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
    except Exception:
        up.broken += 1
        raise
    info = {"method": request.method, "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_length": n, "body_sha256": h.hexdigest()}
    up.seen.append(info)
    status = int(request.headers.get("X-Echo-Status", "200"))
    resp = web.json_response(info, status=status, headers={"X-Upstream": "echo"})
    if "X-Echo-Cookie" in request.headers:
        resp.set_cookie("sess", request.headers["X-Echo-Cookie"])
    return resp


async def _ws(request: web.Request) -> web.WebSocketResponse:
    up = request.app[UPSTREAM]
    up.ws_opened += 1
    ws = web.WebSocketResponse(autoping=True, protocols=("chat.v1",))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"bye")
                break
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "X-Upstream": "echo"})
    await resp.prepare(request)
    i = 0
    try:
        while True:
            await resp.write(f"data: tick {i}\n\n".encode())
            i += 1
            await asyncio.sleep(0.1)
    except (ConnectionResetError, RuntimeError):
        pass
    return resp


async def _download(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "0"))
    resp = web.StreamResponse(headers={"X-Upstream": "echo"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    chunk = b"x" * 65536
    sent = 0
    while sent < n:
        part = chunk[: min(len(chunk), n - sent)]
        await resp.write(part)
        sent += len(part)
    await resp.write_eof()
    return resp


async def _dispatch(request: web.Request) -> web.StreamResponse:
    if request.path.endswith("/live") and request.headers.get("Upgrade", "").lower() == "websocket":
        return await _ws(request)
    if request.path.endswith("/stream"):
        return await _sse(request)
    if request.path.endswith("/download"):
        return await _download(request)
    if request.path.endswith("/slow"):
        await asyncio.sleep(float(request.query.get("s", "5")))
    return await _echo(request)


async def start_upstream() -> Upstream:
    # auto_decompress off: the test must see the bytes the gateway sent
    app = web.Application(client_max_size=1024 ** 4, handler_args={"auto_decompress": False})
    port = free_port()
    up = Upstream(f"http://127.0.0.1:{port}")
    app[UPSTREAM] = up
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    up.runner = web.AppRunner(app, access_log=None)
    await up.runner.setup()
    await web.TCPSite(up.runner, "127.0.0.1", port).start()
    return up


# ---------------------------------------------------------------- gateway

@dataclass
class RunningGateway:
    gateway: Gateway
    port: int
    admin_port: int
    runners: list[web.AppRunner]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def stop(self) -> None:
        for r in self.runners:
            await r.cleanup()


async def start_gateway(policy: Policy | str, upstream: str, *, redis_url: str | None = None,
                        store: StateStore | None = None, secret: bytes = b"test-secret",
                        policy_path: str = "", max_body: int | None = None,
                        read_timeout: float | None = 300.0,
                        audit_retention_days: float = 180.0, header_timeout: float = 10.0,
                        keepalive_timeout: float = 75.0,
                        max_connections: int | None = None,
                        manual_clock: bool = False) -> RunningGateway:
    if isinstance(policy, str):
        policy = parse_policy(policy, "test-policy.yaml")
    if manual_clock and store is None and redis_url is None:
        store = MemoryStore(ManualClock())
    port, admin = free_port(), free_port()
    settings = Settings(policy_path=policy_path, upstream=upstream, listen=("127.0.0.1", port),
                        admin_listen=("127.0.0.1", admin), redis_url=redis_url,
                        id_secret=secret, max_body=max_body, read_timeout=read_timeout,
                        grace=2.0, instance=f"test-{port}",
                        audit_retention_days=audit_retention_days,
                        header_timeout=header_timeout, keepalive_timeout=keepalive_timeout)
    gw = Gateway(settings, policy, store=store)
    main, adm = gw.runners(max_connections)
    await main.setup()
    await adm.setup()
    await web.TCPSite(main, "127.0.0.1", port).start()
    await web.TCPSite(adm, "127.0.0.1", admin).start()
    return RunningGateway(gw, port, admin, [main, adm])


async def elapse(gw: RunningGateway, seconds: float) -> None:
    """Let `seconds` pass on the gateway's clock (see the module docstring),
    then let the event loop run what came due."""
    clock = gw.gateway.clock
    if isinstance(clock, ManualClock):
        clock.advance(seconds)
        for _ in range(3):  # the timer's pass, the cut task's, the close's start
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(seconds)


def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for fam in gw.gateway.metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def headers_of(echo: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in echo["headers"]}


async def body_chunks(total: int, size: int = 65536) -> AsyncIterator[bytes]:
    chunk = os.urandom(size)
    sent = 0
    while sent < total:
        part = chunk[: min(size, total - sent)]
        sent += len(part)
        yield part


def loads(b: bytes) -> Any:
    return json.loads(b)


# ---------------------------------------------------------------- a real process

@dataclass
class GatewayProcess:
    """`tutorgate serve` in a process of its own (signals, exit codes)."""

    proc: Any
    port: int
    admin_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def admin(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                        timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


def spawn_gateway(policy_path: str, upstream_url: str, *, secret: str = "x",
                  timeout: float = 15.0, args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
                  stderr: Any = None) -> GatewayProcess:
    """Start `tutorgate serve` and wait until /healthz answers 200; `args`
    go after serve's own, `prefix` runs it under another command (e.g.
    prlimit), `stderr` takes its log (dropped by default)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    port, admin = free_port(), free_port()
    exe = Path(sys.executable).parent / "tutorgate"
    proc = subprocess.Popen([*prefix, str(exe), "serve", "--policy", policy_path, "--upstream",
                             upstream_url, "--listen", f"127.0.0.1:{port}",
                             "--admin-listen", f"127.0.0.1:{admin}", *args],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL if stderr is None else stderr,
                            env={**os.environ, "TUTORGATE_ID_SECRET": secret, **(env or {})})
    gw = GatewayProcess(proc, port, admin)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if gw.admin("/healthz")[0] == 200:
                return gw
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            gw.stop()
            raise RuntimeError(f"gateway did not start (exit {proc.poll()})")
        time.sleep(0.05)
