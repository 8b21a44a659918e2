"""Shared plumbing for the benchmark scripts: child processes, ports, /proc readings.

Everything here binds and connects to 127.0.0.1 only. Child processes are tied to
the parent (``PR_SET_PDEATHSIG``) and stopped by :class:`Children` on exit, so a
benchmark never leaves servers behind, even when it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from zoneinfo import ZoneInfo

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
LOG_DIR = RESULTS_DIR / "logs"
POLICY_TEMPLATE = BENCH_DIR / "policy.yaml"
POLICY_TZ = ZoneInfo("Asia/Shanghai")
CLK_TCK = os.sysconf("SC_CLK_TCK")

_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """A step of the benchmark could not be carried out."""


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- children


def die_with_parent() -> None:
    """Run in a child between fork and exec: SIGTERM it when this process dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One server process started by a benchmark, with its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=grace)
            return self.proc.returncode
        finally:
            self._log.close()


class Children:
    """Starts servers and stops every one of them (newest first) when the block ends."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{name}.log"
        log = log_path.open("wb")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                preexec_fn=die_with_parent,  # the parent starts children from one thread
            )
        except BaseException:
            log.close()
            raise
        child = Child(name=name, proc=proc, log_path=log_path, _log=log)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> int | None:
        if child in self._children:
            self._children.remove(child)
        return child.stop()

    def stop_all(self) -> None:
        while self._children:
            child = self._children.pop()
            with contextlib.suppress(Exception):
                child.stop()


def exit_on_sigterm() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks stop the children."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def start_upstream(kids: Children) -> tuple[Child, str]:
    """bench/upstream.py on a free port, answering; its child and base URL."""
    port = free_port()
    child = kids.start("upstream", script_argv("upstream.py", "--port", str(port)))
    url = f"http://{HOST}:{port}"
    wait_http(f"{url}/", child, want=200)
    return child, url


def start_redis(kids: Children, name: str = "redis") -> tuple[Child, str]:
    """A redis-server of its own on a free port, answering; its child and URL
    (stopped again if it does not answer)."""
    port = free_port()
    child = kids.start(name, redis_argv(port))
    try:
        wait_tcp(port, child)
    except BenchError:
        kids.stop(child)
        raise
    return child, f"redis://{HOST}:{port}/0"


def guarded(what: str, run: Callable[[], int]) -> int:
    """A benchmark's main: children die with us, a BenchError is one line."""
    exit_on_sigterm()
    try:
        return run()
    except BenchError as err:
        print(f"{what} failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- http


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> Answer:
    """A GET that returns the answer for any status (no exception on 4xx/5xx)."""
    if not url.startswith(f"http://{HOST}:"):
        raise BenchError(f"refusing a non-loopback URL: {url}")
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, body)


def wait_http(url: str, child: Child, *, want: int | None = None, timeout: float = 20.0) -> Answer:
    """Poll ``url`` until it answers (with status ``want`` if given) or time runs out."""
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(
                f"{child.name} exited with status {child.proc.returncode} before it was "
                f"ready; last log lines:\n{child.log_tail()}"
            )
        try:
            answer = http_get(url, timeout=1.0)
        except (OSError, urllib.error.URLError) as err:
            last = str(err)
        else:
            if want is None or answer.status == want:
                return answer
            last = f"status {answer.status}: {answer.body[:200]!r}"
        time.sleep(0.1)
    raise BenchError(
        f"{child.name} not ready at {url} after {timeout:.0f}s ({last}); "
        f"last log lines:\n{child.log_tail()}"
    )


