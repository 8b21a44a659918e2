"""Wiring: the one place that knows every part.

`Gateway` owns each resource's lifetime (state store, upstream session,
scheduler, policy watcher) through the main app's `cleanup_ctx`, exposes
the main and admin aiohttp applications, and applies policy reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import logs, rules
from .activity import ActivityView
from .audit import AuditWriter
from .clock import lesson_remaining
from .errors import PolicyError, StoreUnavailable
from .fleet import POLICY_KEY, follow
from .identity import Identify, Pseudonymizer, make_identify
from .live import LiveConn, LiveRegistry
from .metrics import Metrics
from .policy import (
    Policy,
    decode_text,
    load_policy,
    parse_policy,
    read_policy_text,
    relative_reader,
)
from .proxy import Proxy, Runtime
from .scheduler import Scheduler
from .server import (
    ConnGuard,
    ConnLimits,
    GuardedRunner,
    default_max_connections,
    raise_open_files_limit,
)
from .settings import Settings
from .store.base import Cut, StateStore
from .store.memory import MemoryStore

log = logging.getLogger("tutorgate")

STATUS_PATH = "/_tutorgate/status"
# First-generation collection threshold while serving (see tune_gc).
GC_THRESHOLD = 50_000


class Gateway:
    def __init__(self, settings: Settings, policy: Policy, *, store: StateStore | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        secret = settings.id_secret or os.urandom(32)
        self.pseudonym = Pseudonymizer(secret)
        self.store = store or self._make_store()
        # the one clock every deadline of this process is computed on
        self.clock = self.store.clock
        self.live = LiveRegistry(self.store, self.metrics, self.clock)
        self.activity = ActivityView(self.clock.now)
        self.policy_dir = Path(settings.policy_path).parent if settings.policy_path else None
        self.runtime = Runtime(policy, make_identify(policy.identity, self.pseudonym,
                                                     self.policy_dir))
        self.proxy = Proxy(self.runtime, self.store, self.metrics, self.live, self.activity,
                           settings.upstream, max_body=settings.max_body,
                           read_timeout=settings.read_timeout)
        self.scheduler = Scheduler(self.metrics)
        self.metrics.calendar_provisional.set_function(self.calendar_provisional)
        self.audit: AuditWriter | None = None
        if settings.redis_url:
            self.audit = AuditWriter(settings.redis_url, settings.instance_name, self.metrics,
                                     policy.model.timezone, settings.audit_retention_days,
                                     clock=self.clock)
            self.proxy.on_event = self.audit.record
            self.live.on_cut_event = self._audit_cut
        self._policy_stamp = self._stamp()
        # when the live policy was written: the newer of file and fleet push wins
        self._policy_time = self._policy_stamp[0] if self._policy_stamp else 0.0
        self._stop_follow = asyncio.Event()
        self.ready = False
        self.metrics.active_lessons.set_function(self.activity.active_lessons)
        self.metrics.students_in_break.set_function(self.activity.students_in_break)
        self._show_policy(policy)

    def _make_store(self) -> StateStore:
        if self.settings.redis_url:
            from .store.redis import RedisStore

            latency: dict[str, Any] = {}
            up: list[bool | None] = [None]

            def on_call(op: str, seconds: float, ok: bool) -> None:
                child = latency.get(op)
                if child is None:  # labels() per call costs a lock and a lookup
                    child = latency[op] = self.metrics.store_latency.labels(op)
                child.observe(seconds)
                if not ok:
                    self.metrics.store_errors.labels(op).inc()
                if ok is not up[0]:  # a gauge set takes a lock: only on a change
                    up[0] = ok
                    self.metrics.store_up.set(1 if ok else 0)

            return RedisStore(self.settings.redis_url, on_call=on_call)
        return MemoryStore()

    # ------------------------------------------------------------ policy

    @property
    def policy(self) -> Policy:
        return self.runtime.policy

    def _audit_cut(self, conn: LiveConn, rule: str) -> None:
        if self.audit is None:
            return
        region = "base"
        if conn.student is not None:
            region = self.policy.profile(conn.student.region, None).region
        category = conn.route.category if conn.route is not None else "none"
        self.audit.record("cut", conn.key, rule, category, region)

    def _show_policy(self, policy: Policy) -> None:
        self.metrics.prime(policy.region_labels(), sorted(policy.shadow))
        if self.audit is not None:
            self.audit.policy_version = f"{policy.version}/{policy.sha}"
        self.metrics.policy_info.clear()
        self.metrics.policy_info.labels(str(policy.version), policy.sha).set(1)
        until = policy.national.covered_until + dt.timedelta(days=1)
        self.metrics.calendar_covered_until.set(
            dt.datetime.combine(until, dt.time(0), tzinfo=dt.UTC).timestamp())

    def apply_policy(self, policy: Policy, identify: Identify | None = None) -> None:
        """Swap the live policy: the next decision uses it. Open connections
        get deadlines under it (reschedule_live)."""
        if identify is None:
            identify = make_identify(policy.identity, self.pseudonym, self.policy_dir)
        self.runtime = Runtime(policy, identify)
        self.proxy.rt = self.runtime
        self._show_policy(policy)
        self.metrics.policy_reloads.inc()
        if self.scheduler.aps.running:
            self.scheduler.set_curfew_jobs(policy, self.curfew_cut)
        log.info("policy applied: version=%s sha=%s", policy.version, policy.sha)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self.reschedule_live())

    def reload_text(self, text: str, source: str) -> bool:
        """Validate and apply; an invalid policy is refused and counted, and
        the old one stays live."""
        try:
            # what it names (key variables and files, calendar files) is
            # checked here too: a reload must not fail after it was accepted
            policy = parse_policy(text, source, relative_reader(self.policy_dir or Path(".")),
                                  os.environ.get)
            if policy.sha == self.policy.sha:
                return True
            try:
                identify = make_identify(policy.identity, self.pseudonym, self.policy_dir)
            except (OSError, ValueError) as e:  # the key changed since the check
                raise PolicyError(source, [("identity.jwt", f"cannot load the key: {e}",
                                            None)]) from None
        except PolicyError as e:
            self.refuse(e)
            return False
        self.apply_policy(policy, identify)
        return True

    def refuse(self, e: PolicyError) -> None:
        """A policy that is not applied: counted, one ERROR line per problem."""
        self.metrics.policy_reload_failures.inc()
        for line in e.lines():
            log.error("policy reload refused: %s", line)

    def reload_file(self) -> bool:
        path = self.settings.policy_path
        try:
            text = read_policy_text(path)
        except PolicyError as e:
            self.refuse(e)
            return False
        return self.reload_text(text, path)

    def _stamp(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.settings.policy_path)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    async def watch_policy(self) -> None:
        stamp = self._stamp()
        if stamp is not None and stamp != self._policy_stamp:
            self._policy_stamp = stamp
            self._policy_time = max(self._policy_time, stamp[0])
            self.reload_file()

    def apply_pushed(self, raw: bytes, pushed_at: float) -> None:
        """A policy published with `tutorgate policy push` (fleet-wide).
        Anything may be in Redis: a text that is not UTF-8 is refused and
        counted like any invalid policy."""
        if pushed_at <= self._policy_time:
            return
        self._policy_time = pushed_at
        source = "redis:" + POLICY_KEY
        try:
            text = decode_text(raw, "the pushed policy")
        except ValueError as e:
            self.refuse(PolicyError(source, [("", str(e), None)]))
            return
        self.reload_text(text, source)

    async def reschedule_live(self) -> None:
        """Recompute every open lesson connection's deadline under the live
        policy and the shared clock; cut those the policy now forbids."""
        policy = self.policy
        for key in list(self.live.by_key):
            conns = self.live.by_key.get(key)
            if not conns:
                continue
            sample = next(iter(conns))
            if sample.student is None or sample.route is None:
                continue
            try:
                state, now = await self.store.peek(key)
            except StoreUnavailable:
                return
            pre = rules.precheck(policy, sample.route, sample.student, now)
            if isinstance(pre, rules.Decision):
                rule = "curfew" if pre.rule == rules.CURFEW else "policy"
                await self.store.publish_cut(Cut(key, rule, self.settings.instance_name))
                continue
            deadline = now + lesson_remaining(state, now, pre.limits, pre.day)
            rule = "lesson_limit"
            if deadline < state.start + pre.limits.max_duration - 1e-6:
                rule = "daily_limit"  # the day's limit comes first
            if now + pre.until_curfew < deadline:
                deadline, rule = now + pre.until_curfew, "curfew"
            for c in list(conns):
                self.live.schedule(c, deadline, rule)

    # ------------------------------------------------------------ timed work

    async def curfew_cut(self) -> None:
        """Backstop for the per-connection timers: at a curfew start, cut
        every connection whose profile is now inside its curfew."""
        now = self.clock.now()
        for conn in self.live.all():
            if conn.student is None:
                continue
            profile = self.policy.profile(conn.student.region, None)
            inside, _, _ = rules.curfew_times(profile, now)
            if inside:
                await self.live.cut(conn, "curfew", late_of=None)

    async def calendar_upkeep(self) -> None:
        policy = self.policy
        self._show_policy(policy)
        if not any(p.calendar.statutory_holidays for p in policy.profiles.values()):
            return
        warning = policy.national.coverage_warning(dt.date.today())
        if warning is not None:
            log.warning("%s", warning)

    def calendar_provisional(self) -> float:
        """1 while some profile's local today lies beyond the official calendar
        data, so its rest-day decisions rest on the law's fallback (read at
        scrape time: no job has to run at midnight)."""
        now = self.clock.now()
        for p in self.policy.profiles.values():
            if not p.calendar.covers(dt.datetime.fromtimestamp(now, p.tz).date()):
                return 1.0
        return 0.0

    # ------------------------------------------------------------ apps

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        start = getattr(self.store, "start", None)
        if start is not None:
            await start()
        await self.proxy.start(self.settings.pool_size)
        await self.store.subscribe_cuts(self.live.on_cut)
        follower = None
        if self.settings.redis_url:
            follower = asyncio.create_task(
                follow(self.settings.redis_url, self.apply_pushed, self._stop_follow))
        if self.audit is not None:
            await self.audit.start()
        self.scheduler.every("lease-renewal", 10, self.live.renew_leases)
        self.scheduler.every("policy-watch", 1, self.watch_policy)
        self.scheduler.every("lesson-sweep", 15, self.proxy.sweep_ended)
        self.scheduler.daily("calendar-upkeep", 0, 5, 0, self.policy.model.timezone,
                             self.calendar_upkeep)
        self.scheduler.set_curfew_jobs(self.policy, self.curfew_cut)
        self.scheduler.start()
        await self.calendar_upkeep()
        # store_up starts from a real answer, not from the first lesson request
        try:
            self.metrics.store_up.set(1 if await self.store.ping() else 0)
        except StoreUnavailable:
            self.metrics.store_up.set(0)
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            self.scheduler.shutdown()
            self._stop_follow.set()
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            await self.live.close_all("shutdown")
            if self.audit is not None:
                await self.audit.close()
            await self.proxy.close()
            await self.store.close()

    def main_app(self) -> web.Application:
        # auto_decompress=False: gzip bodies pass through as they are (docs/design.md)
        app = web.Application(handler_args={"auto_decompress": False},
                              client_max_size=1024 ** 4)
        app.cleanup_ctx.append(self._lifetime)
        app.on_response_prepare.append(_stamp_request_id)
        app.router.add_route("GET", STATUS_PATH, self.status)
        app.router.add_route("*", "/{tail:.*}", self.proxy.handle)
        return app

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_view)
        return app

    def runners(self, max_connections: int | None) -> tuple[web.AppRunner, web.AppRunner]:
        """The main and admin runners, with slow and surplus clients closed
        (server.py). Only the main port is capped: the admin port must keep
        answering while the main one is full."""
        s = self.settings
        main = GuardedRunner(
            self.main_app(),
            ConnGuard(ConnLimits(s.header_timeout, s.keepalive_timeout, max_connections),
                      self.metrics),
            access_log=logging.getLogger(logs.ACCESS_LOGGER) if s.access_log else None,
            access_log_class=logs.AccessLog, shutdown_timeout=s.grace, handle_signals=False)
        self.metrics.client_connections.set_function(lambda: len(main.guard.open))
        admin = GuardedRunner(
            self.admin_app(), ConnGuard(ConnLimits(s.header_timeout, s.keepalive_timeout)),
            access_log=None, handle_signals=False)
        return main, admin

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        try:
            ok = await asyncio.wait_for(self.store.ping(), 1.0)
        except (TimeoutError, StoreUnavailable):
            ok = False
        self.metrics.store_up.set(1 if ok else 0)
        body = {"store": self.store.kind, "store_ok": ok, "policy_sha": self.policy.sha}
        return web.json_response(body, status=200 if ok and self.ready else 503)

    async def metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        """The student's clock, for the platform's countdown UI."""
        from .status import student_status
        return await student_status(self, request)


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries the request id it was forwarded and logged with."""
    ctx = logs.current.get()
    if ctx is None:  # not through the proxy (the status endpoint)
        ctx = logs.begin_request(request.headers.get(logs.REQUEST_ID))
    response.headers[logs.REQUEST_ID] = ctx.request_id


