"""Fleet load: N gateways (each with W workers) on Redis, thousands of students.

Figures for docs/capacity.md, not a test. Every simulated student sends a
lesson request every `--interval` seconds (with jitter), through the
gateways in turn, on a time-compressed policy (`--lesson` seconds of
lesson, `--break` seconds of break: students go through whole lessons and
breaks during the run). After a warm-up the script measures, over
`--duration` seconds: the requests by status, Redis commands and bytes
(INFO commandstats / stats of every node in `--stats-nodes`), CPU of the
gateways (supervisors and workers) and of Redis, and the growth of Redis
memory per student. It prints, per student: Redis ops/s, commands, bytes
and requests per student-minute, gateway CPU per student-second and per
request.

    .venv/bin/python bench/fleet.py [--students 2000] [--gateways 1] [--workers 1]
                                    [--interval 2] [--duration 20]
                                    [--cluster | --redis URL --stats-nodes H:P,H:P]

Without --redis a redis-server of its own is started. `--cluster` starts a
local 3-master, 3-replica Redis Cluster instead (AOF off, as the single
server) and the gateways use `redis+cluster://`: Redis figures are summed
over the three masters (where the commands run), and the replicas' are
reported apart (`replica_*`: what replication costs). With --redis the
gateways use that URL and INFO is read from `--stats-nodes` (default: the
URL's own host:port); Redis CPU is then not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import aiohttp
import harness
import redis
from harness import HOST, Child, Children

LESSON_PATH = "/classroom/arts/fleet"
POLICY = """\
version: 1
timezone: Asia/Shanghai
lesson: {{max_duration: {lesson}s, min_break: {brk}s}}
curfew: {{start: "{start}", end: "{end}"}}
rest_days: {{weekends: false, statutory_holidays: false}}
routes:
  - {{prefix: /classroom/arts/, kind: lesson, category: non_subject}}
"""


def node_stats(nodes: Sequence[str]) -> dict[str, float]:
    """Commands, bytes and memory summed over the Redis nodes."""
    out: defaultdict[str, float] = defaultdict(float)
    for node in nodes:
        host, _, port = node.rpartition(":")
        r = redis.Redis(host=host, port=int(port), socket_timeout=5)
        try:
            stats = r.info("stats")
            memory = r.info("memory")
            commands = r.info("commandstats")
        finally:
            r.close()
        out["commands"] += stats["total_commands_processed"]
        out["net_in"] += stats["total_net_input_bytes"]
        out["net_out"] += stats["total_net_output_bytes"]
        out["used_memory"] += memory["used_memory"]
        # A master's replication backlog (1 MiB by default) fills up during
        # the run whatever the students: kept apart from their memory.
        out["repl_buffers"] += memory.get("mem_total_replication_buffers",
                                          memory.get("mem_replication_backlog", 0))
        for name, cs in commands.items():
            out[name.removeprefix("cmdstat_")] += cs["calls"]
    return dict(out)


def key_memory(nodes: Sequence[str], sample: int = 300) -> dict[str, float]:
    """Mean MEMORY USAGE of a student's keys by kind (clock, conns) and of one
    audit event (the stream's usage over its length)."""
    sizes: dict[str, list[int]] = {}
    audit = [0.0, 0.0]
    for node in nodes:
        host, _, port = node.rpartition(":")
        r = redis.Redis(host=host, port=int(port), socket_timeout=5)
        try:
            for key in r.scan_iter(match="tutorgate:{*", count=1000):
                # tutorgate:{<student>}:clock, :conns, :claim:<token>
                kind = key.decode().split("}:", 1)[-1].split(":", 1)[0]
                got = sizes.setdefault(kind, [])
                if len(got) < sample:
                    got.append(int(r.memory_usage(key, samples=0) or 0))
                if all(len(v) >= sample for v in sizes.values()) and len(sizes) >= 2:
                    break
            # One server holds `tutorgate:audit`; a cluster shards it into
            # `tutorgate:audit:{0}`..: scan for the ones this node holds (a
            # plain client asking a node for another's key gets MOVED).
            for key in r.scan_iter(match="tutorgate:audit*", count=1000):
                if r.type(key) == b"stream":
                    audit[0] += float(r.memory_usage(key, samples=0) or 0)
                    audit[1] += float(r.xlen(key))
        finally:
            r.close()
    out: dict[str, float] = {f"{kind}_key_bytes": round(sum(v) / len(v))
                             for kind, v in sizes.items() if v}
    if audit[1]:
        out["audit_event_bytes"] = round(audit[0] / audit[1])
        out["audit_events"] = audit[1]
    return out


async def student(session: aiohttp.ClientSession, urls: Sequence[str], sid: str,
                  interval: float, stop: float, counts: Counter[int]) -> None:
    await asyncio.sleep(random.uniform(0, interval))
    turn = random.randrange(len(urls))
    while time.monotonic() < stop:
        turn += 1
        try:
            async with session.get(urls[turn % len(urls)],
                                   headers={"X-Student-Id": sid}) as r:
                await r.read()
                counts[r.status] += 1
        except (aiohttp.ClientError, TimeoutError):
            counts[0] += 1
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))


