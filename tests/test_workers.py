"""`serve --workers N`: worker processes on one port, one admin port for all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kit import ARTS, GatewayProcess, free_port, policy_text, spawn_gateway
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics_merge import Merger, parse

LIVE = "/classroom/arts/room/live"


def sid() -> str:
    return "stu-" + uuid.uuid4().hex[:10]


def health(gw: GatewayProcess) -> dict[str, Any]:
    return json.loads(gw.admin("/healthz")[1])  # type: ignore[no-any-return]


def wait_until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.05)


def spawn_workers(policy: Path, upstream: str, redis_url: str, n: int = 2,
                  env: dict[str, str] | None = None) -> GatewayProcess:
    """`tutorgate serve --workers n --redis URL`, returned once every worker is up."""
    gw = spawn_gateway(str(policy), upstream, args=("--redis", redis_url, "--workers", str(n)),
                       env=env)
    try:
        wait_until(lambda: all(w["up"] for w in health(gw)["workers"]), what="all workers up")
    except BaseException:
        gw.stop()
        raise
    return gw


def samples(gw: GatewayProcess, name: str) -> list[tuple[dict[str, str], float]]:
    status, text = gw.admin("/metrics")
    assert status == 200
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


def metric_sum(gw: GatewayProcess, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples(gw, name)
               if all(lab.get(k) == v2 for k, v2 in labels.items()))


def per_worker(gw: GatewayProcess, name: str) -> dict[str, float]:
    return {lab["worker"]: v for lab, v in samples(gw, name)}


async def lesson_requests(gw: GatewayProcess, count: int) -> list[int]:
    """`count` lesson requests, each from a new student on a new connection
    (SO_REUSEPORT spreads connections, not requests)."""
    async def one() -> int:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                s.get(gw.url(ARTS), headers={"X-Student-Id": sid()}) as r:
            await r.read()
            return r.status
    return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(max_duration="1h", min_break="2s"))
    return path


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("command", ["serve", "authz"])
@pytest.mark.parametrize("how", ["option", "env"])
def test_workers_without_redis_exit_2(policy_file: Path, how: str, command: str) -> None:
    """More than one worker in memory mode is refused with exit status 2
    (serve and authz alike)."""
    upstream = ["--upstream", "http://127.0.0.1:9"] if command == "serve" else []
    argv = [str(Path(sys.executable).parent / "tutorgate"), command, "--policy",
            str(policy_file), *upstream, "--listen",
            f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}"]
    env = dict(os.environ)
    env.pop("TUTORGATE_REDIS_URL", None)
    if how == "option":
        argv += ["--workers", "2"]
    else:
        env["TUTORGATE_WORKERS"] = "2"
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=20)
    assert done.returncode == 2
    assert "--redis" in done.stderr


def test_bad_workers_value_exit_2(policy_file: Path) -> None:
    """--workers that is not a whole number from 1 is refused with exit status 2."""
    for value in ("0", "two", "-1"):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "tutorgate"), "serve", "--policy",
             str(policy_file), "--upstream", "http://127.0.0.1:9", f"--workers={value}"],
            capture_output=True, text=True, timeout=20)
        assert done.returncode == 2, value
        assert "--workers" in done.stderr


# ---------------------------------------------------------------- serving


async def test_workers_share_the_port_and_sum_metrics(policy_file: Path, upstream_process: str,
                                                      private_redis: Any) -> None:
    """Both workers serve the port; /metrics sums their decisions and lessons."""
    gw = spawn_workers(policy_file, upstream_process, private_redis.url)
    try:
        k = 40
        assert await lesson_requests(gw, k) == [200] * k
        assert metric_sum(gw, "tutorgate_decisions_total") == k
        assert metric_sum(gw, "tutorgate_decisions_total", decision="allow",
                          category="non_subject") == k
        assert metric_sum(gw, "tutorgate_active_lessons") == k  # a gauge, summed
        assert metric_sum(gw, "tutorgate_lessons_started_total") == k
        spread = per_worker(gw, "tutorgate_worker_decisions_total")
        assert sorted(spread) == ["0", "1"]
        assert all(v > 0 for v in spread.values()), spread
        assert sum(spread.values()) == k
        assert metric_sum(gw, "tutorgate_workers") == 2
        assert metric_sum(gw, "tutorgate_store_up") == 1  # per-process fact: min, not sum
        [(_, live)] = samples(gw, "tutorgate_policy_info")
        assert live == 1  # one policy, named once: max, not sum
        # histograms are summed bucket by bucket
        assert metric_sum(gw, "tutorgate_upstream_latency_seconds_count", route="lesson") == k
        assert gw.admin("/readyz")[0] == 200
    finally:
        gw.stop()


async def test_killed_worker_is_replaced_and_counted(policy_file: Path, upstream_process: str,
                                                     private_redis: Any) -> None:
    """A worker killed with SIGKILL is replaced and counted; the port keeps
    serving and the summed counters do not go down."""
    gw = spawn_workers(policy_file, upstream_process, private_redis.url)
    try:
        assert await lesson_requests(gw, 20) == [200] * 20
        before = metric_sum(gw, "tutorgate_decisions_total")
        assert before == 20
        victim = health(gw)["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        # Once its process is gone (a zombie until the supervisor reaps it),
        # the kernel sends new connections to the survivor alone. Connections
        # it had queued but not accepted die with it (SO_REUSEPORT), so wait
        # for that before counting answers.
        wait_until(lambda: _gone(victim), what="the killed worker's sockets closed")
        # the survivor holds the port alone meanwhile
        assert await lesson_requests(gw, 10) == [200] * 10
        wait_until(lambda: health(gw)["workers"][0]["pid"] not in (victim, None)
                   and health(gw)["workers"][0]["up"], what="worker 0 replaced")
        assert per_worker(gw, "tutorgate_worker_restarts_total") == {"0": 1.0, "1": 0.0}
        # the dead worker's last scraped counts stay in the sum
        assert metric_sum(gw, "tutorgate_decisions_total") >= before + 10
        assert await lesson_requests(gw, 10) == [200] * 10
        assert gw.admin("/healthz")[0] == 200
    finally:
        gw.stop()


async def test_sigterm_drains_every_worker(policy_file: Path, upstream_process: str,
                                           private_redis: Any) -> None:
    """SIGTERM to the supervisor lets requests under way finish, stops every
    worker, and exits 0."""
    gw = spawn_workers(policy_file, upstream_process, private_redis.url)
    pids = [w["pid"] for w in health(gw)["workers"]]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            slow = [asyncio.create_task(s.get(gw.url("/static/slow?s=1"))) for _ in range(6)]
            await asyncio.sleep(0.3)
            gw.proc.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*slow)
            assert [r.status for r in answers] == [200] * 6
        assert await asyncio.to_thread(gw.proc.wait, 15) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        gw.stop()


def test_sighup_reaches_every_worker(policy_file: Path, upstream_process: str,
                                     private_redis: Any) -> None:
    """SIGHUP to the supervisor reloads the policy in every worker."""
    gw = spawn_workers(policy_file, upstream_process, private_redis.url)
    try:
        [(labels, _)] = samples(gw, "tutorgate_policy_info")
        old_sha = labels["sha"]
        # the same size and modification time: only SIGHUP can notice it
        st = policy_file.stat()
        policy_file.write_text(policy_text(max_duration="2h", min_break="2s"))
        os.utime(policy_file, ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(1.5)  # two file-watch passes
        assert metric_sum(gw, "tutorgate_policy_reloads_total") == 0
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: metric_sum(gw, "tutorgate_policy_reloads_total") == 2,
                   what="both workers reloaded")
        shas = {lab["sha"] for lab, _ in samples(gw, "tutorgate_policy_info")}
        assert old_sha not in shas and len(shas) == 1
    finally:
        gw.stop()


async def test_live_connections_cut_in_every_worker(tmp_path: Path, upstream_process: str,
                                                    private_redis: Any) -> None:
    """WebSockets held by different workers are all cut at the lesson limit."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(max_duration="3s", min_break="2s"))
    gw = spawn_workers(path, upstream_process, private_redis.url)
    student = sid()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            socks = [await s.ws_connect(gw.url(LIVE).replace("http", "ws", 1),
                                        headers={"X-Student-Id": student}) for _ in range(8)]
            opened = per_worker(gw, "tutorgate_worker_decisions_total")
            assert all(v > 0 for v in opened.values()), opened  # both workers hold some
            for ws in socks:
                msg = await asyncio.wait_for(ws.receive(), 6)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert (msg.data, msg.extra) == (4001, "lesson_limit")
        assert metric_sum(gw, "tutorgate_connections_cut_total", rule="lesson_limit") == 8
    finally:
        gw.stop()


