"""Throughput benchmark: direct upstream, a bare aiohttp proxy, and the gateway.

Starts every server itself on 127.0.0.1 (free ports), loads each line in turn with
the same wrk settings, prints a table and writes bench/results/latest.json.

    .venv/bin/python bench/run.py [--duration 4] [--connections 50] [--quick] [--rounds 10]

Figures, not a test: nothing here fails on a slow machine. Ratios are only
meaningful between lines of one run (wrk shares the machine with the servers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import aiohttp
import harness
from harness import HOST, BenchError, Child, Children

LINE_KEYS = ("direct", "bare", "gw_pass", "gw_lesson", "gw_lesson_cluster", "gw_lesson_w2",
             "gw_pass_mem", "gw_lesson_mem", "nginx", "nginx_authz", "nginx_pass")
LABELS = {
    "direct": "direct upstream",
    "bare": "bare aiohttp proxy",
    "gw_pass": "gateway pass-through (redis)",
    "gw_lesson": "gateway enforced (redis)",
    "gw_lesson_cluster": "gateway enforced (cluster)",
    "gw_lesson_w2": "gateway enforced, 2 workers",
    "gw_pass_mem": "gateway pass-through (memory)",
    "gw_lesson_mem": "gateway enforced (memory)",
    "nginx": "nginx alone",
    "nginx_authz": "nginx + tutorgate authz, lesson",
    "nginx_pass": "nginx example, pass-through",
}
# The decision service (issue 14): (line, baseline) -> the issue's target ratio.
PAIR_TARGETS = {("nginx_authz", "nginx"): 0.35, ("nginx_authz", "gw_lesson"): 1.5,
                ("nginx_pass", "nginx"): 0.95}
# Compared round by round, no target (issue 12: CPU per enforced request on one
# server and on a 3-master cluster, same run).
PAIRS = (("gw_lesson_cluster", "gw_lesson"),)
NGINX_ALONE = """upstream app {{ server {app}; keepalive 64; }}
server {{
    listen {port};
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
}}
"""
RATIO_ORDER = ("gw_lesson", "gw_lesson_cluster", "gw_lesson_w2", "gw_pass", "gw_lesson_mem",
               "gw_pass_mem", "direct")
TARGETS = {"gw_lesson": 0.80, "gw_pass": 0.95}  # the issue's: req/s of the line / bare proxy
PASS_PATH = "/static/x"  # no policy route matches it
LESSON_PATH = "/classroom/arts/x"  # a lesson route (non_subject)
LUA_SCRIPT = harness.BENCH_DIR / "students.lua"
PREFLIGHT_STUDENT = "bench-preflight"
STUDENT_PREFIX = "bench-student-"  # students.lua's default BENCH_STUDENT_PREFIX


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    connections: int
    threads: int
    students: int
    rounds: int


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


@dataclass
class Line:
    key: str
    label: str
    url: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    front_cpu_us: float | None  # proxy/gateway (the upstream itself, for "direct")
    upstream_cpu_us: float | None
    redis_cpu_us: float | None
    warnings: list[str] = field(default_factory=list)
    rounds: int = 1
    wrk_output: str = ""


@dataclass(frozen=True)
class Target:
    """One line to load: where, and which processes to charge CPU time to."""

    key: str
    url: str
    front: Child
    redis: Child | None = None
    problems: tuple[str, ...] = ()  # found by the preflight request
    more_redis: tuple[Child, ...] = ()  # a cluster's other nodes, charged to "redis" too


# --------------------------------------------------------------------------- wrk

_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if not match:
        raise BenchError(f"wrk output has no {percentile}% latency:\n{text}")
    return float(match.group(1)) * _TO_MS[match.group(2)]


def parse_wrk(text: str) -> WrkResult:
    total = re.search(r"^\s*(\d+) requests in ", text, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if not total or not rps:
        raise BenchError(f"cannot read wrk output:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return WrkResult(
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(text, "50"),
        p99_ms=_latency_ms(text, "99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def wrk(url: str, settings: Settings, seconds: int) -> str:
    argv = ["wrk", f"-t{settings.threads}", f"-c{settings.connections}", f"-d{seconds}s",
            "--latency", "-s", str(LUA_SCRIPT), url]  # fmt: skip
    env = dict(os.environ, BENCH_STUDENTS=str(settings.students))
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 30,
        check=False,
        preexec_fn=harness.die_with_parent,  # the parent starts children from one thread
    )
    if done.returncode != 0:
        raise BenchError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


# --------------------------------------------------------------------------- one line


def measure(target: Target, settings: Settings, upstream: Child) -> Line:
    """Warm up, then load the target once and charge CPU time to the processes involved."""
    print(f"  {LABELS[target.key]}: {target.url}", flush=True)
    if settings.warmup > 0:
        wrk(target.url, settings, settings.warmup)
    watched = {"front": target.front, "upstream": upstream}
    if target.redis is not None:
        watched["redis"] = target.redis
    for index, node in enumerate(target.more_redis):
        watched[f"redis{index}"] = node

    def cpu() -> dict[str, float]:
        seconds = {name: harness.cpu_seconds(child.pid) for name, child in watched.items()}
        seconds["redis"] = sum(v for k, v in seconds.items() if k.startswith("redis"))
        return seconds

    before = cpu()
    output = wrk(target.url, settings, settings.duration)
    after = cpu()
    result = parse_wrk(output)

    def per_request(name: str) -> float | None:
        if name not in watched or result.requests == 0:
            return None
        return (after[name] - before[name]) * 1e6 / result.requests

    line = Line(
        key=target.key,
        label=LABELS[target.key],
        url=target.url,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        requests=result.requests,
        non_2xx=result.non_2xx,
        socket_errors=result.socket_errors,
        front_cpu_us=per_request("front"),
        upstream_cpu_us=None if target.front is upstream else per_request("upstream"),
        redis_cpu_us=per_request("redis"),
        warnings=list(target.problems),
        wrk_output=output,
    )
    if result.non_2xx:
        share = 100.0 * result.non_2xx / max(result.requests, 1)
        what = (
            "INVALID enforced run: requests were not allowed"
            if target.key in ("gw_lesson", "gw_lesson_cluster", "gw_lesson_w2", "gw_lesson_mem",
                              "nginx_authz")
            else "errors from the proxy or the upstream"
        )
        line.warnings.append(
            f"{result.non_2xx} responses >= 400 ({share:.1f}%): {what}; "
            f"sample answers now: {sample_answers(target.url, settings.students)}"
        )
    if result.socket_errors:
        line.warnings.append(f"{result.socket_errors} socket errors (connect/read/write/timeout)")
    if not target.front.alive():
        line.warnings.append(f"{target.front.name} died during the run:\n{target.front.log_tail()}")
    return line


def combine(rounds: Sequence[Line]) -> Line:
    """One line from several rounds: medians of the figures, sums of the errors."""
    if len(rounds) == 1:
        return rounds[0]

    def median(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    warnings: list[str] = []
    for line in rounds:
        warnings.extend(w for w in line.warnings if w not in warnings)
    return replace(
        rounds[0],
        rps=statistics.median(line.rps for line in rounds),
        p50_ms=statistics.median(line.p50_ms for line in rounds),
        p99_ms=statistics.median(line.p99_ms for line in rounds),
        requests=sum(line.requests for line in rounds),
        non_2xx=sum(line.non_2xx for line in rounds),
        socket_errors=sum(line.socket_errors for line in rounds),
        front_cpu_us=median([line.front_cpu_us for line in rounds]),
        upstream_cpu_us=median([line.upstream_cpu_us for line in rounds]),
        redis_cpu_us=median([line.redis_cpu_us for line in rounds]),
        warnings=warnings,
        rounds=len(rounds),
        wrk_output="",
    )


def sample_answers(url: str, students: int, count: int = 3) -> str:
    """What a few students of the load set get now: status and the start of the body."""
    answers = []
    for index in range(1, min(count, students) + 1):
        student = f"{STUDENT_PREFIX}{index:05d}"  # as students.lua names them
        try:
            answer = harness.http_get(url, headers={"X-Student-Id": student})
        except OSError as err:
            answers.append(f"({type(err).__name__})")
            continue
        answers.append(f"{answer.status} {answer.body[:120]!r}")
    return "; ".join(answers)


def preflight(url: str, expect_lesson: bool) -> tuple[str, ...]:
    """One request before loading a gateway line: is it allowed, and enforced or not?"""
    answer = harness.http_get(url, headers={"X-Student-Id": PREFLIGHT_STUDENT})
    problems = []
    if answer.status != 200:
        problems.append(f"preflight {url} -> {answer.status}: {answer.body[:300]!r}")
    has_remaining = "x-lesson-remaining" in answer.headers
    if expect_lesson and not has_remaining:
        problems.append(f"preflight {url}: no X-Lesson-Remaining header (route not enforced?)")
    if not expect_lesson and has_remaining:
        problems.append(f"preflight {url}: X-Lesson-Remaining on a pass-through route")
    return tuple(problems)


def decisions(admin_url: str) -> list[str]:
    """The gateway's non-zero tutorgate_decisions_total samples, for the record."""
    try:
        text = harness.http_get(f"{admin_url}/metrics").body.decode(errors="replace")
    except OSError as err:
        return [f"(metrics unavailable: {err})"]
    return [
        sample
        for sample in text.splitlines()
        if sample.startswith("tutorgate_decisions_total") and float(sample.split()[-1]) != 0
    ]