Snapshot = dict[str, float]


async def load(urls: Sequence[str], students: int, interval: float, warmup: float,
               duration: float, measure: Callable[[], Snapshot]
               ) -> tuple[Counter[int], Counter[int], tuple[Snapshot, Snapshot]]:
    """Run the students; `measure()` is called at the window's start and end."""
    counts: Counter[int] = Counter()
    conn = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        stop = time.monotonic() + warmup + duration + 2 * interval
        tasks = [asyncio.create_task(student(session, urls, f"fleet-{i:06d}", interval,
                                             stop, counts)) for i in range(students)]
        await asyncio.sleep(warmup)
        before_counts, before = Counter(counts), await asyncio.to_thread(measure)
        await asyncio.sleep(duration)
        window = Counter(counts)
        window.subtract(before_counts)
        after = await asyncio.to_thread(measure)
        await asyncio.gather(*tasks)
    return window, counts, (before, after)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", type=int, default=2000)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="serve --workers per gateway")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between a student's requests (2)")
    p.add_argument("--lesson", type=int, default=20, help="max_duration, seconds (20)")
    p.add_argument("--break", dest="brk", type=int, default=5, help="min_break, seconds (5)")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=20.0)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--redis", help="use this Redis URL instead of starting one")
    where.add_argument("--cluster", action="store_true",
                       help="start a local 3-master, 3-replica Redis Cluster (needs redis-cli)")
    p.add_argument("--stats-nodes", help="comma list of HOST:PORT to read INFO from")
    a = p.parse_args(argv)
    return harness.guarded("fleet", lambda: run(a))


def run(a: argparse.Namespace) -> int:
    with Children() as kids:
        # The Redis processes whose CPU is measured: the server, or the
        # cluster's masters; a cluster's replicas are measured apart.
        redis_children: list[Child] = []
        replica_children: list[Child] = []
        replicas: list[str] = []
        if a.redis:
            redis_url = a.redis
        elif a.cluster:
            cluster = harness.RedisCluster(kids, harness.LOG_DIR / "fleet-cluster",
                                           "fleet-cluster", appendonly=False)
            cluster.start()
            redis_url = cluster.url
            masters = set(cluster.masters())
            by_port = {n.port: n.child for n in cluster.nodes if n.child is not None}
            redis_children = [c for port, c in by_port.items() if port in masters]
            replica_children = [c for port, c in by_port.items() if port not in masters]
            replicas = [f"{HOST}:{port}" for port in by_port if port not in masters]
        else:
            redis_child, redis_url = harness.start_redis(kids)
            redis_children = [redis_child]
        if a.cluster:
            nodes = [f"{HOST}:{port}" for port in sorted(masters)]
        else:
            nodes = (a.stats_nodes.split(",") if a.stats_nodes
                     else [redis_url.split("://", 1)[1].split("/", 1)[0].split("@")[-1]])
        upstream, upstream_url = harness.start_upstream(kids)
        start, end = harness.curfew_far_from_now()
        policy = harness.RESULTS_DIR / "fleet-policy.yaml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(POLICY.format(lesson=a.lesson, brk=a.brk, start=start, end=end))
        env = harness.gateway_env()
        gateways: list[Child] = []
        urls = []
        for i in range(a.gateways):
            port, admin = harness.free_port(), harness.free_port()
            argv = harness.gateway_argv(policy, upstream_url, port, admin, redis_url)
            argv += ["--workers", str(a.workers)]
            gw = kids.start(f"fleet-gateway-{i}", argv, env=env)
            harness.wait_http(f"http://{HOST}:{admin}/readyz", gw, want=200, timeout=30)
            gateways.append(gw)
            urls.append(f"http://{HOST}:{port}{LESSON_PATH}")
        at_start = node_stats(nodes)
        empty = at_start["used_memory"] - at_start["repl_buffers"]
        load_before = round(os.getloadavg()[0], 2)  # the host is shared: say how busy

        def measure() -> Snapshot:
            per_node = [node_stats([node]) for node in nodes]
            snap: Snapshot = {}
            for one in per_node:
                for k, v in one.items():
                    snap[k] = snap.get(k, 0.0) + v
            for i, one in enumerate(per_node if len(per_node) > 1 else []):
                # each master's own count: how evenly the students' slots spread
                snap[f"master{i}_commands"] = one["commands"]
            if replicas:
                snap.update({f"replica_{k}": v for k, v in node_stats(replicas).items()
                             if k in ("commands", "net_in", "net_out", "used_memory")})
                snap["replica_cpu"] = sum(harness.cpu_seconds(c.pid) for c in replica_children)
            snap["gateway_cpu"] = sum(harness.cpu_seconds(g.pid) for g in gateways)
            snap["upstream_cpu"] = harness.cpu_seconds(upstream.pid)
            if redis_children:
                snap["redis_cpu"] = sum(harness.cpu_seconds(c.pid) for c in redis_children)
            snap["time"] = time.monotonic()
            return snap

        print(f"fleet: {a.students} students, a request every {a.interval:g}s each, "
              f"{a.gateways} gateway(s) x {a.workers} worker(s), lesson {a.lesson}s / "
              f"break {a.brk}s, {a.duration:g}s measured after {a.warmup:g}s", flush=True)
        window, total, (before, after) = asyncio.run(
            load(urls, a.students, a.interval, a.warmup, a.duration, measure))
        keys = key_memory(nodes)
        for gw in gateways:
            if not gw.alive():
                print(f"WARNING {gw.name} died:\n{gw.log_tail()}", file=sys.stderr)
    report(a, window, total, before, after,
           after["used_memory"] - after["repl_buffers"] - empty, keys, load_before)
    return 0