def tune_gc() -> None:
    """Garbage collection for a server: most of a request's objects die by
    reference count when it ends, but the collector's default first
    threshold (700 allocations) runs mid-request under load, promotes what
    is in flight and traverses it again in older generations. Measured with
    bench/instructions.py that was about 6% of the gateway's instructions.
    A higher threshold lets requests finish first; freezing what startup
    built (modules, policy, metrics) keeps full collections off it."""
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, g1, g2)


async def serve(settings: Settings, policy: Policy) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    gw = Gateway(settings, policy)
    if gw.store.kind == "memory":
        log.info("state store: in process memory (one instance only; state is lost on exit; "
                 "no audit trail: it needs --redis)")
    else:
        log.info("state store: redis (shared by every instance on it)")
    before, open_files = raise_open_files_limit()
    cap = settings.max_connections or default_max_connections(open_files, settings.pool_size)
    log.info("open-files limit %d%s; up to %d client connections, request heads due "
             "within %gs, idle connections closed after %gs", open_files,
             f" (raised from {before})" if open_files != before else "", cap,
             settings.header_timeout, settings.keepalive_timeout)
    main_runner, admin_runner = gw.runners(cap)
    await main_runner.setup()
    await admin_runner.setup()
    main_site = web.TCPSite(main_runner, *settings.listen, backlog=1024, reuse_address=True,
                            reuse_port=settings.reuse_port or None)
    admin_site: web.BaseSite = web.TCPSite(admin_runner, *settings.admin_listen,
                                           reuse_address=True)
    if settings.admin_socket is not None:  # a worker: its supervisor scrapes it (workers.py)
        admin_site = web.UnixSite(admin_runner, settings.admin_socket)
    try:
        await main_site.start()
        await admin_site.start()
    except OSError:
        # Stop what setup started (the policy follower, the cut subscriber):
        # left to asyncio.run's teardown, the follower never ended and a
        # gateway that could not bind hung instead of exiting 1.
        await main_runner.cleanup()
        await admin_runner.cleanup()
        raise
    log.info("serving on http://%s:%d -> %s (admin http://%s:%d, policy %s sha=%s)",
             *settings.listen, settings.upstream, *settings.admin_listen,
             settings.policy_path, policy.sha)
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gw.reload_file)
    await stop.wait()
    log.info("shutting down: closing live connections (1001), draining for up to %.0fs",
             settings.grace)
    await gw.live.close_all("shutdown")
    await main_runner.cleanup()
    await admin_runner.cleanup()
    return 0


__all__ = ["Gateway", "load_policy", "serve"]
