"""CPU instructions per request of each front process, counted by callgrind.

run.py's requests/s swing by a third between runs on a shared host; the
number of instructions a process executes per request does not (repeat runs
agree within about 1%). So this is the figure to find and check savings by,
and its ratios are what req/s ratios tend to on a quiet machine where the
front process is the bottleneck.

Each front process runs under `valgrind --tool=callgrind` with instrumentation
off; after a warm-up (which also starts every student's lesson) it is
switched on, zeroed, loaded with a fixed number of requests, and dumped:

    .venv/bin/python bench/instructions.py                  # ~4 min
    .venv/bin/python bench/instructions.py --lines bare,gw_lesson --requests 500

The load mirrors run.py's: 1000 students (round-robin here), 50 requests in
flight. Needs `valgrind` (`apt-get install -y valgrind`) and `redis-server`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import harness
from harness import HOST, BenchError, Child, Children

LINE_KEYS = ("bare", "gw_pass", "gw_lesson", "gw_lesson_mem")
LABELS = {
    "bare": "bare aiohttp proxy",
    "gw_pass": "gateway pass-through (redis)",
    "gw_lesson": "gateway enforced (redis)",
    "gw_lesson_mem": "gateway enforced (memory)",
}
PASS_PATH = "/static/x"
LESSON_PATH = "/classroom/arts/x"
OUT_DIR = harness.RESULTS_DIR / "callgrind"
_TOTALS = re.compile(rb"^(?:totals|summary):\s+(\d+)", re.M)


@dataclass(frozen=True)
class Front:
    """A process under callgrind and the lines it serves: key -> URL."""

    child: Child
    lines: dict[str, str]


def valgrind_argv(name: str, argv: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={OUT_DIR}/{name}.%p", *argv]


async def drive(url: str, requests: int, students: int, concurrency: int) -> int:
    """GET url `requests` times, `concurrency` at a time, student ids
    round-robin; returns how many answers were not 200."""
    bad = 0
    counter = iter(range(requests))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker() -> None:
            nonlocal bad
            for i in counter:
                sid = f"bench-student-{i % students:05d}"
                async with session.get(url, headers={"X-Student-Id": sid}) as resp:
                    await resp.read()
                    bad += resp.status != 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return bad


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def count(front: Front, key: str, args: argparse.Namespace) -> float:
    """Instructions per request of one line."""
    url = front.lines[key]
    pid = front.child.pid
    bad = asyncio.run(drive(url, args.warmup, args.students, args.concurrency))
    if bad:
        raise BenchError(f"{LABELS[key]}: {bad} of {args.warmup} warm-up answers were not 200")
    before = set(OUT_DIR.glob(f"{front.child.name}.{pid}*"))
    control(pid, "--instr=on")
    control(pid, "--zero")
    bad = asyncio.run(drive(url, args.requests, args.students, args.concurrency))
    control(pid, "--dump")
    control(pid, "--instr=off")
    if bad:
        raise BenchError(f"{LABELS[key]}: {bad} of {args.requests} answers were not 200")
    dumps = sorted(set(OUT_DIR.glob(f"{front.child.name}.{pid}*")) - before,
                   key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise BenchError(f"{LABELS[key]}: callgrind wrote no dump")
    found = _TOTALS.search(dumps[-1].read_bytes())
    if found is None:
        raise BenchError(f"{dumps[-1]}: no totals line")
    return int(found.group(1)) / args.requests


def start_fronts(kids: Children, wanted: list[str], upstream: str) -> list[Front]:
    fronts: list[Front] = []
    policy = harness.RESULTS_DIR / "policy.yaml"
    harness.write_policy(policy)
    if "bare" in wanted:
        port = harness.free_port()
        argv = harness.script_argv("bare_proxy.py", "--port", str(port), "--upstream", upstream)
        child = kids.start("bare", valgrind_argv("bare", argv))
        harness.wait_http(f"http://{HOST}:{port}/", child, want=200, timeout=180)
        fronts.append(Front(child, {"bare": f"http://{HOST}:{port}{PASS_PATH}"}))
    for name, keys, redis in (("gw-redis", ("gw_pass", "gw_lesson"), True),
                              ("gw-memory", ("gw_lesson_mem",), False)):
        keys = tuple(k for k in keys if k in wanted)
        if not keys:
            continue
        redis_url = None
        if redis:
            _redis, redis_url = harness.start_redis(kids)
        port, admin = harness.free_port(), harness.free_port()
        argv = harness.gateway_argv(policy, upstream, port, admin, redis_url)
        child = kids.start(name, valgrind_argv(name, argv), env=harness.gateway_env())
        harness.wait_http(f"http://{HOST}:{admin}/readyz", child, want=200, timeout=300)
        paths = {"gw_pass": PASS_PATH, "gw_lesson": LESSON_PATH, "gw_lesson_mem": LESSON_PATH}
        fronts.append(Front(child, {k: f"http://{HOST}:{port}{paths[k]}" for k in keys}))
    return fronts


def run(args: argparse.Namespace) -> int:
    wanted = [k.strip() for k in args.lines.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in LINE_KEYS]
    if unknown:
        raise BenchError(f"unknown line(s) {unknown}; choose from {','.join(LINE_KEYS)}")
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not on PATH")
    problem = harness.check_tutorgate()
    if problem:
        raise BenchError(problem)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    with Children() as kids:
        _upstream, upstream_url = harness.start_upstream(kids)
        print(f"starting {len(wanted)} line(s) under callgrind (slow) ...", flush=True)
        for front in start_fronts(kids, wanted, upstream_url):
            for key in front.lines:
                t0 = time.monotonic()
                results[key] = count(front, key, args)
                print(f"  {LABELS[key]}: {results[key] / 1000:.0f}k instructions per request"
                      f" ({time.monotonic() - t0:.0f} s)", flush=True)
            kids.stop(front.child)
    print()
    print(f"{'line':32} {'k instr/req':>12} {'vs bare':>8}")
    base = results.get("bare")
    for key in LINE_KEYS:
        if key in results:
            ratio = f"{base / results[key]:.2f}x" if base else "-"
            print(f"{LABELS[key]:32} {results[key] / 1000:12.0f} {ratio:>8}")
    if base:
        print("(vs bare: bare's instructions / the line's, the req/s ratio a CPU-bound "
              "front would give)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default=",".join(LINE_KEYS),
                        help=f"a subset of {','.join(LINE_KEYS)}")
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per line")
    parser.add_argument("--warmup", type=int, default=1500,
                        help="uncounted requests first (more than --students)")
    parser.add_argument("--students", type=int, default=1000, help="distinct student ids")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight")
    args = parser.parse_args()
    return harness.guarded("instructions", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
