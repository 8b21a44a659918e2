"""Fault soak: thousands of students, two gateways, one Redis, faults on a schedule,
and a checker that proves the rules from what the upstream served.

    .venv/bin/python bench/soak.py                       # 2,000 students, 240 s, 12 faults
    .venv/bin/python bench/soak.py --students 300 --duration 60 --faults 5 --seed 3
    .venv/bin/python bench/soak.py --cluster             # the same on a Redis Cluster

Two ``tutorgate serve --redis`` processes share one redis-server (AOF,
``appendfsync everysec``) in front of bench/soak_upstream.py, which logs every
request it serves. One asyncio client plays the students on a time-compressed
policy (6 s lessons, 3 s breaks, a 10 s curfew window a little into the run, a
region whose subject classes have a rest day today) through either gateway at
random, while faults are injected one after another: Redis SIGKILL + restart,
Redis SIGSTOP + SIGCONT, gateway SIGKILL + restart, a broken policy push and a
burst of hostile requests. Then bench/soak_check.py checks the upstream log
against the policy and the fault timeline.

``--cluster`` puts both gateways on a 3-master, 3-replica Redis Cluster
(``redis+cluster://``, AOF on every node, ``cluster-node-timeout 2000``,
``cluster-require-full-coverage no``) and swaps the Redis SIGKILL + restart for
``cluster_master_kill``: one master SIGKILLed, its replica promoted, the
killed node started again to rejoin as a replica. ``redis_stop`` stops one
master, shorter than the node timeout (a stall, not a failover). The client
logs every ``state_unavailable`` denial, and the checker proves that only the
students whose slot the failing master held were denied, and for no longer
than the failover + 2 s. Exit status: 0 no violation, 1
violations, 2 the soak could not run. Results: bench/results/soak-latest/
(``run.json``, ``upstream.jsonl``, ``result.json``, server logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import soak_check
from harness import HOST, POLICY_TZ, BenchError, Child, Children

from gateway.fleet import push_policy

REST_REGION = "990000"  # its subject classes have a rest day today (extra_holidays)
OTHER_REGION = "110000"  # not in the policy: the base rules
KINDS = ("redis_kill", "redis_stop", "gateway_kill", "policy_broken", "hostile_burst")
# A cluster's Redis fault is a master's crash and failover; a whole-store
# SIGKILL + restart has no meaning there (the killed master is restarted too).
CLUSTER_KINDS = ("cluster_master_kill", "redis_stop", "gateway_kill", "policy_broken",
                 "hostile_burst")
# A cluster master's SIGSTOP stays under cluster-node-timeout (2 s): a stall the
# gateways must ride out, not a failover (cluster_master_kill is that).
CLUSTER_STOP_S = (1.0, 1.5)
ROUTES = [
    {"prefix": "/classroom/subject/", "kind": "lesson", "category": "subject"},
    {"prefix": "/classroom/arts/", "kind": "lesson", "category": "non_subject"},
    {"prefix": "/api/photo-search", "kind": "forbidden", "category": ""},
]
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5, connect=2)
WS_HOLD_MAX = 20.0  # a WebSocket lesson not cut by then is closed by the client
SLOWLORIS = 40  # trickling sockets per hostile burst


# ------------------------------------------------------------------ policy


def policy_text(max_d: int, min_b: int, curfew: tuple[str, str], rest_dates: list[str], *,
                broken: str | None = None) -> str:
    """The soak's policy; ``broken`` makes an invalid variant that, if a gateway
    took it anyway, would let photo search and long lessons through."""
    routes = ROUTES if broken is None else ROUTES[:2]
    start = f'"{curfew[0]}"' if broken != "semantic" else curfew[0].replace(":", "")
    lines = [
        "# Written by bench/soak.py: a time-compressed policy for the fault soak.",
        "version: 1",
        "timezone: Asia/Shanghai",
        "failure_mode: fail_closed",
        "identity: {source: header, student_header: X-Student-Id, "
        "grade_header: X-Student-Grade, region_header: X-Student-Region}",
        f"lesson: {{max_duration: {max_d if broken is None else 3600}s, min_break: {min_b}s}}",
        f'curfew: {{start: {start}, end: "{curfew[1]}"}}',
        "rest_days: {weekends: false, statutory_holidays: false, extra_holidays: [], "
        "extra_workdays: [], vacations: []}",
        "regions:",
        f'  "{REST_REGION}":',
        f"    rest_days: {{extra_holidays: [{', '.join(rest_dates)}]}}",
        "routes:",
    ]
    lines += [f"  - {{prefix: {r['prefix']}, kind: {r['kind']}, "
              + (f"category: {r['category']}}}" if r["kind"] == "lesson"
                 else "feature: photo_search}") for r in routes]
    text = "\n".join(lines) + "\n"
    if broken == "syntax":
        text += "routes: [\n"  # unterminated flow sequence (and a duplicate key)
    return text


# ------------------------------------------------------------------ processes


@dataclass
class Gateway:
    name: str
    port: int
    admin_port: int
    child: Child | None = None
    starts: int = 0

    @property
    def via(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class Stack:
    """The servers of one soak and how to (re)start them."""

    kids: Children
    run_dir: Path
    policy: Path
    upstream_url: str
    redis_port: int
    env: dict[str, str]
    gateways: list[Gateway]
    redis: Child | None = None
    redis_starts: int = 0
    cluster: harness.RedisCluster | None = None

    @property
    def redis_url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        return f"redis://{HOST}:{self.redis_port}/0"

    def redis_children(self) -> list[Child]:
        if self.cluster is not None:
            return self.cluster.children()
        return [self.redis] if self.redis is not None else []

    def start_redis(self) -> None:
        self.redis_starts += 1
        data = self.run_dir / "redis"
        data.mkdir(exist_ok=True)
        self.redis = self.kids.start(f"soak-redis-{self.redis_starts}", [
            "redis-server", "--port", str(self.redis_port), "--bind", HOST, "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data)])

    def start_gateway(self, gw: Gateway) -> None:
        gw.starts += 1
        argv = harness.gateway_argv(self.policy, self.upstream_url, gw.port, gw.admin_port,
                                    self.redis_url)
        gw.child = self.kids.start(f"soak-{gw.name}-{gw.starts}", argv, env=self.env)


async def wait_redis(port: int, within: float = 15.0) -> float:
    """Poll until redis answers PING (after loading its AOF); the time it did."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r = aioredis.Redis(host=HOST, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            if await r.ping():
                return time.time()
        except Exception:
            pass
        finally:
            await r.aclose()
        await asyncio.sleep(0.05)
    raise BenchError(f"redis on port {port} did not answer within {within:.0f}s")