# --------------------------------------------------------------------------- servers


@dataclass
class Servers:
    """Starts the front servers of the wanted lines; a server that fails is left out."""

    kids: Children
    wanted: Sequence[str]
    upstream_url: str
    policy: Path
    targets: list[Target] = field(default_factory=list)
    admins: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    redis: tuple[Child, str] | None = None

    def start(self) -> None:
        if "bare" in self.wanted:
            self._try("bare proxy", self._bare)
        if "gw_pass" in self.wanted or "gw_lesson" in self.wanted:
            self._try("gateway with redis", self._gateway_redis)
        if "gw_lesson_cluster" in self.wanted:
            self._try("gateway on a redis cluster", self._gateway_cluster)
        if "gw_lesson_w2" in self.wanted:
            self._try("gateway with 2 workers", self._gateway_workers)
        if "gw_pass_mem" in self.wanted or "gw_lesson_mem" in self.wanted:
            self._try("gateway in memory mode", self._gateway_memory)
        if {"nginx", "nginx_authz", "nginx_pass"} & set(self.wanted):
            self._try("nginx", self._nginx)
        order = {key: index for index, key in enumerate(LINE_KEYS)}
        self.targets.sort(key=lambda target: order[target.key])

    def _try(self, name: str, start: Callable[[], None]) -> None:
        try:
            start()
        except BenchError as err:
            self.errors.append(f"{name}: {err}")
            print(f"  FAILED to start {name}: {err}", file=sys.stderr, flush=True)

    def _bare(self) -> None:
        port = harness.free_port()
        argv = harness.script_argv(
            "bare_proxy.py", "--port", str(port), "--upstream", self.upstream_url
        )
        bare = self.kids.start("bare-proxy", argv)
        url = f"http://{HOST}:{port}"
        harness.wait_http(f"{url}/", bare, want=200)
        self.targets.append(Target("bare", url + PASS_PATH, bare))

    def _gateway(
        self, name: str, redis_url: str | None, extra: Sequence[str] = ()
    ) -> tuple[Child, str, str]:
        port, admin_port = harness.free_port(), harness.free_port()
        argv = harness.gateway_argv(self.policy, self.upstream_url, port, admin_port, redis_url)
        argv += extra
        gateway = self.kids.start(name, argv, env=harness.gateway_env())
        admin = f"http://{HOST}:{admin_port}"
        try:
            harness.wait_http(f"{admin}/healthz", gateway, want=200, timeout=30)
            harness.wait_http(f"{admin}/readyz", gateway, want=200, timeout=30)
        except BenchError:
            self.kids.stop(gateway)
            raise
        self.admins[name] = admin
        return gateway, f"http://{HOST}:{port}", admin

    def _add_gateway_lines(
        self, gateway: Child, base: str, redis: Child | None, keys: tuple[str, str]
    ) -> None:
        for key, path, lesson in ((keys[0], PASS_PATH, False), (keys[1], LESSON_PATH, True)):
            if key in self.wanted:
                url = base + path
                problems = preflight(url, expect_lesson=lesson)
                self.targets.append(Target(key, url, gateway, redis, problems))

    def _gateway_redis(self) -> None:
        redis, redis_url = harness.start_redis(self.kids)
        try:
            gateway, base, _admin = self._gateway("gateway-redis", redis_url)
        except BenchError:
            self.kids.stop(redis)
            raise
        self.redis = (redis, redis_url)
        self._add_gateway_lines(gateway, base, redis, ("gw_pass", "gw_lesson"))

    def _nginx_child(self, name: str, site: str, port: int) -> Child:
        nginx_local = _nginx_local()
        d = harness.LOG_DIR / name
        conf = nginx_local.write(d, site)
        child = self.kids.start(name, [nginx_local.NGINX, "-p", str(d), "-e",
                                       str(d / "error.log"), "-c", str(conf),
                                       "-g", "daemon off;"])
        harness.wait_tcp(port, child)
        return child

    def _nginx(self) -> None:
        """nginx alone, and the shipped example (deploy/nginx) in front of
        `tutorgate authz` on Redis; one nginx worker each."""
        app = self.upstream_url.removeprefix("http://")
        if "nginx" in self.wanted:
            port = harness.free_port()
            child = self._nginx_child("nginx-alone", NGINX_ALONE.format(app=app, port=port),
                                      port)
            self.targets.append(Target("nginx", f"http://{HOST}:{port}{PASS_PATH}", child))
        if not {"nginx_authz", "nginx_pass"} & set(self.wanted):
            return
        redis, redis_url = harness.start_redis(self.kids, "redis-authz")
        port, admin_port = harness.free_port(), harness.free_port()
        argv = harness.gateway_argv(self.policy, "", port, admin_port, redis_url)
        argv[1:6] = ["authz", "--policy", str(self.policy)]  # no --upstream
        authz = self.kids.start("tutorgate-authz", argv, env=harness.gateway_env())
        admin = f"http://{HOST}:{admin_port}"
        harness.wait_http(f"{admin}/readyz", authz, want=200, timeout=30)
        self.admins["tutorgate-authz"] = admin
        nport = harness.free_port()
        # lesson WebSockets would go to a serve instance; the bench sends none
        site = _nginx_local().render(app, f"{HOST}:{port}", f"{HOST}:{harness.free_port()}",
                                     nport)
        child = self._nginx_child("nginx-authz", site, nport)
        base = f"http://{HOST}:{nport}"
        if "nginx_authz" in self.wanted:
            self.targets.append(Target("nginx_authz", base + LESSON_PATH, child, redis,
                                       preflight(base + LESSON_PATH, expect_lesson=True)))
        if "nginx_pass" in self.wanted:
            self.targets.append(Target("nginx_pass", base + PASS_PATH, child, None,
                                       preflight(base + PASS_PATH, expect_lesson=False)))

    def _gateway_workers(self) -> None:
        """`serve --workers 2` on the same Redis as gw_lesson (its own if that
        line is not wanted). CPU is charged to the supervisor and its workers."""
        if self.redis is None:
            self.redis = harness.start_redis(self.kids)
        redis, redis_url = self.redis
        gateway, base, _admin = self._gateway("gateway-workers", redis_url, ("--workers", "2"))
        url = base + LESSON_PATH
        self.targets.append(Target("gw_lesson_w2", url, gateway, redis, preflight(url, True)))

    def _gateway_cluster(self) -> None:
        """One gateway on a local 3-master, 3-replica cluster (AOF off, as the
        single server's). CPU of all six nodes is charged to "redis"."""
        cluster = harness.RedisCluster(self.kids, harness.LOG_DIR / "cluster", "bench-cluster",
                                       appendonly=False)
        cluster.start()
        gateway, base, _admin = self._gateway("gateway-cluster", cluster.url)
        url = base + LESSON_PATH
        nodes = cluster.children()
        self.targets.append(Target("gw_lesson_cluster", url, gateway, nodes[0],
                                   preflight(url, True), tuple(nodes[1:])))

    def _gateway_memory(self) -> None:
        gateway, base, _admin = self._gateway("gateway-memory", None)
        self._add_gateway_lines(gateway, base, None, ("gw_pass_mem", "gw_lesson_mem"))


