"""`serve --workers N`: one supervisor and N worker processes on one port.

One gateway process uses one core. Each worker here is a whole gateway
(its own event loop, store connection, scheduler, live connections)
binding the listen port with SO_REUSEPORT, so the kernel spreads new
connections over them. Their state is shared through Redis only, which is
why more than one worker needs `--redis`.

The supervisor holds no client traffic. It serves the admin port: one
/metrics for all workers (metrics_merge.py), /healthz and /readyz from the
workers' own answers. Each worker's admin app listens on a private socket
(an abstract Unix socket on Linux: nothing on the filesystem, which may be
read-only). Signals: SIGTERM/SIGINT drain every worker (forwarded; killed
after the grace), SIGHUP reloads the policy in every worker. A worker that
dies is replaced and counted.

Policy: workers take the policy text from the supervisor, which follows
the file as a worker does (a changed file that validates replaces it). A
worker started after the file turned invalid so runs what its siblings
run, not what the file says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import pickle
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from . import metrics_merge
from .errors import PolicyError
from .metrics_merge import Families, Family, Merger
from .policy import load_policy, parse_policy, relative_reader
from .reloading import file_stamp
from .settings import Settings

log = logging.getLogger("tutorgate.workers")

MAX_WORKERS = 256
START_TIMEOUT = 30.0       # seconds for every worker to answer /healthz at start
PROBE_TIMEOUT = 2.0        # one worker's admin answer, per scrape or probe
KILL_MARGIN = 5.0          # past the drain grace before SIGKILL
# A dead worker is replaced after the first delay; one that dies again soon
# (within STABLE seconds of its start) waits twice as long, up to the last.
BACKOFF = (0.2, 10.0)
STABLE = 30.0
_PR_SET_PDEATHSIG = 1


def parse_workers(value: str | None) -> int:
    """--workers / TUTORGATE_WORKERS; ValueError with the reason."""
    if value is None:
        return 1
    if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise ValueError(f"--workers (TUTORGATE_WORKERS) must be a whole number from 1 to "
                         f"{MAX_WORKERS}, got {value!r}")
    return int(value)


def workers_problem(workers: int, redis_url: str | None) -> str | None:
    """Why this many workers cannot run, or None (shared by serve and authz)."""
    if workers > 1 and not redis_url:
        return ("--workers above 1 needs --redis: in memory mode each process would keep "
                "its own lesson clocks, and a student could start a new lesson on each")
    return None


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs, sent pickled on its stdin (the secret
    must not appear in its argv or environment listing)."""

    settings: Settings
    index: int
    supervisor: int
    policy_text: str
    log_level: str
    log_format: str