async def wait_healthy(session: aiohttp.ClientSession, gw: Gateway, within: float = 20.0) -> float:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert gw.child is not None
        if not gw.child.alive():
            raise BenchError(f"{gw.name} exited: {gw.child.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"http://{HOST}:{gw.admin_port}/healthz",
                                   timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return time.time()
        await asyncio.sleep(0.05)
    raise BenchError(f"{gw.name} not healthy after {within:.0f}s")


# ------------------------------------------------------------------ students


@dataclass
class Stats:
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    client_errors: int = 0
    ws_opened: int = 0
    ws_close_codes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # every state_unavailable the client met: (time, student id, gateway, how)
    unavailable: list[tuple[float, str, str, str]] = field(default_factory=list)


@dataclass
class Student:
    sid: str
    region: str | None
    grade: str
    persistent: bool  # keeps knocking during breaks, curfew and rest days
    ws: bool  # has WebSocket lessons
    rng: random.Random

    def headers(self) -> dict[str, str]:
        h = {"X-Student-Id": self.sid, "X-Student-Grade": self.grade}
        if self.region is not None:
            h["X-Student-Region"] = self.region
        return h


class Driver:
    def __init__(self, args: argparse.Namespace, stack: Stack, session: aiohttp.ClientSession,
                 ends_at: float) -> None:
        self.args, self.stack, self.session, self.ends_at = args, stack, session, ends_at
        self.stats = Stats()

    def _gateway(self, rng: random.Random, avoid: Gateway | None = None) -> Gateway:
        choices = [g for g in self.stack.gateways if g is not avoid] or self.stack.gateways
        return rng.choice(choices)

    async def request(self, st: Student, path: str) -> tuple[int, float | None]:
        """One GET through a random gateway (the other one if it cannot be
        reached, as a load balancer would); status and Retry-After."""
        gw = self._gateway(st.rng)
        for attempt in range(2):
            self.stats.requests += 1
            try:
                async with self.session.get(gw.base + path, headers=st.headers(),
                                            timeout=REQUEST_TIMEOUT) as r:
                    body = await r.read()
                    self.stats.by_status[str(r.status)] += 1
                    if r.status == 503 and b'"state_unavailable"' in body:
                        self.stats.unavailable.append((time.time(), st.sid, gw.via, "http"))
                    retry = r.headers.get("Retry-After")
                    return r.status, float(retry) if retry else None
            except (aiohttp.ClientError, TimeoutError):
                self.stats.client_errors += 1
                if attempt == 0:
                    gw = self._gateway(st.rng, avoid=gw)
        return 0, None

    async def student(self, st: Student) -> None:
        rng = st.rng
        await asyncio.sleep(rng.uniform(0, min(20.0, self.args.duration / 4)))
        while time.time() < self.ends_at:
            if st.ws and rng.random() < 0.6:
                await self.ws_lesson(st)
            else:
                await self.session_of_requests(st)
            await asyncio.sleep(rng.uniform(*self.args.quiet))

    async def session_of_requests(self, st: Student) -> None:
        rng = st.rng
        subject = rng.random() < 0.5
        base = "/classroom/subject/" if subject else "/classroom/arts/"
        n = rng.randint(10, 25) if rng.random() < 0.3 else rng.randint(3, 12)
        for i in range(n):
            if time.time() >= self.ends_at:
                return
            path = f"{base}lesson/{i}"
            if rng.random() < 0.01:
                path = f"/api/photo-search?q={i}"
            status, retry = await self.request(st, path)
            if status in (403, 429, 503) and not st.persistent:
                if retry is not None and retry <= 4:
                    await asyncio.sleep(retry)  # waits the break out, then goes on
                    continue
                return
            await asyncio.sleep(rng.uniform(0.3, 1.0))

    async def ws_lesson(self, st: Student) -> None:
        rng = st.rng
        route = "subject" if rng.random() < 0.3 else "arts"
        gw = self._gateway(rng)
        url = f"ws://{HOST}:{gw.port}/classroom/{route}/room/live"
        held_until = time.time() + WS_HOLD_MAX
        try:
            async with self.session.ws_connect(url, headers=st.headers(), timeout=aiohttp.
                                               ClientWSTimeout(ws_close=2), autoping=True) as ws:
                self.stats.ws_opened += 1
                code: object = None  # stays None if we hung up (or the socket broke)
                try:
                    await ws.send_str("hello")
                    while time.time() < min(held_until, self.ends_at):
                        try:
                            msg = await ws.receive(timeout=1.0)
                        except TimeoutError:
                            # a send may meet the socket the gateway just closed: the
                            # close frame it sent first is still read by receive()
                            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                                await ws.send_str("hello")
                            continue
                        if msg.type == aiohttp.WSMsgType.CLOSE:
                            code = f"{msg.data} {msg.extra}"  # the gateway's cut and rule
                            if msg.extra == "state_unavailable":
                                self.stats.unavailable.append((time.time(), st.sid, gw.via,
                                                               "ws_cut"))
                            break
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                                        aiohttp.WSMsgType.ERROR):
                            code = ws.close_code
                            break
                finally:
                    self.stats.ws_close_codes[str(code)] += 1
        except aiohttp.WSServerHandshakeError as e:
            self.stats.by_status[f"ws-{e.status}"] += 1
            if e.status == 503:  # the contract's only 503 denial is state_unavailable
                self.stats.unavailable.append((time.time(), st.sid, gw.via, "ws_handshake"))
        except (aiohttp.ClientError, TimeoutError):
            self.stats.client_errors += 1