def report(a: argparse.Namespace, window: Counter[int], total: Counter[int],
           before: Snapshot, after: Snapshot, memory: float, keys: dict[str, float],
           load_before: float) -> None:
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    seconds = d["time"]
    student_seconds = a.students * seconds
    student_minutes = student_seconds / 60
    requests = sum(window.values())
    skip = {"commands", "net_in", "net_out", "used_memory", "repl_buffers", "gateway_cpu",
            "upstream_cpu", "redis_cpu", "time", "info", "ping", "cluster", "hello"}
    by_command = {k: v for k, v in sorted(d.items(), key=lambda kv: -kv[1])
                  if k.split("|")[0] not in skip and v > 0
                  and not k.startswith(("master", "replica_"))}
    masters = sorted(k for k in d if k.startswith("master") and k.endswith("_commands"))
    replica: dict[str, object] = {}
    if "replica_commands" in d:
        # What replication costs: the replicas apply every write the masters make.
        replica = {
            "replica_ops_per_s_per_student": round(d["replica_commands"] / student_seconds, 4),
            "replica_bytes_in_per_student_minute": round(d["replica_net_in"] / student_minutes),
            "replica_cpu_us_per_student_second": round(d["replica_cpu"] * 1e6 / student_seconds,
                                                       2),
            "replica_cpu_us_per_request": round(d["replica_cpu"] * 1e6 / max(requests, 1), 1),
        }
    figures = {
        "students": a.students, "gateways": a.gateways, "workers": a.workers,
        "redis": "cluster, 3 masters + 3 replicas" if a.cluster else (a.redis or "one server"),
        "seconds": round(seconds, 2),
        "load_average_start_end": [load_before, round(os.getloadavg()[0], 2)],
        "requests": requests,
        "statuses": {str(k): v for k, v in sorted(window.items()) if v},
        # the warm-up too: a cold start's first burst shows here, not in the window
        "statuses_whole_run": {str(k): v for k, v in sorted(total.items()) if v},
        "requests_per_student_minute": round(requests / student_minutes, 2),
        "redis_ops_per_s_per_student": round(d["commands"] / student_seconds, 4),
        "redis_commands_per_student_minute": round(d["commands"] / student_minutes, 2),
        "redis_commands_per_request": round(d["commands"] / max(requests, 1), 3),
        "redis_commands": by_command,
        "redis_commands_share_by_master": [round(d[k] / max(d["commands"], 1), 3)
                                           for k in masters],
        "redis_bytes_in_per_student_minute": round(d["net_in"] / student_minutes),
        "redis_bytes_out_per_student_minute": round(d["net_out"] / student_minutes),
        "gateway_cpu_us_per_student_second": round(d["gateway_cpu"] * 1e6 / student_seconds, 1),
        "gateway_cpu_us_per_request": round(d["gateway_cpu"] * 1e6 / max(requests, 1), 1),
        "gateway_cores_busy": round(d["gateway_cpu"] / seconds, 3),
        "redis_cpu_us_per_student_second": (round(d["redis_cpu"] * 1e6 / student_seconds, 2)
                                            if "redis_cpu" in d else None),
        "redis_cpu_us_per_request": (round(d["redis_cpu"] * 1e6 / max(requests, 1), 1)
                                     if "redis_cpu" in d else None),
        **replica,
        # used_memory growth from empty to the window's end, audit stream
        # included, replication buffers not (below)
        "redis_memory_bytes_per_student": round(memory / a.students),
        "redis_replication_buffers_bytes": round(after["repl_buffers"]),
        "redis_key_memory": keys,
        "audit_events_per_student_minute": round(
            keys.get("audit_events", 0) / (a.students * (a.warmup + seconds) / 60), 3),
        "client_errors_whole_run": total.get(0, 0),
    }
    for k, v in figures.items():
        print(f"  {k:<38} {v}")
    out = harness.RESULTS_DIR / "fleet-latest.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