# ---------------------------------------------------------------- the merge


def test_merge_sums_counters_and_keeps_retired_counts() -> None:
    """Counters and histograms sum (a retired worker's stay); gauges merge
    by their meaning: summed, or min/max for per-process facts."""
    def worker(decisions: float, active: float, up: float, sha: str) -> str:
        return (
            "# TYPE tutorgate_decisions_total counter\n"
            f'tutorgate_decisions_total{{decision="allow"}} {decisions}\n'
            "# TYPE tutorgate_active_lessons gauge\n"
            f"tutorgate_active_lessons {active}\n"
            "# TYPE tutorgate_store_up gauge\n"
            f"tutorgate_store_up {up}\n"
            "# TYPE tutorgate_policy_info gauge\n"
            f'tutorgate_policy_info{{sha="{sha}"}} 1\n'
            "# TYPE h histogram\n"
            f'h_bucket{{le="1.0"}} {decisions}\nh_bucket{{le="+Inf"}} {decisions}\n'
            f"h_count {decisions}\nh_sum {decisions / 2}\n")

    def value(fams: Any, fam: str, sample: str, **labels: str) -> float:
        return float(fams[fam].samples[(sample, tuple(sorted(labels.items())))])

    m = Merger()
    a, b = parse(worker(3, 2, 1, "old")), parse(worker(5, 1, 0, "new"))
    out = m.merge([a, b])
    assert value(out, "tutorgate_decisions", "tutorgate_decisions_total", decision="allow") == 8
    assert value(out, "tutorgate_active_lessons", "tutorgate_active_lessons") == 3
    assert value(out, "tutorgate_store_up", "tutorgate_store_up") == 0
    assert value(out, "tutorgate_policy_info", "tutorgate_policy_info", sha="old") == 1
    assert value(out, "tutorgate_policy_info", "tutorgate_policy_info", sha="new") == 1
    assert value(out, "h", "h_bucket", le="+Inf") == 8
    assert value(out, "h", "h_sum") == 4
    m.retire(a)  # worker a died; its replacement has counted 1 so far
    out = m.merge([parse(worker(1, 1, 1, "new")), b])
    assert value(out, "tutorgate_decisions", "tutorgate_decisions_total", decision="allow") == 9
    assert value(out, "tutorgate_active_lessons", "tutorgate_active_lessons") == 2
    assert value(out, "h", "h_count") == 9


@pytest.mark.parametrize("workers", ["1", "2"])
def test_taken_listen_port_exits_1(policy_file: Path, private_redis: Any, workers: str) -> None:
    """A gateway (or a worker) that cannot bind the listen port exits 1 at
    once instead of hanging with its Redis tasks still running."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "tutorgate"), "serve", "--policy",
             str(policy_file), "--upstream", "http://127.0.0.1:9", "--listen",
             f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}",
             "--redis", private_redis.url, "--workers", workers],
            capture_output=True, text=True, timeout=20,
            env={**os.environ, "TUTORGATE_ID_SECRET": "x"})
    assert done.returncode == 1
    assert "cannot listen" in done.stderr


def _gone(pid: int) -> bool:
    """The process has exited (gone, or a zombie: its sockets are closed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
