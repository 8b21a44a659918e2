"""Upload memory check: stream a large request body through the gateway.

Starts the upstream (counts and discards body bytes) and the gateway (memory mode
unless --redis) on 127.0.0.1, uploads --size-mb MiB to a pass-through route and to
an allowed lesson route, and samples the gateway's RSS (/proc/PID/status VmRSS,
process and children) meanwhile. The body is generated lazily, 64 KiB at a time.

    .venv/bin/python bench/upload_memory.py [--size-mb 1024] [--max-growth-mb 64]

Exit status 0 when every upload arrived whole and RSS grew by at most
--max-growth-mb, 1 otherwise, 2 when the gateway cannot be started at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field

import aiohttp
import harness
from harness import HOST, Child, Children

MIB = 1024 * 1024
ROUTES = {"pass": "/static/upload", "lesson": "/classroom/arts/upload"}
STUDENT = "bench-upload-student"
SAMPLE_EVERY = 0.02  # seconds


@dataclass
class Upload:
    route: str
    url: str
    size: int
    status: int = 0
    received: int | None = None
    seconds: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def growth(self) -> int:
        return self.rss_peak - self.rss_start


async def lazy_body(size: int, chunk_size: int) -> AsyncIterator[bytes]:
    """``size`` bytes, one ``chunk_size`` block at a time; never more in memory."""
    block = os.urandom(chunk_size)
    remaining = size
    while remaining > 0:
        step = min(remaining, chunk_size)
        yield block if step == chunk_size else block[:step]
        remaining -= step


async def sample_rss(pid: int, upload: Upload, stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = harness.rss_bytes(pid)
        upload.rss_peak = max(upload.rss_peak, rss)
        upload.samples += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


async def upload_once(
    session: aiohttp.ClientSession,
    route: str,
    url: str,
    target: Child,
    args: argparse.Namespace,
) -> Upload:
    size = args.size_mb * MIB
    result = Upload(route=route, url=url, size=size)
    headers = {"X-Student-Id": STUDENT, "Content-Type": "application/octet-stream"}
    if not args.chunked:
        headers["Content-Length"] = str(size)
    # One small request first, so lazy start-up allocations are not counted as growth.
    async with session.get(url, headers={"X-Student-Id": STUDENT}) as warm:
        await warm.read()
        if warm.status != 200:
            result.problems.append(f"warm-up GET -> {warm.status}")
    result.rss_start = result.rss_peak = harness.rss_bytes(target.pid)
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(target.pid, result, stop))
    started = time.perf_counter()
    try:
        async with session.post(
            url, data=lazy_body(size, args.chunk_kb * 1024), headers=headers
        ) as resp:
            result.status = resp.status
            body = await resp.read()
            header = resp.headers.get("X-Received-Bytes")
            result.received = int(header) if header and header.isdigit() else None
            if resp.status != 200:
                result.problems.append(f"POST -> {resp.status}: {body[:300]!r}")
    except (aiohttp.ClientError, TimeoutError) as err:
        result.problems.append(f"upload failed: {type(err).__name__}: {err}")
    finally:
        result.seconds = time.perf_counter() - started
        stop.set()
        await sampler
    result.rss_end = harness.rss_bytes(target.pid)
    if result.status == 200 and result.received != size:
        result.problems.append(f"upstream received {result.received} bytes, sent {size}")
    if result.growth > args.max_growth_mb * MIB:
        result.problems.append(
            f"RSS grew {result.growth / MIB:.1f} MiB > {args.max_growth_mb} MiB allowed"
        )
    if not target.alive():
        result.problems.append(f"{target.name} died:\n{target.log_tail()}")
    return result


def start_target(kids: Children, args: argparse.Namespace, upstream_url: str) -> tuple[Child, str]:
    port = harness.free_port()
    base = f"http://{HOST}:{port}"
    if args.target == "bare":
        bare = kids.start(
            "bare-proxy",
            harness.script_argv("bare_proxy.py", "--port", str(port), "--upstream", upstream_url),
        )
        harness.wait_http(f"{base}/", bare, want=200)
        return bare, base
    policy = harness.RESULTS_DIR / "policy-upload.yaml"
    harness.write_policy(policy)
    redis_url = None
    if args.redis:
        _redis, redis_url = harness.start_redis(kids)
    admin_port = harness.free_port()
    gateway = kids.start(
        "gateway-upload",
        harness.gateway_argv(policy, upstream_url, port, admin_port, redis_url),
        env=harness.gateway_env(),
    )
    harness.wait_http(f"http://{HOST}:{admin_port}/healthz", gateway, want=200, timeout=30)
    return gateway, base


async def run(args: argparse.Namespace) -> int:
    if args.target == "gateway":
        reason = harness.check_tutorgate()
        if reason is not None:
            print(f"gateway unavailable: {reason}", file=sys.stderr)
            return 2
        if args.redis and shutil.which("redis-server") is None:
            print("redis-server not found", file=sys.stderr)
            return 2
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    uploads: list[Upload] = []
    with Children() as kids:
        _, upstream_url = harness.start_upstream(kids)
        target, base = start_target(kids, args, upstream_url)
        mode = "bare proxy" if args.target == "bare" else ("redis" if args.redis else "memory")
        print(
            f"uploading {args.size_mb} MiB ({'chunked' if args.chunked else 'Content-Length'}, "
            f"{args.chunk_kb} KiB chunks) through {target.name} [{mode}], pid {target.pid}",
            flush=True,
        )
        timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for route in routes:
                upload = await upload_once(session, route, base + ROUTES[route], target, args)
                uploads.append(upload)
                report(upload)
    path = harness.RESULTS_DIR / "upload-latest.json"
    path.write_text(
        json.dumps([asdict(u) | {"growth": u.growth} for u in uploads], indent=2) + "\n"
    )
    failed = [u for u in uploads if u.problems]
    print(f"\n{'FAIL' if failed else 'OK'}: results in {path}")
    return 1 if failed else 0


def report(upload: Upload) -> None:
    rate = upload.size / MIB / upload.seconds if upload.seconds > 0 else 0.0
    print(
        f"  {upload.route:<6} {upload.url}\n"
        f"         status {upload.status}, upstream got {upload.received} bytes "
        f"in {upload.seconds:.1f} s ({rate:.0f} MiB/s)\n"
        f"         RSS start {upload.rss_start / MIB:.1f} MiB,"
        f" peak {upload.rss_peak / MIB:.1f} MiB, end {upload.rss_end / MIB:.1f} MiB,"
        f" growth {upload.growth / MIB:.1f} MiB"
        f" ({upload.samples} samples)",
        flush=True,
    )
    for problem in upload.problems:
        print(f"         PROBLEM: {problem}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="MiB per upload (1024)")
    parser.add_argument("--chunk-kb", type=int, default=64, help="KiB per body chunk (64)")
    parser.add_argument("--max-growth-mb", type=int, default=64, help="allowed RSS growth (64)")
    parser.add_argument("--routes", default="pass,lesson", help="comma list of pass,lesson")
    parser.add_argument("--chunked", action="store_true", help="no Content-Length header")
    parser.add_argument("--redis", action="store_true", help="gateway with its own redis")
    parser.add_argument(
        "--target", choices=("gateway", "bare"), default="gateway", help="what to upload through"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per upload (600)")
    args = parser.parse_args(argv)
    if not 1 <= args.size_mb <= 64 * 1024 or not 1 <= args.chunk_kb <= 16 * 1024:
        parser.error("--size-mb must be 1..65536 and --chunk-kb 1..16384")
    if not 0 < args.timeout <= 3600:
        parser.error("--timeout must be in (0, 3600]")
    unknown = {r.strip() for r in args.routes.split(",") if r.strip()} - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.guarded("upload check", lambda: asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