def wait_tcp(port: int, child: Child, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{child.name} does not accept connections on port {port}")


# --------------------------------------------------------------------------- /proc


def _read_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _read_stat(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [pid], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        tree.extend(kids)
        todo.extend(kids)
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its children, live and reaped."""
    ticks = 0
    for index, member in enumerate(descendants(pid)):
        fields = _read_stat(member)
        if fields is None:
            continue
        # After the ")" split: [0]=state, utime=[11], stime=[12], cutime=[13], cstime=[14].
        ticks += int(fields[11]) + int(fields[12])
        if index == 0:  # children already reaped count once, through the root
            ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy (not idle or iowait) over the next ``seconds``."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its live children (VmRSS), in bytes."""
    total = 0
    for member in descendants(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
        if match:
            total += int(match.group(1)) * 1024
    return total


# --------------------------------------------------------------------------- gateway


def tutorgate_executable() -> Path:
    """The ``tutorgate`` console script next to the running interpreter.

    ``BENCH_TUTORGATE=/path/to/tutorgate`` overrides it (another build or install).
    """
    override = os.environ.get("BENCH_TUTORGATE")
    return Path(override) if override else Path(sys.executable).parent / "tutorgate"


def check_tutorgate(exe: Path | None = None) -> str | None:
    """None if ``tutorgate --help`` works, else a one-line reason it does not."""
    exe = exe or tutorgate_executable()
    if not exe.exists():
        return f"{exe} not found (pip install -e . into this interpreter's venv)"
    try:
        done = subprocess.run([str(exe), "--help"], capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return f"{exe} --help did not finish in 30 s"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        return f"{exe} --help exited {done.returncode}: {tail[-1] if tail else ''}"
    return None


def curfew_far_from_now(now: dt.datetime | None = None) -> tuple[str, str]:
    """A two-hour curfew window centred about 12 h from now, as "HH:MM" in Asia/Shanghai."""
    local = (now or dt.datetime.now(POLICY_TZ)).astimezone(POLICY_TZ)
    start = local + dt.timedelta(hours=11)
    end = local + dt.timedelta(hours=13)
    return start.strftime("%H:%M"), end.strftime("%H:%M")


def write_policy(dest: Path, now: dt.datetime | None = None) -> tuple[str, str]:
    """Copy bench/policy.yaml to ``dest`` with the curfew moved ~12 h away from now."""
    start, end = curfew_far_from_now(now)
    text = POLICY_TEMPLATE.read_text()
    text, n_start = re.subn(r'"\d\d:\d\d"(\s*# bench:curfew_start)', rf'"{start}"\g<1>', text)
    text, n_end = re.subn(r'"\d\d:\d\d"(\s*# bench:curfew_end)', rf'"{end}"\g<1>', text)
    if n_start != 1 or n_end != 1:
        raise BenchError(f"{POLICY_TEMPLATE}: curfew start/end markers not found")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return start, end


def gateway_argv(
    policy: Path, upstream_url: str, port: int, admin_port: int, redis_url: str | None,
    exe: Path | None = None,
) -> list[str]:
    argv = [
        str(exe or tutorgate_executable()),
        "serve",
        "--policy",
        str(policy),
        "--upstream",
        upstream_url,
        "--listen",
        f"{HOST}:{port}",
        "--admin-listen",
        f"{HOST}:{admin_port}",
    ]
    if redis_url is not None:
        argv += ["--redis", redis_url]
    return argv


def gateway_env() -> dict[str, str]:
    return {"TUTORGATE_ID_SECRET": "bench-" + secrets.token_hex(16)}


def redis_argv(port: int) -> list[str]:
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
    ]


def script_argv(script: str, *args: str) -> list[str]:
    """Run one of the bench/*.py servers with the current interpreter."""
    return [sys.executable, str(BENCH_DIR / script), *args]


# --------------------------------------------------------------------------- redis cluster


def redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """``redis-cli`` against 127.0.0.1:port; its output (errors included)."""
    done = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    return done.stdout + done.stderr


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind((HOST, port + 10000))
            return port


@dataclass
class ClusterNode:
    port: int
    data: Path
    child: Child | None = None
    starts: int = 0


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES`` as a live node sees the cluster."""

    node_id: str
    port: int
    master: bool
    failed: bool
    master_id: str | None
    slots: tuple[tuple[int, int], ...]


class RedisCluster:
    """3 masters and 3 replicas on loopback, children of ``kids``.

    Each node keeps its data directory (nodes.conf, AOF), so a node killed and
    started again on its port rejoins the cluster: as a replica when its
    replica was promoted meanwhile.
    """

    def __init__(self, kids: Children, workdir: Path, name: str = "cluster", *,
                 appendonly: bool = True, node_timeout_ms: int = 2000) -> None:
        self.kids, self.name = kids, name
        self.appendonly, self.node_timeout_ms = appendonly, node_timeout_ms
        self.nodes: list[ClusterNode] = []
        for _ in range(6):
            port = cluster_port()
            data = workdir / f"{name}-{port}"
            data.mkdir(parents=True, exist_ok=True)
            self.nodes.append(ClusterNode(port, data))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes[:3])

    def children(self) -> list[Child]:
        return [n.child for n in self.nodes if n.child is not None and n.child.alive()]

    def start(self) -> None:
        """Start six empty nodes, join them (``redis-cli --cluster create``), wait until ok."""
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            assert node.child is not None
            wait_tcp(node.port, node.child)
        out = redis_cli(self.nodes[0].port, "--cluster", "create",
                        *[f"{HOST}:{n.port}" for n in self.nodes],
                        "--cluster-replicas", "1", "--cluster-yes", timeout=60)
        if "All 16384 slots covered" not in out:
            raise BenchError(f"redis-cli --cluster create failed: {out[-500:]}")
        self.wait_ok()

    def start_node(self, node: ClusterNode) -> None:
        node.starts += 1
        node.child = self.kids.start(f"{self.name}-{node.port}-{node.starts}", [
            "redis-server", "--port", str(node.port), "--bind", HOST, "--dir", str(node.data),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "no", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"])

    def view(self) -> list[NodeView]:
        """The cluster as the first live node that answers sees it."""
        for node in self.nodes:
            if node.child is None or not node.child.alive():
                continue
            out = redis_cli(node.port, "CLUSTER", "NODES", timeout=2)
            if "myself" not in out:
                continue
            views = []
            for line in out.splitlines():
                f = line.split()
                if len(f) < 8:
                    continue
                slots = []
                for part in f[8:]:
                    if part.startswith("["):  # a slot being migrated
                        continue
                    lo, _, hi = part.partition("-")
                    slots.append((int(lo), int(hi or lo)))
                flags = f[2].split(",")
                views.append(NodeView(f[0], int(f[1].split("@")[0].rsplit(":", 1)[1]),
                                      "master" in flags, "fail" in flags or "fail?" in flags,
                                      None if f[3] == "-" else f[3], tuple(slots)))
            return views
        raise BenchError(f"{self.name}: no node answers CLUSTER NODES")

    def masters(self) -> dict[int, tuple[tuple[int, int], ...]]:
        """Port -> slot ranges of every master that holds slots and is not failed."""
        return {v.port: v.slots for v in self.view() if v.master and v.slots and not v.failed}

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def wait_promoted(self, dead: int, slots: tuple[tuple[int, int], ...],
                      within: float = 30.0) -> tuple[int, float]:
        """Poll until a node other than ``dead`` is master of ``slots``: its
        port and the time it was first seen so (every 50 ms)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                for port, held in self.masters().items():
                    if port != dead and set(slots) <= set(held):
                        return port, time.time()
            time.sleep(0.05)
        raise BenchError(f"{self.name}: no replica took over the slots of :{dead} "
                         f"within {within:.0f}s")

    def promoted_at(self, port: int) -> float | None:
        """When the node on ``port`` won its last failover election, by its own
        log (ms resolution, this host's clock), or None if it never did."""
        node = self.node(port)
        if node.child is None:
            return None
        won = [line for line in node.child.log_tail(10_000).splitlines()
               if "Failover election won" in line]
        if not won:
            return None
        # "<pid>:S 01 Dec 2026 05:18:27.156 # Failover election won: ..."
        stamp = " ".join(won[-1].split()[1:5])
        return dt.datetime.strptime(stamp, "%d %b %Y %H:%M:%S.%f").timestamp()

    def wait_ok(self, within: float = 30.0) -> None:
        """Every live node says ok, every slot has a master, every replica is in sync."""
        deadline = time.monotonic() + within
        state = "not checked"
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.child is not None and n.child.alive()]
            infos = [redis_cli(n.port, "CLUSTER", "INFO", timeout=2) for n in live]
            repl = [redis_cli(n.port, "INFO", "replication", timeout=2) for n in live]
            covered = sum(hi - lo + 1 for ranges in self._masters_or_empty().values()
                          for lo, hi in ranges)
            synced = all("role:master" in r or "master_link_status:up" in r for r in repl)
            if all("cluster_state:ok" in i for i in infos) and covered == 16384 and synced:
                return
            state = f"slots covered {covered}, replicas in sync {synced}"
            time.sleep(0.1)
        raise BenchError(f"{self.name}: not ok after {within:.0f}s ({state})")

    def _masters_or_empty(self) -> dict[int, tuple[tuple[int, int], ...]]:
        try:
            return self.masters()
        except (BenchError, subprocess.TimeoutExpired):
            return {}
