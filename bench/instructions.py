"""CPU instructions per request of each front process, counted by callgrind.

run.py's requests/s swing by a third between runs on a shared host; the
number of instructions a process executes per request does not (repeat runs
agree within about 1%). So this is the figure to find and check savings by,
and its ratios are what req/s ratios tend to on a quiet machine where the
front process is the bottleneck.

Each front process runs under `valgrind --tool=callgrind` with instrumentation
off; after a warm-up (which also starts every student's lesson) it is
switched on, zeroed, loaded with a fixed number of requests, and dumped:

    .venv/bin/python bench/instructions.py                  # every line, ~5 min
    .venv/bin/python bench/instructions.py --lines bare,gw_lesson --requests 500
    .venv/bin/python bench/instructions.py --lines gw_lesson@/tmp/old/.venv/bin/tutorgate,gw_lesson
    .venv/bin/python bench/instructions.py --lines gw_lesson,authz_lesson --requests 3000

`authz_lesson` is `tutorgate authz` (the decision service an ingress asks)
loaded with `GET /_tutorgate/authz` carrying `X-Forwarded-Uri` of the same
lesson route and the same students as `gw_lesson`: the instructions of one
decision against those of one proxied lesson request.

A line `key@/path/to/tutorgate` runs that gateway build instead of the one
next to this interpreter, in the same run: the way to compare two builds
(each build gets a process, and a Redis, of its own). `--repeats N` counts
every line N times in turn and prints each count, which shows the noise.

The load mirrors run.py's: 1000 students (round-robin here), 50 requests in
flight. Needs `valgrind` (`apt-get install -y valgrind`) and `redis-server`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import harness
from harness import HOST, BenchError, Child, Children

LINE_KEYS = ("bare", "gw_pass", "gw_lesson", "gw_lesson_mem", "authz_lesson")
LABELS = {
    "bare": "bare aiohttp proxy",
    "gw_pass": "gateway pass-through (redis)",
    "gw_lesson": "gateway enforced (redis)",
    "gw_lesson_mem": "gateway enforced (memory)",
    "authz_lesson": "tutorgate authz, lesson decision (redis)",
}
PASS_PATH = "/static/x"
LESSON_PATH = "/classroom/arts/x"
AUTHZ_PATH = "/_tutorgate/authz"
# The decision service reads the target from this header (Traefik's; nginx's
# example sends it too), so authz_lesson decides exactly gw_lesson's route.
HEADERS = {"authz_lesson": {"X-Forwarded-Uri": LESSON_PATH}}
OUT_DIR = harness.RESULTS_DIR / "callgrind"
_TOTALS = re.compile(rb"^(?:totals|summary):\s+(\d+)", re.M)


@dataclass(frozen=True)
class Line:
    """One line of the table: `key`, run by the gateway build `exe` (None:
    the `tutorgate` next to this interpreter, or BENCH_TUTORGATE)."""

    key: str
    exe: Path | None = None

    @classmethod
    def parse(cls, text: str) -> Line:
        key, _, exe = text.strip().partition("@")
        if key not in LINE_KEYS:
            raise BenchError(f"unknown line {key!r}; choose from {','.join(LINE_KEYS)}")
        if exe and key == "bare":
            raise BenchError("bare@...: the bare proxy is not a gateway build")
        return cls(key, Path(exe) if exe else None)

    @property
    def label(self) -> str:
        return LABELS[self.key] + (f" @{self.exe}" if self.exe else "")


@dataclass(frozen=True)
class Front:
    """A process under callgrind and the lines it serves: line -> URL."""

    child: Child
    lines: dict[Line, str]


def valgrind_argv(name: str, argv: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={OUT_DIR}/{name}.%p", *argv]


async def drive(url: str, requests: int, students: int, concurrency: int,
                extra: dict[str, str] | None = None) -> int:
    """GET url `requests` times, `concurrency` at a time, student ids
    round-robin, with the `extra` headers; returns how many answers were not 200."""
    bad = 0
    counter = iter(range(requests))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker() -> None:
            nonlocal bad
            for i in counter:
                sid = f"bench-student-{i % students:05d}"
                async with session.get(url, headers={"X-Student-Id": sid, **(extra or {})}
                                       ) as resp:
                    await resp.read()
                    bad += resp.status != 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return bad


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def count(front: Front, line: Line, args: argparse.Namespace) -> float:
    """Instructions per request of one line."""
    url = front.lines[line]
    pid = front.child.pid
    label = line.label
    extra = HEADERS.get(line.key)
    bad = asyncio.run(drive(url, args.warmup, args.students, args.concurrency, extra))
    if bad:
        raise BenchError(f"{label}: {bad} of {args.warmup} warm-up answers were not 200")
    before = set(OUT_DIR.glob(f"{front.child.name}.{pid}*"))
    control(pid, "--instr=on")
    control(pid, "--zero")
    bad = asyncio.run(drive(url, args.requests, args.students, args.concurrency, extra))
    control(pid, "--dump")
    control(pid, "--instr=off")
    if bad:
        raise BenchError(f"{label}: {bad} of {args.requests} answers were not 200")
    dumps = sorted(set(OUT_DIR.glob(f"{front.child.name}.{pid}*")) - before,
                   key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise BenchError(f"{label}: callgrind wrote no dump")
    found = _TOTALS.search(dumps[-1].read_bytes())
    if found is None:
        raise BenchError(f"{dumps[-1]}: no totals line")
    return int(found.group(1)) / float(args.requests)


def start_fronts(kids: Children, wanted: list[Line], upstream: str) -> list[Front]:
    fronts: list[Front] = []
    policy = harness.RESULTS_DIR / "policy.yaml"
    harness.write_policy(policy)
    for line in wanted:
        if line.key == "bare":
            port = harness.free_port()
            argv = harness.script_argv("bare_proxy.py", "--port", str(port),
                                       "--upstream", upstream)
            child = kids.start("bare", valgrind_argv("bare", argv))
            harness.wait_http(f"http://{HOST}:{port}/", child, want=200, timeout=180)
            fronts.append(Front(child, {line: f"http://{HOST}:{port}{PASS_PATH}"}))
    builds = list(dict.fromkeys(line.exe for line in wanted if line.key != "bare"))
    for n, exe in enumerate(builds):
        for name, keys, redis in (("gw-redis", ("gw_pass", "gw_lesson"), True),
                                  ("gw-memory", ("gw_lesson_mem",), False),
                                  ("authz", ("authz_lesson",), True)):
            lines = [ln for ln in wanted if ln.exe == exe and ln.key in keys]
            if not lines:
                continue
            redis_url = None
            if redis:
                _redis, redis_url = harness.start_redis(kids, f"redis-{name}-{n}")
            port, admin = harness.free_port(), harness.free_port()
            argv = harness.gateway_argv(policy, upstream, port, admin, redis_url, exe)
            if name == "authz":
                argv[1:6] = ["authz", "--policy", str(policy)]  # decisions only: no upstream
            name = f"{name}-{n}"
            child = kids.start(name, valgrind_argv(name, argv), env=harness.gateway_env())
            harness.wait_http(f"http://{HOST}:{admin}/readyz", child, want=200, timeout=300)
            paths = {"gw_pass": PASS_PATH, "gw_lesson": LESSON_PATH,
                     "gw_lesson_mem": LESSON_PATH, "authz_lesson": AUTHZ_PATH}
            fronts.append(Front(child, {ln: f"http://{HOST}:{port}{paths[ln.key]}"
                                        for ln in lines}))
            if name.startswith("authz"):
                # a typo in the route would count "pass" answers (200, no store call)
                got = harness.http_get(f"http://{HOST}:{port}{AUTHZ_PATH}",
                                       {"X-Student-Id": "bench-student-check",
                                        **HEADERS["authz_lesson"]})
                if got.headers.get("x-tutorgate-decision") != "allow":
                    raise BenchError(f"{name}: {LESSON_PATH} answered {got.status} "
                                     f"{got.headers.get('x-tutorgate-decision')}, not allow")
    return fronts


def run(args: argparse.Namespace) -> int:
    wanted = list(dict.fromkeys(Line.parse(t) for t in args.lines.split(",") if t.strip()))
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not on PATH")
    for exe in dict.fromkeys(line.exe for line in wanted if line.key != "bare"):
        problem = harness.check_tutorgate(exe)
        if problem:
            raise BenchError(problem)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[Line, list[float]] = {}
    with Children() as kids:
        _upstream, upstream_url = harness.start_upstream(kids)
        print(f"starting {len(wanted)} line(s) under callgrind (slow) ...", flush=True)
        fronts = start_fronts(kids, wanted, upstream_url)
        # Every front stays up; repeats go round the lines in turn, so a
        # slow spell of the host does not land on one line's counts only.
        for _ in range(args.repeats):
            for front in fronts:
                for line in front.lines:
                    t0 = time.monotonic()
                    # Every count warms up first: that starts (or continues)
                    # every student's lesson, so a count never meets lessons
                    # ended by quiet time while other lines were counted.
                    got = count(front, line, args)
                    results.setdefault(line, []).append(got)
                    print(f"  {line.label}: {got / 1000:.1f}k instructions per request"
                          f" ({time.monotonic() - t0:.0f} s)", flush=True)
    print()
    width = max(32, *(len(line.label) for line in results))
    spread = " counts (k)" if args.repeats > 1 else ""
    print(f"{'line':{width}} {'k instr/req':>12} {'vs bare':>8}{spread}")
    medians = {line: statistics.median(got) for line, got in results.items()}
    base = next((v for line, v in medians.items() if line.key == "bare"), None)
    for line in sorted(medians, key=lambda ln: LINE_KEYS.index(ln.key)):
        ratio = f"{base / medians[line]:.2f}x" if base else "-"
        counts = " ".join(f"{v / 1000:.1f}" for v in results[line]) if spread else ""
        print(f"{line.label:{width}} {medians[line] / 1000:12.1f} {ratio:>8} {counts}".rstrip())
    for line in medians:
        proxied = Line("gw_lesson", line.exe)
        if line.key == "authz_lesson" and proxied in medians:
            build = f" @{line.exe}" if line.exe else ""
            print(f"one decision / one proxied lesson request{build} (authz_lesson / "
                  f"gw_lesson): {medians[line] / medians[proxied]:.2f}")
    if base:
        print("(vs bare: bare's instructions / the line's, the req/s ratio a CPU-bound "
              "front would give)")
    if args.repeats > 1:
        print("(k instr/req: the median of the repeats)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default=",".join(LINE_KEYS),
                        help=f"a subset of {','.join(LINE_KEYS)}; key@/path/to/tutorgate "
                             "runs another gateway build")
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per line")
    parser.add_argument("--warmup", type=int, default=1500,
                        help="uncounted requests first (more than --students)")
    parser.add_argument("--students", type=int, default=1000, help="distinct student ids")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight")
    parser.add_argument("--repeats", type=int, default=1,
                        help="counts per line, taken in turn (the table shows the median)")
    args = parser.parse_args()
    return harness.guarded("instructions", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