def make_students(args: argparse.Namespace) -> list[Student]:
    out = []
    for i in range(args.students):
        rng = random.Random(args.seed * 1_000_003 + i)
        r = rng.random()
        region = REST_REGION if r < 0.15 else (None if r < 0.25 else OTHER_REGION)
        grade = "preschool" if rng.random() < 0.02 else str(rng.randint(1, 12))
        out.append(Student(f"s-{i:05d}", region, grade, rng.random() < 0.15,
                           rng.random() < 0.06, rng))
    return out


# ------------------------------------------------------------------ hostile input


def hostile_requests(gw: Gateway, upstream_port: int) -> list[tuple[str, bytes]]:
    """(label, raw request bytes): path tricks on the forbidden route and on a
    subject route for a student whose subject classes have a rest day today,
    absolute-form targets, duplicate identity headers, bad header bytes."""
    rest = f"X-Student-Id: h-rest\r\nX-Student-Region: {REST_REGION}\r\n"
    photo = ["/api/photo-search", "/api/photo-search/", "/api/photo-search;x=1",
             "/api/photo-search/..", "/api/photo-search/.", "/api/%70hoto-search",
             "/api//photo-search", "//api/photo-search", "/x/../api/photo-search",
             "/%2e%2e/api/photo-search", "/api/./photo-search", "/api/photo-search%2Fx",
             "/api/photo-search%5Cx", "/api/photo-search\\x", "/api/photo-search%00",
             "/classroom/../api/photo-search", "/api/photo-search%3Bx=1", "/api;x=1/photo-search",
             "/api/photo-search?q=%2e%2e", "/API/photo-search",
             f"http://{HOST}:{gw.port}/api/photo-search",
             f"http://{HOST}:{upstream_port}/api/photo-search", "http://evil.example/api/photo-search"]
    subject = ["/classroom/subject/.", "/classroom/subject/./math", "/classroom//subject/math",
               "/classroom/subject;x=1/math", "/classroom/%73ubject/math",
               "/classroom/arts/../subject/math", "/classroom/arts/%2e%2e/subject/math",
               "/classroom/subject%2Fmath", "//classroom/subject/math", "/classroom/./subject/x",
               f"http://{HOST}:{gw.port}/classroom/subject/math"]
    out: list[tuple[str, bytes]] = []
    for p in photo:
        out.append((p, f"GET {p} HTTP/1.1\r\nHost: {gw.via}\r\nConnection: close\r\n\r\n"
                    .encode("latin-1")))
    for p in subject:
        out.append((p, f"GET {p} HTTP/1.1\r\nHost: {gw.via}\r\n{rest}Connection: close\r\n\r\n"
                    .encode("latin-1")))
    head = f"GET /classroom/arts/dup HTTP/1.1\r\nHost: {gw.via}\r\nConnection: close\r\n"
    out.append(("dup-id", (head + "X-Student-Id: h-dup-a\r\nX-Student-Id: h-dup-b\r\n\r\n")
                .encode()))
    out.append(("dup-grade", (head + "X-Student-Id: h-dup-c\r\nX-Student-Grade: preschool\r\n"
                              "X-Student-Grade: 5\r\n\r\n").encode()))
    out.append(("bad-id-bytes", head.encode() + b"X-Student-Id: h-\xff\xfe\x01bad\r\n\r\n"))
    out.append(("bad-grade-bytes", head.encode() + b"X-Student-Id: h-ok\r\n"
                b"X-Student-Grade: \xe4\xb8\x80\r\n\r\n"))
    out.append(("bad-region-bytes", head.encode() + b"X-Student-Id: h-ok2\r\n"
                b"X-Student-Region: \x7f\x80\r\n\r\n"))
    return out


