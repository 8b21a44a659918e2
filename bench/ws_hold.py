"""Hold N open lesson WebSockets through one gateway and measure the cut-offs.

    python bench/ws_hold.py [--connections 10000] [--lesson 30] [--redis]

Starts, on loopback only: a WebSocket echo upstream, optionally a
redis-server, and `tutorgate serve` with a policy whose lessons last
`--lesson` seconds. Opens N WebSockets on a lesson route (one student
each), measures the gateway's resident memory before and after (bytes per
connection), then waits for the gateway to cut every one of them at the
lesson limit and prints the lateness of the cut-offs: the close frame's
arrival at the client minus the deadline the gateway stated in the
handshake's `X-Lesson-Deadline` header. The gateway's own
`tutorgate_cut_lateness_seconds` histogram is printed beside it.
Targets (issue #3): p99 lateness under 250 ms, under 50 KiB per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web
from harness import (
    HOST,
    Children,
    exit_on_sigterm,
    free_port,
    gateway_argv,
    gateway_env,
    rss_bytes,
    script_argv,
    start_redis,
    wait_http,
    wait_tcp,
    write_policy,
)

TARGET_LATE_P99 = 0.250
TARGET_BYTES_PER_CONN = 50 * 1024


def serve_upstream(port: int) -> None:
    """A WebSocket echo upstream (run as a child process)."""
    import uvloop

    async def live(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="ok")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", live)
    uvloop.install()
    web.run_app(app, host=HOST, port=port, print=None, access_log=None, backlog=4096)


def raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, n)
    if hard != resource.RLIM_INFINITY and want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def hold(url: str, n: int, lesson: float, concurrency: int,
               ready: asyncio.Future[dict[str, object]],
               measured: asyncio.Future[None]) -> dict[str, object]:
    """Open n WebSockets, report through `ready`, wait for `measured` (the
    caller reads memory meanwhile), then wait for every cut-off."""
    conns: list[tuple[aiohttp.ClientWebSocketResponse, float]] = []
    lateness: list[float] = []
    codes: dict[str, int] = {}
    failures = 0
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        sem = asyncio.Semaphore(concurrency)

        async def open_one(i: int) -> None:
            nonlocal failures
            async with sem:
                sent = time.time()
                try:
                    ws = await http.ws_connect(url, headers={"X-Student-Id": f"bench-{i}"},
                                               autoping=True, heartbeat=None)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    failures += 1
                    return
                # the gateway states the exact cut-off; the send time bounds it otherwise
                deadline = float(ws._response.headers.get("X-Lesson-Deadline", sent + lesson))
                conns.append((ws, deadline))

        t0 = time.time()
        await asyncio.gather(*(open_one(i) for i in range(n)))
        opened_in = time.time() - t0
        opened = {"opened": len(conns), "open_failures": failures,
                  "open_seconds": round(opened_in, 2)}
        ready.set_result(opened)
        await measured

        async def wait_close(ws: aiohttp.ClientWebSocketResponse, deadline: float) -> None:
            msg = await ws.receive(timeout=lesson + 30)
            now = time.time()
            key = f"{msg.type.name}:{msg.data}:{msg.extra}"
            codes[key] = codes.get(key, 0) + 1
            if msg.type == aiohttp.WSMsgType.CLOSE:
                lateness.append(now - deadline)
            await ws.close()

        await asyncio.gather(*(wait_close(ws, s) for ws, s in conns), return_exceptions=True)
    return {**opened, "close_kinds": codes, "lateness": lateness}


def server_lateness(admin: str) -> dict[str, float]:
    text = urllib.request.urlopen(admin + "/metrics", timeout=5).read().decode()
    buckets: list[tuple[float, float]] = []
    count = 0.0
    for line in text.splitlines():
        if line.startswith("tutorgate_cut_lateness_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
        elif line.startswith("tutorgate_cut_lateness_seconds_count"):
            count = float(line.split()[-1])
    p99 = next((le for le, c in buckets if count and c >= 0.99 * count), float("nan"))
    return {"count": count, "p99_bucket_upper_bound": p99}


async def main_async(a: argparse.Namespace) -> int:
    raise_fd_limit(4 * a.connections + 1000)
    with Children() as kids, tempfile.TemporaryDirectory() as tmp:
        up_port, gw_port, admin_port = free_port(), free_port(), free_port()
        upstream = kids.start("ws-upstream", script_argv("ws_hold.py", "--serve-upstream",
                                                          str(up_port)))
        wait_tcp(up_port, upstream)
        redis_url = None
        if a.redis:
            _redis, redis_url = start_redis(kids, "ws-redis")
        policy = Path(tmp) / "policy.yaml"
        write_policy(policy)
        text = policy.read_text()
        text = re.sub(r"max_duration: \S+", f"max_duration: {a.lesson}s", text)
        policy.write_text(text)
        gw = kids.start("ws-gateway", gateway_argv(policy, f"http://{HOST}:{up_port}", gw_port,
                                                   admin_port, redis_url),
                        env={**gateway_env(), "TUTORGATE_UPSTREAM_POOL": str(a.connections + 100)})
        wait_http(f"http://{HOST}:{admin_port}/healthz", gw, want=200)
        rss0 = rss_bytes(gw.pid)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[dict[str, object]] = loop.create_future()
        measured: asyncio.Future[None] = loop.create_future()
        url = f"ws://{HOST}:{gw_port}/classroom/arts/bench/live"
        task = asyncio.create_task(hold(url, a.connections, a.lesson, a.concurrency,
                                        ready, measured))
        info = await ready
        await asyncio.sleep(1.0)
        rss1 = rss_bytes(gw.pid)
        measured.set_result(None)
        result = await task
        late = result.pop("lateness")
        assert isinstance(late, list)
        opened = int(info["opened"])  # type: ignore[call-overload]
        per_conn = (rss1 - rss0) / opened if opened else float("nan")
        server = server_lateness(f"http://{HOST}:{admin_port}")
        report = {
            "connections": a.connections, "store": "redis" if a.redis else "memory",
            "lesson_seconds": a.lesson, **result,
            "gateway_rss_before_mib": round(rss0 / 2**20, 1),
            "gateway_rss_open_mib": round(rss1 / 2**20, 1),
            "bytes_per_connection": round(per_conn),
            "lateness_ms": {
                "p50": round(1000 * percentile(late, 50), 1) if late else None,
                "p99": round(1000 * percentile(late, 99), 1) if late else None,
                "max": round(1000 * max(late), 1) if late else None,
                "mean": round(1000 * statistics.fmean(late), 1) if late else None,
            },
            "server_cut_lateness": server,
        }
    print(json.dumps(report, indent=2))
    p99 = report["lateness_ms"]["p99"]  # type: ignore[index]
    ok_late = p99 is not None and p99 <= TARGET_LATE_P99 * 1000
    ok_mem = per_conn <= TARGET_BYTES_PER_CONN
    print(f"cut-off lateness p99 {p99} ms (target < 250 ms): "
          f"{'PASS' if ok_late else 'MISS'}")
    print(f"memory {per_conn / 1024:.1f} KiB per connection (target < 50 KiB): "
          f"{'PASS' if ok_mem else 'MISS'}")
    return 0 if opened == a.connections else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--lesson", type=int, default=30,
                   help="lesson length (s): long enough to open every connection first")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    p.add_argument("--redis", action="store_true", help="state in a redis-server")
    p.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_upstream:
        serve_upstream(a.serve_upstream)
        return 0
    exit_on_sigterm()
    return asyncio.run(main_async(a))


if __name__ == "__main__":
    sys.exit(main())