def _nginx_local():  # type: ignore[no-untyped-def]
    """deploy/nginx/local.py: renders and starts the shipped example."""
    import importlib.util

    path = harness.BENCH_DIR.parent / "deploy" / "nginx" / "local.py"
    spec = importlib.util.spec_from_file_location("nginx_local", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratios(
    lines: Sequence[Line], per_round: Sequence[Sequence[Line]]
) -> dict[str, dict[str, object]]:
    """req/s of each line over the bare proxy's, with the issue's targets.

    With several rounds, each round's ratio uses that round's bare proxy and the
    ratio reported is their median: the machine's speed drifts between rounds
    (shared host), but both lines of one round see about the same machine.
    """
    out: dict[str, dict[str, object]] = {}
    by_key = {line.key: line for line in lines}
    bare = by_key.get("bare")
    if bare is None or bare.rps <= 0:
        return out
    for key in RATIO_ORDER:
        line = by_key.get(key)
        if line is None:
            continue
        rounds = [
            mine.rps / base.rps
            for round_lines in per_round
            for mine in round_lines
            if mine.key == key
            for base in round_lines
            if base.key == "bare" and base.rps > 0
        ]
        ratio = statistics.median(rounds) if len(rounds) > 1 else line.rps / bare.rps
        entry: dict[str, object] = {"ratio": round(ratio, 3), "valid": not line.warnings}
        if line.front_cpu_us and bare.front_cpu_us:
            # The front process is the bottleneck (one busy core), so bare CPU per
            # request over this line's estimates the same ratio, with less noise.
            entry["cpu_ratio"] = round(bare.front_cpu_us / line.front_cpu_us, 3)
        if len(rounds) > 1:
            entry["per_round"] = [round(r, 3) for r in rounds]
        target = TARGETS.get(key)
        if target is not None:
            entry["target"] = target
            entry["verdict"] = "PASS" if ratio >= target else "MISS"
        out[key] = entry
    return out


def pair_ratios(per_round: Sequence[Sequence[Line]]) -> dict[str, dict[str, object]]:
    """The decision service's ratios (PAIR_TARGETS): the median over rounds of
    each round's line / baseline req/s."""
    out: dict[str, dict[str, object]] = {}
    for (key, base), target in PAIR_TARGETS.items():
        rounds = [
            mine.rps / other.rps
            for round_lines in per_round
            for mine in round_lines
            if mine.key == key
            for other in round_lines
            if other.key == base and other.rps > 0
        ]
        if not rounds:
            continue
        ratio = statistics.median(rounds)
        out[f"{key}/{base}"] = {"ratio": round(ratio, 3), "target": target,
                                "verdict": "PASS" if ratio >= target else "MISS",
                                "per_round": [round(r, 3) for r in rounds]}
    return out


def plain_pairs(per_round: Sequence[Sequence[Line]]) -> dict[str, dict[str, object]]:
    """PAIRS: medians over rounds of each round's req/s ratio and front CPU
    ratio (the baseline's CPU per request over the line's: < 1 costs more)."""
    out: dict[str, dict[str, object]] = {}
    for key, base in PAIRS:
        both = [(mine, other) for round_lines in per_round for mine in round_lines
                if mine.key == key for other in round_lines if other.key == base]
        if not both:
            continue
        rps = [m.rps / o.rps for m, o in both if o.rps > 0]
        cpu = [o.front_cpu_us / m.front_cpu_us for m, o in both
               if m.front_cpu_us and o.front_cpu_us]
        entry: dict[str, object] = {"ratio": round(statistics.median(rps), 3),
                                    "per_round": [round(r, 3) for r in rps]}
        if cpu:
            entry["cpu_ratio"] = round(statistics.median(cpu), 3)
        out[f"{key}/{base}"] = entry
    return out


def print_report(lines: Sequence[Line], table_ratios: dict[str, dict[str, object]]) -> None:
    header = (
        f"{'line':<30} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} "
        f"{'upstr us':>8} {'redis us':>8} {'non-2xx':>7} {'sock err':>8}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    for line in lines:
        print(
            f"{line.label:<30} {line.rps:>8.0f} {line.p50_ms:>7.2f} {line.p99_ms:>7.2f} "
            f"{_fmt(line.front_cpu_us, '.0f'):>10} {_fmt(line.upstream_cpu_us, '.0f'):>8} "
            f"{_fmt(line.redis_cpu_us, '.0f'):>8} {line.non_2xx:>7} {line.socket_errors:>8}"
        )
    if any(line.rounds > 1 for line in lines):
        rounds = max(line.rounds for line in lines)
        print(f"(medians of {rounds} interleaved rounds; ratios: median of the rounds' ratios)")
    print()
    for key, entry in table_ratios.items():
        mine, _, base = key.partition("/")
        name = f"{LABELS[mine]} / {LABELS[base] if base else 'bare'}"
        text = f"{name:<38} {entry['ratio']:>5.2f}x"
        cpu_ratio = entry.get("cpu_ratio")
        if isinstance(cpu_ratio, float):
            text += f" (by CPU {cpu_ratio:.2f}x)"
        if "target" in entry:
            text += f"   target >= {entry['target']:.2f}x  {entry['verdict']}"
        per_round = entry.get("per_round")
        if isinstance(per_round, list):
            text += "   rounds: " + " ".join(f"{r:.2f}" for r in per_round)
        if entry.get("valid") is False:
            text += "   (line has warnings, see below)"
        print(text)
    for line in lines:
        for warning in line.warnings:
            print(f"WARNING {line.label}: {warning}")


def environment(settings: Settings) -> dict[str, object]:
    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "wrk": version(["wrk", "--version"]),
        "redis": version(["redis-server", "--version"]),
        "tutorgate": str(harness.tutorgate_executable()),
        "settings": asdict(settings),
    }


def write_json(record: dict[str, object]) -> Path:
    harness.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    latest = harness.RESULTS_DIR / "latest.json"
    latest.write_text(json.dumps(record, indent=2, default=str) + "\n")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    shutil.copyfile(latest, harness.RESULTS_DIR / f"run-{stamp}.json")
    return latest


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per line (4)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured seconds first (1)")
    parser.add_argument("--students", type=int, default=1000, help="distinct student ids")
    # many short rounds: the host's drift is the largest error (bench/README.md)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds; medians (10)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 s per line")
    parser.add_argument(
        "--lines", default=",".join(LINE_KEYS), help=f"comma list, of {','.join(LINE_KEYS)}"
    )
    args = parser.parse_args(argv)
    wanted = [key.strip() for key in args.lines.split(",") if key.strip()]
    unknown = sorted(set(wanted) - set(LINE_KEYS))
    if unknown:
        parser.error(f"unknown lines: {', '.join(unknown)}")
    duration, warmup = (3, 1) if args.quick else (args.duration, args.warmup)
    rounds = 3 if args.quick else args.rounds
    if not 1 <= duration <= 600 or not 0 <= warmup <= 60 or not 1 <= rounds <= 50:
        parser.error("--duration must be 1..600, --warmup 0..60, --rounds 1..50")
    if not 1 <= args.connections <= 10_000 or not 1 <= args.students <= 100_000:
        parser.error("--connections must be 1..10000 and --students 1..100000")
    if not 1 <= args.threads <= 64:
        parser.error("--threads must be 1..64")
    settings = Settings(duration, warmup, args.connections, args.threads, args.students, rounds)
    return settings, wanted


def check_tools(wanted: Sequence[str]) -> str | None:
    """None when everything the wanted lines need is installed, else what is missing."""
    if shutil.which("wrk") is None:
        return "wrk not found: apt-get install -y wrk"
    if any(key.startswith("gw_") for key in wanted):
        reason = harness.check_tutorgate()
        if reason is not None:
            return f"gateway unavailable: {reason}\n(--lines direct,bare measures the baselines)"
        if {"gw_pass", "gw_lesson"} & set(wanted) and shutil.which("redis-server") is None:
            return "redis-server not found"
        if "gw_lesson_cluster" in wanted and shutil.which("redis-cli") is None:
            return "redis-cli not found (it creates the cluster)"
    return None


def run(settings: Settings, wanted: Sequence[str]) -> int:
    missing = check_tools(wanted)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    record: dict[str, object] = {"environment": environment(settings)}
    print(
        f"wrk -t{settings.threads} -c{settings.connections} -d{settings.duration}s "
        f"(+{settings.warmup}s warm-up) per line, {settings.students} student ids, "
        f"{settings.rounds} round(s)",
        flush=True,
    )
    busy = harness.machine_busy()
    record["cpu_busy_before"] = round(busy, 3)
    if busy > 0.15:
        print(
            f"  note: {busy:.0%} of the CPUs busy before the run: something else is running, "
            "figures will be low and noisy",
            flush=True,
        )
    errors: list[str] = []
    per_round: list[list[Line]] = []
    with Children() as kids:
        upstream, upstream_url = harness.start_upstream(kids)
        policy = harness.RESULTS_DIR / "policy.yaml"
        if any(key.startswith(("gw_", "nginx_")) for key in wanted):
            curfew = harness.write_policy(policy)
            record["policy"] = {"file": str(policy), "curfew": list(curfew)}
            print(f"  policy: {policy} (curfew {curfew[0]}-{curfew[1]} Asia/Shanghai)")
        servers = Servers(kids, wanted, upstream_url, policy)
        servers.start()
        errors.extend(servers.errors)
        targets = servers.targets
        if "direct" in wanted:
            targets.insert(0, Target("direct", upstream_url + PASS_PATH, upstream))

        for number in range(1, settings.rounds + 1):
            if settings.rounds > 1:
                print(f" round {number}/{settings.rounds}", flush=True)
            round_lines: list[Line] = []
            # every other round in reverse order (ABBA): a machine that drifts
            # during a round favours no line over the rounds
            order = list(targets) if number % 2 else list(reversed(targets))
            for target in order:
                try:
                    round_lines.append(measure(target, settings, upstream))
                except (BenchError, subprocess.TimeoutExpired) as err:
                    errors.append(f"{LABELS[target.key]}: {err}")
                    print(f"  FAILED {LABELS[target.key]}: {err}", file=sys.stderr, flush=True)
                    targets.remove(target)
                time.sleep(0.5)
            per_round.append(round_lines)
        record["decisions"] = {name: decisions(url) for name, url in servers.admins.items()}

    keys = [key for key in LINE_KEYS if any(line.key == key for r in per_round for line in r)]
    lines = [combine([line for r in per_round for line in r if line.key == key]) for key in keys]
    table_ratios = ratios(lines, per_round)
    table_ratios.update(pair_ratios(per_round))
    table_ratios.update(plain_pairs(per_round))
    record["lines"] = [asdict(line) for line in lines]
    if settings.rounds > 1:
        record["rounds"] = [[asdict(line) for line in r] for r in per_round]
    record["ratios"] = table_ratios
    record["errors"] = errors
    print_report(lines, table_ratios)
    path = write_json(record)
    print(f"\nresults: {path}")
    if errors:
        print(f"{len(errors)} error(s); see above and {harness.LOG_DIR}/", file=sys.stderr)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, wanted = parse_args(argv)
    return harness.guarded("bench", lambda: run(settings, wanted))


if __name__ == "__main__":
    sys.exit(main())