async def raw_exchange(port: int, data: bytes, within: float = 5.0) -> str:
    """Send raw bytes, return the status line (or what went wrong)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
    except (OSError, TimeoutError) as e:
        return f"connect: {type(e).__name__}"
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), within)
        return line.decode("latin-1").strip() or "closed"
    except (OSError, TimeoutError) as e:
        return type(e).__name__
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def slowloris(port: int, hold: float) -> str:
    """Trickle a request head one header a second; 'closed after N s' if the
    gateway hung up, 'held' if it was still open when we gave up."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
    except (OSError, TimeoutError):
        return "connect failed"
    try:
        writer.write(b"GET /classroom/arts/slow HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - t0 < hold:
            await asyncio.sleep(1.0)
            if reader.at_eof():
                return f"closed after {time.monotonic() - t0:.0f} s"
            writer.write(b"X-Trickle: 1\r\n")
            await writer.drain()
        return "held"
    except OSError:
        return f"closed after {time.monotonic() - t0:.0f} s"
    finally:
        writer.close()


# ------------------------------------------------------------------ faults


class Faults:
    def __init__(self, args: argparse.Namespace, stack: Stack, session: aiohttp.ClientSession,
                 policy: dict[str, Any], upstream_port: int) -> None:
        self.args, self.stack, self.session = args, stack, session
        self.policy, self.upstream_port = policy, upstream_port
        self.timeline: list[dict[str, Any]] = []
        self.aof: list[dict[str, Any]] = []
        self.background: list[asyncio.Task[Any]] = []
        self.rng = random.Random(args.seed)

    def schedule(self, t0: float) -> list[tuple[float, str]]:
        """``--faults`` faults evenly spread over the run (after a warm-up,
        before the tail), every kind once before any repeats."""
        n = self.args.faults
        kinds: list[str] = []
        while len(kinds) < n:
            batch = list(CLUSTER_KINDS if self.stack.cluster is not None else KINDS)
            self.rng.shuffle(batch)
            kinds += batch
        first, last = t0 + self.args.warmup, t0 + self.args.duration - self.args.tail
        step = (last - first) / max(n, 1)
        return [(first + i * step, kinds[i]) for i in range(n)]

    async def run(self, t0: float) -> None:
        for at, kind in self.schedule(t0):
            await asyncio.sleep(max(0.0, at - time.time()))
            record: dict[str, Any] = {"kind": kind}
            try:
                await getattr(self, kind)(record)
            except BenchError as e:
                record["error"] = str(e)
            self.timeline.append(record)
            shown = {k: v for k, v in record.items()
                     if k not in ("kind", "start", "restarted", "recovered", "hostile")}
            print(f"  {time.time() - t0:6.1f}s fault {kind}: "
                  + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    async def _clocks(self, port: int | None = None, keys: list[bytes] | None = None
                      ) -> dict[str, tuple[float, float]]:
        """Every student's clock (lesson start, last activity) as the Redis on
        ``port`` holds it now (``keys``: only these, those it has)."""
        r = aioredis.Redis(host=HOST, port=port or self.stack.redis_port, socket_timeout=3)
        try:
            if keys is None:
                keys = [k async for k in r.scan_iter(match="tutorgate:*:clock", count=1000)]
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, "start", "last")
            values = await pipe.execute()
        finally:
            await r.aclose()
        return {k.decode(): (float(v[0] or 0), float(v[1] or 0))
                for k, v in zip(keys, values, strict=True) if v != [None, None]}

    @staticmethod
    def _loss(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
              ) -> dict[str, Any]:
        """What a restart or failover lost: clocks gone, lesson starts rolled
        back, activity (``last``) rolled back and by how much."""
        missing = [k for k in before if k not in after]
        starts = [k for k, (start, _) in before.items() if k in after and after[k][0] < start]
        lasts = [before[k][1] - after[k][1] for k in before
                 if k in after and after[k][1] < before[k][1]]
        return {"clocks": len(before), "clocks_missing": len(missing),
                "lesson_starts_lost": len(starts), "activity_lost": len(lasts),
                "activity_lost_max_s": round(max(lasts, default=0.0), 3)}

    async def redis_kill(self, rec: dict[str, Any]) -> None:
        before = await self._clocks()
        snapped = time.time()
        assert self.stack.redis is not None
        rec["start"] = time.time()
        os.kill(self.stack.redis.pid, signal.SIGKILL)
        self.stack.redis.proc.wait(5)
        down = self.rng.uniform(0.5, 1.5)
        await asyncio.sleep(down)
        rec["restarted"] = time.time()  # nothing can be served from it before this
        self.stack.start_redis()
        rec["recovered"] = await wait_redis(self.stack.redis_port)
        rec["down_s"] = round(rec["recovered"] - rec["start"], 3)
        after = await self._clocks()
        # What the AOF (fsync every second) lost: writes acknowledged before the
        # snapshot that the restarted server does not have. Writes between the
        # snapshot and the kill are not seen here (snapshot_to_kill_s says how long).
        loss = {"at": rec["start"], **self._loss(before, after),
                "snapshot_to_kill_s": round(rec["start"] - snapped, 3)}
        self.aof.append(loss)
        rec["aof_loss"] = {k: v for k, v in loss.items() if k != "at"}

    async def redis_stop(self, rec: dict[str, Any]) -> None:
        pause = (1.0, 2.5)
        if self.stack.cluster is not None:
            cluster = self.stack.cluster
            masters = await asyncio.to_thread(cluster.masters)
            port = self.rng.choice(sorted(masters))
            child = cluster.node(port).child
            assert child is not None
            pid, pause = child.pid, CLUSTER_STOP_S
            rec["node"], rec["slots"] = port, masters[port]
        else:
            assert self.stack.redis is not None
            pid = self.stack.redis.pid
        rec["start"] = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.rng.uniform(*pause))
        finally:
            os.kill(pid, signal.SIGCONT)
            rec["recovered"] = time.time()
        rec["down_s"] = round(rec["recovered"] - rec["start"], 3)

    async def cluster_master_kill(self, rec: dict[str, Any]) -> None:
        """SIGKILL one master; its replica is promoted (the store is "down" for
        its students until then); start the node again and wait until it has
        rejoined as a replica in sync, so the next kill finds a replica too."""
        cluster = self.stack.cluster
        assert cluster is not None
        masters = await asyncio.to_thread(cluster.masters)
        port = self.rng.choice(sorted(masters))
        node = cluster.node(port)
        assert node.child is not None
        before = await self._clocks(port)
        snapped = time.time()
        rec["node"], rec["slots"] = port, masters[port]
        rec["start"] = time.time()
        os.kill(node.child.pid, signal.SIGKILL)
        node.child.proc.wait(5)
        promoted, seen = await asyncio.to_thread(cluster.wait_promoted, port, masters[port])
        # The promotion is when the replica won its election (its log), not
        # when our poll saw it: the poll lags by up to 50 ms plus a redis-cli
        # run plus gossip, and the gateways may follow the new master sooner.
        logged = await asyncio.to_thread(cluster.promoted_at, promoted)
        rec["recovered"] = logged if logged is not None and logged <= seen else seen
        rec["promoted"], rec["promotion_seen_after_s"] = promoted, round(seen - rec["recovered"], 3)
        rec["failover_s"] = rec["down_s"] = round(rec["recovered"] - rec["start"], 3)
        after = await self._clocks(promoted, [k.encode() for k in before])
        # What asynchronous replication lost: writes the master acknowledged
        # that its replica did not have when it took over (a lower bound:
        # writes between the snapshot and the kill are not seen).
        loss = {"at": rec["start"], **self._loss(before, after),
                "snapshot_to_kill_s": round(rec["start"] - snapped, 3)}
        self.aof.append(loss)
        rec["replica_loss"] = {k: v for k, v in loss.items() if k != "at"}
        cluster.start_node(node)
        await asyncio.to_thread(cluster.wait_ok, 60.0)
        rec["rejoined_s"] = round(time.time() - rec["start"], 3)
        rec["rejoined_as_replica"] = port not in await asyncio.to_thread(cluster.masters)

    async def gateway_kill(self, rec: dict[str, Any]) -> None:
        gw = self.rng.choice(self.stack.gateways)
        assert gw.child is not None
        rec["via"] = gw.via
        rec["gateway"] = gw.name
        rec["start"] = time.time()
        os.kill(gw.child.pid, signal.SIGKILL)
        gw.child.proc.wait(5)
        self.stack.start_gateway(gw)
        rec["recovered"] = await wait_healthy(self.session, gw)
        rec["down_s"] = round(rec["recovered"] - rec["start"], 3)

    async def policy_broken(self, rec: dict[str, Any]) -> None:
        variant = "semantic" if len([f for f in self.timeline
                                     if f["kind"] == "policy_broken"]) % 2 == 0 else "syntax"
        p = self.policy
        text = policy_text(p["max_d"], p["min_b"], p["curfew_hms"], p["rest_dates"],
                           broken=variant)
        bad = self.stack.run_dir / f"broken-{variant}.yaml"
        bad.write_text(text)
        before = await self._reload_failures()
        rec["start"] = time.time()
        rec["variant"] = variant
        rec["push_cli_exit"] = await _run(harness.tutorgate_executable(), "policy", "push",
                                          str(bad), "--redis", self.stack.redis_url)
        # the CLI refuses it; a careless tool could still write it: straight
        # into Redis (push_policy stores and announces without validating)
        rec["heard_by"] = await push_policy(self.stack.redis_url, text)
        await asyncio.sleep(1.5)
        after = await self._reload_failures()
        rec["reload_failures_counted"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        rec["restore_push_exit"] = await _run(harness.tutorgate_executable(), "policy", "push",
                                              str(self.stack.policy), "--redis",
                                              self.stack.redis_url)
        rec["recovered"] = time.time()

    async def _reload_failures(self) -> dict[str, float]:
        out = {}
        for gw in self.stack.gateways:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(f"http://{HOST}:{gw.admin_port}/metrics",
                                            timeout=aiohttp.ClientTimeout(total=2)) as r:
                    for line in (await r.text()).splitlines():
                        if line.startswith("tutorgate_policy_reload_failures_total "):
                            out[gw.name] = float(line.split()[1])
        return out

    async def hostile_burst(self, rec: dict[str, Any]) -> None:
        rec["start"] = time.time()
        gws = self.stack.gateways
        hold = min(15.0, self.args.tail)
        slow = [asyncio.create_task(slowloris(gws[i % len(gws)].port, hold))
                for i in range(SLOWLORIS)]
        answers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for _ in range(2):
            for gw in gws:
                reqs = hostile_requests(gw, self.upstream_port)
                got = await asyncio.gather(*(raw_exchange(gw.port, data) for _, data in reqs))
                for (label, _), status in zip(reqs, got, strict=True):
                    answers[label][" ".join(status.split()[1:2]) or status] += 1
        rec["hostile_sent"] = sum(sum(v.values()) for v in answers.values())
        rec["hostile"] = {k: dict(v) for k, v in answers.items()}
        rec["recovered"] = time.time()

        async def collect() -> None:
            results = await asyncio.gather(*slow)
            rec["slowloris"] = {s: results.count(s) for s in sorted(set(results))}

        self.background.append(asyncio.create_task(collect()))


async def _run(*argv: object) -> int:
    proc = await asyncio.create_subprocess_exec(*map(str, argv), stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 30)


# ------------------------------------------------------------------ memory


def own_rss() -> int:
    """This process alone (rss_bytes would add its children: every server)."""
    status = Path("/proc/self/status").read_text()
    return next(int(x.split()[1]) * 1024 for x in status.splitlines()
                if x.startswith("VmRSS:"))


async def sample_memory(stack: Stack, peaks: dict[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        pids = {gw.name: gw.child.pid for gw in stack.gateways if gw.child is not None}
        for name, pid in pids.items():
            peaks[name] = max(peaks.get(name, 0), harness.rss_bytes(pid))
        redis = sum(harness.rss_bytes(c.pid) for c in stack.redis_children())
        peaks["redis"] = max(peaks.get("redis", 0), redis)  # all nodes, on a cluster
        peaks["client"] = max(peaks.get("client", 0), own_rss())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


# ------------------------------------------------------------------ the run


def local_hms(t: float) -> str:
    return dt.datetime.fromtimestamp(t, POLICY_TZ).strftime("%H:%M:%S")


async def check_slot_mapping(stack: Stack, session: aiohttp.ClientSession) -> None:
    """One lesson request, then its clock must be on the master the checker
    computes for the student (pseudonym -> hash tag -> slot): the checker's
    mirror of the key layout is proven before the run, not assumed."""
    assert stack.cluster is not None
    sid = "soak-probe"
    async with session.get(stack.gateways[0].base + "/classroom/arts/probe",
                           headers={"X-Student-Id": sid}, timeout=REQUEST_TIMEOUT) as r:
        if r.status != 200:
            raise BenchError(f"probe request answered {r.status}: {await r.text()}")
    pseudonym = soak_check.pseudonym(stack.env["TUTORGATE_ID_SECRET"], sid)
    slot = soak_check.slot_of(pseudonym)
    masters = await asyncio.to_thread(stack.cluster.masters)
    port = next(p for p, ranges in masters.items() if soak_check.in_ranges(slot, ranges))
    key = f"tutorgate:{{{pseudonym}}}:clock"
    got = await asyncio.to_thread(harness.redis_cli, port, "EXISTS", key)
    if got.strip() != "1":
        raise BenchError(f"the checker's key layout is wrong: {key} (slot {slot}) is not on "
                         f":{port} ({got.strip()})")


async def soak(args: argparse.Namespace, kids: Children, run_dir: Path) -> dict[str, Any]:
    up_port = harness.free_port()
    log_path = run_dir / "upstream.jsonl"
    upstream = kids.start("soak-upstream", harness.script_argv(
        "soak_upstream.py", "--port", str(up_port), "--log", str(log_path)))
    harness.wait_tcp(up_port, upstream)

    t0 = time.time()
    cs = float(int(t0 + args.curfew_at))
    ce = cs + args.curfew_length
    curfew_hms = (local_hms(cs), local_hms(ce))
    today = dt.datetime.fromtimestamp(t0, POLICY_TZ).date()
    rest_dates = [today.isoformat(), (today + dt.timedelta(days=1)).isoformat()]
    policy_path = run_dir / "policy.yaml"
    policy_path.write_text(policy_text(args.max_duration, args.min_break, curfew_hms,
                                       rest_dates))
    stack = Stack(kids, run_dir, policy_path, f"http://{HOST}:{up_port}", harness.free_port(),
                  harness.gateway_env(),
                  [Gateway(n, harness.free_port(), harness.free_port()) for n in ("gw-a", "gw-b")])
    if args.cluster:
        stack.cluster = harness.RedisCluster(kids, run_dir, "soak-cluster")
        await asyncio.to_thread(stack.cluster.start)
    else:
        stack.start_redis()
        await wait_redis(stack.redis_port)

    connector = aiohttp.TCPConnector(limit=400, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        for gw in stack.gateways:
            stack.start_gateway(gw)
        for gw in stack.gateways:
            await wait_healthy(session, gw)
        if stack.cluster is not None:
            await check_slot_mapping(stack, session)
        t0 = time.time()
        ends_at = t0 + args.duration
        print(f"soak: {args.students} students, {args.duration:.0f} s, {args.faults} faults, "
              f"curfew {curfew_hms[0]}-{curfew_hms[1]} ({cs - t0:.0f}-{ce - t0:.0f} s in), "
              f"results in {run_dir}", flush=True)
        driver = Driver(args, stack, session, ends_at)
        policy_info = {"max_d": args.max_duration, "min_b": args.min_break,
                       "curfew_hms": curfew_hms, "rest_dates": rest_dates}
        faults = Faults(args, stack, session, policy_info, up_port)
        peaks: dict[str, int] = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(stack, peaks, stop))
        students = [asyncio.create_task(driver.student(st)) for st in make_students(args)]
        fault_task = asyncio.create_task(faults.run(t0))
        try:
            await asyncio.wait_for(asyncio.shield(fault_task), args.duration + 120)
            await asyncio.sleep(max(0.0, ends_at - time.time()))
        finally:
            for task in students:
                task.cancel()
            fault_task.cancel()
            await asyncio.gather(*students, fault_task, return_exceptions=True)
            await asyncio.gather(*faults.background, return_exceptions=True)
            stop.set()
            await sampler
    await asyncio.sleep(0.5)  # the upstream logs the WebSockets the client just closed
    ended = time.time()
    for gw in stack.gateways:
        if gw.child is not None:
            kids.stop(gw.child)
    kids.stop(upstream)  # SIGTERM: it flushes its log

    run = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "started": t0, "ended": ended,
        "policy": {"max_duration": args.max_duration, "min_break": args.min_break,
                   "curfew_start": cs, "curfew_end": ce, "curfew_local": curfew_hms,
                   "timezone": "Asia/Shanghai", "rest_region": REST_REGION,
                   "rest_dates": rest_dates, "routes": ROUTES},
        "faults": faults.timeline,
        "aof": faults.aof,
        "client": {"requests": driver.stats.requests,
                   "by_status": dict(driver.stats.by_status),
                   "client_errors": driver.stats.client_errors,
                   "ws_opened": driver.stats.ws_opened,
                   "ws_close_codes": dict(driver.stats.ws_close_codes),
                   "unavailable": driver.stats.unavailable},
        "topology": "cluster" if stack.cluster is not None else "single",
        # a throwaway secret of this run: the checker maps students to slots with it
        "id_secret": stack.env["TUTORGATE_ID_SECRET"],
        "rss_peak_mib": {k: round(v / 2**20, 1) for k, v in sorted(peaks.items())},
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=2, default=str))
    return run


def report(run: dict[str, Any], result: dict[str, Any]) -> None:
    faults = run["faults"]
    by_kind: dict[str, int] = defaultdict(int)
    for f in faults:
        by_kind[f["kind"]] += 1
    fig = result["figures"]
    print("\n== soak figures ==")
    print(f"client requests: {run['client']['requests']:,} "
          f"(by status {dict(sorted(run['client']['by_status'].items()))}, "
          f"client errors {run['client']['client_errors']})")
    print(f"served upstream: {fig['served']}; lesson requests {fig['lesson_requests_served']:,}; "
          f"students served {fig['students_served']:,} of {run['args']['students']:,}; "
          f"lessons {fig['lessons']:,}, longest {fig['longest_lesson_s']} s")
    print(f"WebSockets: opened {run['client']['ws_opened']}, "
          f"close codes {run['client']['ws_close_codes']}")
    print(f"faults injected: {dict(by_kind)}")
    print(f"longest interruption per fault kind (s): {fig['interruptions']}")
    print(f"served lesson requests after a store fault began, latest: "
          f"{fig['served_after_store_fault_max_s']} s (tolerance {soak_check.FAIL_TOL} s)")
    print(f"RSS peaks (MiB): {run['rss_peak_mib']}")
    if run["topology"] == "cluster":
        print(f"replica loss at each master kill: {run['aof']}")
        print(f"state_unavailable denials met by the client: "
              f"{fig['state_unavailable_denials']}; latest after its fault began, per kind "
              f"(s): {fig['longest_denial_after_fault_s']}")
        print(f"master kills (failover = kill -> replica promoted): {fig['master_kills']}")
        print(f"students of live masters denied: "
              f"{result['violations'].get('denied_on_live_master', 0)}")
    else:
        print(f"AOF (everysec) on Redis SIGKILL: {run['aof']}")
    print(f"violations: {result['violations_total']} {result['violations']}")
    for kind, examples in result["examples"].items():
        print(f"  {kind}: e.g. {json.dumps(examples[:2])}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", type=int, default=2000)
    p.add_argument("--duration", type=float, default=240.0, help="seconds of load")
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-duration", type=int, default=6, help="lesson seconds")
    p.add_argument("--min-break", type=int, default=3, help="break seconds")
    p.add_argument("--curfew-at", type=float, default=45.0, help="curfew starts S s in")
    p.add_argument("--curfew-length", type=float, default=10.0)
    p.add_argument("--quiet", type=float, nargs=2, default=(10.0, 50.0),
                   metavar=("MIN", "MAX"), help="seconds between a student's sessions")
    p.add_argument("--warmup", type=float, default=10.0, help="no fault before S s")
    p.add_argument("--tail", type=float, default=15.0, help="no fault in the last S s")
    p.add_argument("--cluster", action="store_true",
                   help="a 3-master, 3-replica Redis Cluster instead of one server")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (bench/results/soak-latest, or soak-cluster-latest)")
    a = p.parse_args(argv)
    if a.students < 1 or a.duration < a.warmup + a.tail + 5 or a.faults < 0:
        p.error("need --students >= 1, --faults >= 0 and --duration > warmup + tail + 5")
    if a.out is None:
        a.out = harness.RESULTS_DIR / ("soak-cluster-latest" if a.cluster else "soak-latest")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if (why := harness.check_tutorgate()) is not None:
        print(f"soak: {why}", file=sys.stderr)
        return 2
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} not on PATH", file=sys.stderr)
            return 2
    run_dir: Path = args.out
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    harness.exit_on_sigterm()
    try:
        with Children() as kids:
            run = asyncio.run(asyncio.wait_for(soak(args, kids, run_dir), args.duration + 300))
        for log in harness.LOG_DIR.glob("soak-*.log"):  # keep the server logs beside the run
            shutil.move(log, run_dir / log.name)
    except (BenchError, TimeoutError) as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    result = soak_check.check(soak_check.read_log(run_dir / "upstream.jsonl"), run).as_dict()
    result["run"] = {k: run[k] for k in ("args", "faults", "aof", "rss_peak_mib", "topology")}
    result["run"]["client"] = {k: v for k, v in run["client"].items() if k != "unavailable"}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    report(run, result)
    return 1 if result["violations_total"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