@dataclass(eq=False)
class Slot:
    """One worker position: its current process and its history."""

    index: int
    socket: str
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF[0]
    up: bool = False                       # answered its last probe or scrape
    # its current process's last scraped exposition, and that process
    last: tuple[asyncio.subprocess.Process, Families] | None = None
    session: aiohttp.ClientSession | None = None
    watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class _Snapshot(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


class PolicyFollower:
    """The policy text workers start with: the file's, while it validates."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.text = Path(path).read_text(encoding="utf-8")
        self.stamp = file_stamp(self.path)

    def refresh(self) -> None:
        stamp = file_stamp(self.path)
        if stamp is None or stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            load_policy(self.path)  # the workers log the problems themselves
            self.text = Path(self.path).read_text(encoding="utf-8")
        except (PolicyError, OSError, ValueError):
            pass


class Supervisor:
    def __init__(self, settings: Settings, workers: int, *, log_level: str = "INFO",
                 log_format: str = "text") -> None:
        self.settings = settings
        self.log_level = log_level
        self.log_format = log_format
        self.policy = PolicyFollower(settings.policy_path)
        self.merger = Merger()
        self.stopping = False
        self.stop = asyncio.Event()
        token = f"tutorgate-{os.getpid()}-{secrets.token_hex(4)}"
        self._tmpdir: str | None = None
        if sys.platform.startswith("linux"):
            base = "\0" + token  # abstract namespace: no file to create or clean up
        else:  # pragma: no cover - SO_REUSEPORT balancing is Linux's anyway
            self._tmpdir = tempfile.mkdtemp(prefix=token)
            base = os.path.join(self._tmpdir, "w")
        self.slots = [Slot(i, f"{base}-{i}.sock") for i in range(workers)]

    # ------------------------------------------------------------ processes

    def _spec(self, slot: Slot) -> WorkerSpec:
        s = self.settings
        worker = dataclasses.replace(s, reuse_port=True, admin_socket=slot.socket,
                                     instance=f"{s.instance_name}/w{slot.index}")
        return WorkerSpec(worker, slot.index, os.getpid(), self.policy.text, self.log_level,
                          self.log_format)

    async def _spawn(self, slot: Slot) -> None:
        self.policy.refresh()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.workers", stdin=asyncio.subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self._spec(slot)))
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        slot.proc, slot.started, slot.up, slot.last = proc, time.monotonic(), False, None
        log.info("worker %d started (pid %d)", slot.index, proc.pid)

    async def _watch(self, slot: Slot) -> None:
        """Replace the slot's worker whenever it exits, until the drain."""
        while True:
            proc = slot.proc
            assert proc is not None
            rc = await proc.wait()
            slot.up = False
            if slot.last is not None and slot.last[0] is proc:
                self.merger.retire(slot.last[1])  # its counts stay in the sums
                slot.last = None
            if self.stopping:
                return
            lived = time.monotonic() - slot.started
            if lived >= STABLE:
                slot.backoff = BACKOFF[0]
            delay, slot.backoff = slot.backoff, min(slot.backoff * 2, BACKOFF[1])
            slot.restarts += 1
            log.warning("worker %d (pid %d) exited with %s after %.1fs; replacing it in %.1fs",
                        slot.index, proc.pid, _exit_text(rc), lived, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            await self._spawn(slot)

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.running():
                assert slot.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    def _reload(self) -> None:
        log.info("SIGHUP: reloading the policy in every worker")
        self.policy.refresh()
        self._signal_all(signal.SIGHUP)

    # ------------------------------------------------------------ talking to workers

    def _session(self, slot: Slot) -> aiohttp.ClientSession:
        if slot.session is None:
            # no keep-alive: a replaced worker must not be reached on a dead connection
            conn = aiohttp.UnixConnector(path=slot.socket, force_close=True)
            slot.session = aiohttp.ClientSession(
                connector=conn, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT))
        return slot.session

    async def _get(self, slot: Slot, path: str) -> tuple[int, bytes] | None:
        if not slot.running():
            return None
        try:
            async with self._session(slot).get(f"http://worker{path}") as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _probe(self, path: str) -> list[tuple[int, bytes] | None]:
        answers = await asyncio.gather(*(self._get(s, path) for s in self.slots))
        if path == "/healthz":
            for slot, a in zip(self.slots, answers, strict=True):
                slot.up = a is not None and a[0] == 200
        return list(answers)

    async def _scrape(self, slot: Slot) -> None:
        proc = slot.proc
        got = await self._get(slot, "/metrics")
        if got is None or got[0] != 200:
            slot.up = False
            return  # its last exposition stands in: the sums must not dip
        try:
            families = metrics_merge.parse(got[1].decode())
        except ValueError:
            log.exception("worker %d served unreadable metrics", slot.index)
            return
        # a process that has exited meanwhile was (or is being) retired
        if slot.proc is proc and proc is not None and proc.returncode is None:
            slot.last, slot.up = (proc, families), True

    # ------------------------------------------------------------ admin app

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while at least one worker serves the port: a replaced worker
        is the supervisor's business, not a reason to restart the pod."""
        await self._probe("/healthz")
        up = sum(s.up for s in self.slots)
        body = {"status": "ok" if up else "down", "workers": self._workers()}
        return web.json_response(body, status=200 if up else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when some worker is ready and none finds the store down;
        503 while draining."""
        answers = await self._probe("/readyz")
        ready, store_down = 0, False
        for a in answers:
            if a is None:
                continue
            with contextlib.suppress(ValueError):
                if json.loads(a[1]).get("store_ok") is False:
                    store_down = True
            ready += a[0] == 200
        ok = ready > 0 and not store_down and not self.stopping
        body = {"ready_workers": ready, "store_ok": not store_down, "draining": self.stopping,
                "workers": self._workers()}
        return web.json_response(body, status=200 if ok else 503)

    def _workers(self) -> list[dict[str, Any]]:
        return [{"worker": s.index, "pid": s.pid, "up": s.up, "restarts": s.restarts}
                for s in self.slots]

    async def metrics_view(self, request: web.Request) -> web.Response:
        await asyncio.gather(*(self._scrape(s) for s in self.slots))
        merged = self.merger.merge(s.last[1] for s in self.slots if s.last is not None)
        merged.update(self._own_families())
        snapshot = _Snapshot(list(metrics_merge.to_metrics(merged)))
        return web.Response(body=generate_latest(snapshot),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _own_families(self) -> Families:
        """The supervisor's own series, one per worker slot (bounded by N)."""
        def fam(name: str, doc: str, typ: str, sample: str,
                value: Any) -> tuple[str, Family]:
            f = Family(name, doc, typ)
            for s in self.slots:
                f.samples[(sample, (("worker", str(s.index)),))] = float(value(s))
            return name, f

        out: Families = dict([
            fam("tutorgate_worker_up", "1 when the worker process answered the last scrape.",
                "gauge", "tutorgate_worker_up", lambda s: s.up),
            fam("tutorgate_worker_restarts", "Worker processes that exited and were replaced.",
                "counter", "tutorgate_worker_restarts_total", lambda s: s.restarts),
            fam("tutorgate_worker_decisions",
                "tutorgate_decisions_total of the worker's current process (it restarts "
                "from 0 with the process): how connections spread over the workers.",
                "counter", "tutorgate_worker_decisions_total",
                lambda s: metrics_merge.total(s.last[1], "tutorgate_decisions_total")
                if s.last is not None else 0.0),
        ])
        workers = Family("tutorgate_workers", "Worker processes configured (--workers).",
                         "gauge", {("tutorgate_workers", ()): float(len(self.slots))})
        out["tutorgate_workers"] = workers
        return out

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_view)
        return app

    # ------------------------------------------------------------ lifetime

    async def _started(self) -> int | None:
        """Wait until every worker answers /healthz; an exit code if one
        exits first (it could not listen, say), None when all are up."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for slot in self.slots:
                assert slot.proc is not None
                if slot.proc.returncode is not None:
                    return slot.proc.returncode or 1
            await self._probe("/healthz")
            if all(s.up for s in self.slots):
                return None
            if time.monotonic() > deadline:
                log.error("not every worker answered within %.0fs; serving with %d of %d",
                          START_TIMEOUT, sum(s.up for s in self.slots), len(self.slots))
                return None
            await asyncio.sleep(0.05)

    async def run(self) -> int:
        s = self.settings
        runner = web.AppRunner(self.admin_app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            # the admin port first: a taken port fails before any worker starts
            await web.TCPSite(runner, *s.admin_listen, reuse_address=True).start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            for slot in self.slots:
                await self._spawn(slot)
            failed = await self._started()
            if failed is not None:
                log.error("a worker exited while starting (%s): stopping", _exit_text(failed))
                await self._drain()
                return failed if failed > 0 else 1
            for slot in self.slots:
                slot.watcher = asyncio.create_task(self._watch(slot))
            log.info("%d workers serving http://%s:%d (SO_REUSEPORT); admin http://%s:%d "
                     "serves them all", len(self.slots), *s.listen, *s.admin_listen)
            await self.stop.wait()
            log.info("shutting down: draining %d workers for up to %.0fs", len(self.slots),
                     s.grace)
            await self._drain()
            return 0
        finally:
            for slot in self.slots:
                if slot.session is not None:
                    await slot.session.close()
            await runner.cleanup()
            if self._tmpdir is not None:  # pragma: no cover - not Linux
                import shutil
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _drain(self) -> None:
        """SIGTERM to every worker (each drains as a single gateway does),
        SIGKILL to those still running after the grace."""
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        procs = [s.proc for s in self.slots if s.proc is not None]
        waits = asyncio.gather(*(p.wait() for p in procs))
        try:
            await asyncio.wait_for(asyncio.shield(waits), self.settings.grace + KILL_MARGIN)
        except TimeoutError:
            log.error("workers still running after the grace: killing them")
            self._signal_all(signal.SIGKILL)
            await waits
        for slot in self.slots:
            if slot.watcher is not None:
                await asyncio.gather(slot.watcher, return_exceptions=True)


def _exit_text(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"status {rc}"


def supervise(settings: Settings, workers: int, *, log_level: str = "INFO",
              log_format: str = "text") -> int:
    """Run the supervisor until SIGTERM; its exit status."""
    sup = Supervisor(settings, workers, log_level=log_level, log_format=log_format)
    return asyncio.run(sup.run())


# ---------------------------------------------------------------- a worker process

def _die_with(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies, even by SIGKILL: an
    orphan would keep serving the port with nobody to scrape or stop it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        sys.exit(1)


def worker_main() -> int:
    """One worker: a gateway on the shared port, driven by its supervisor."""
    # Until serve() installs its handlers, a forwarded SIGHUP must not kill
    # the worker (the file watch applies the change within a second).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    _die_with(spec.supervisor)
    from . import logs
    from .app import serve
    from .eventloop import use_uvloop

    s = spec.settings
    logs.setup(spec.log_level, "json" if spec.log_format == "json" else "text",
               s.instance_name)
    policy = parse_policy(spec.policy_text, s.policy_path,
                          relative_reader(Path(s.policy_path).parent), os.environ.get)
    use_uvloop()
    try:
        return asyncio.run(serve(s, policy))
    except OSError as e:
        print(f"tutorgate: worker {spec.index}: cannot listen: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(worker_main())
