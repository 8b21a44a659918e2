"""Wiring: the one place that knows every part.

`Gateway` owns each resource's lifetime through the main app's
`cleanup_ctx`, one context per resource (state store, upstream session,
audit writer, policy follower, scheduler), so a resource that fails to
start releases those started before it. It exposes the main and admin
aiohttp applications and applies policy reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import logs, rules
from .activity import ActivityView
from .audit import AuditWriter
from .authz import AUTHZ_PATH, DENIAL_PATH, Authz
from .clock import lesson_deadline
from .codes import Rule
from .enforcement import Enforcer, Runtime
from .errors import StoreUnavailable
from .fleet import follow
from .forwarding import Forwarder
from .identity import Identify, Pseudonymizer, make_identify
from .lessons import LessonBook
from .live import LiveConn, LiveRegistry
from .metrics import Metrics
from .policy import Policy, load_policy
from .proxy import Proxy
from .redis import RedisClient
from .reloading import PolicySource
from .scheduler import Scheduler
from .server import (
    ConnGuard,
    ConnLimits,
    GuardedRunner,
    default_max_connections,
    raise_open_files_limit,
)
from .settings import Settings
from .status import student_status
from .store.base import Cut, StateStore
from .store.memory import MemoryStore

log = logging.getLogger("tutorgate")

STATUS_PATH = "/_tutorgate/status"
# First-generation collection threshold while serving (see tune_gc).
GC_THRESHOLD = 50_000

Lifetime = Callable[[web.Application], AsyncIterator[None]]


def make_store(settings: Settings, metrics: Metrics) -> tuple[StateStore, RedisClient | None]:
    """The state store the settings ask for, and the Redis client under it
    (None in memory mode), reporting every call to the metrics."""
    if not settings.redis_url:
        return MemoryStore(), None
    from .store.redis import RedisStore

    up: list[bool | None] = [None]

    def on_call(op: str, seconds: float, ok: bool) -> None:
        metrics.store_latency.labels(op).observe(seconds)
        if not ok:
            metrics.store_errors.labels(op).inc()
        if ok is not up[0]:  # a gauge set takes a lock: only on a change
            up[0] = ok
            metrics.store_up.set(1 if ok else 0)

    client = RedisClient(settings.redis_url, on_call=on_call)
    return RedisStore(client), client


class Gateway:
    def __init__(self, settings: Settings, policy: Policy, *, store: StateStore | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        secret = settings.id_secret or os.urandom(32)
        self.pseudonym = Pseudonymizer(secret)
        # the one Redis client every Redis user of this process shares
        self.redis: RedisClient | None = None
        if store is None:
            store, self.redis = make_store(settings, self.metrics)
        self.store = store
        # the one clock every deadline of this process is computed on
        self.clock = self.store.clock
        self.live = LiveRegistry(self.store, self.metrics, self.clock)
        self.activity = ActivityView(self.clock.now)
        self.policy_dir = Path(settings.policy_path).parent if settings.policy_path else None
        self.runtime = Runtime(policy, make_identify(policy.identity, self.pseudonym,
                                                     self.policy_dir))
        self.lessons = LessonBook(self.store, self.metrics, self.clock, self.activity)
        self.enforcer = Enforcer(self.runtime, self.store, self.metrics, self.live,
                                 self.activity, self.lessons)
        self.forwarder = Forwarder(settings.upstream, self.metrics, self.live,
                                   lambda: self.runtime.policy.locale,
                                   max_body=settings.max_body, read_timeout=settings.read_timeout)
        self.proxy = Proxy(self.enforcer, self.forwarder)
        self.authz = Authz(self.enforcer, self.metrics)
        self.scheduler = Scheduler(self.metrics)
        self.metrics.calendar_provisional.set_function(self.calendar_provisional)
        self.audit: AuditWriter | None = None
        if settings.redis_url:
            self.audit = AuditWriter(self.redis or settings.redis_url, settings.instance_name,
                                     self.metrics, policy.model.timezone,
                                     settings.audit_retention_days, clock=self.clock)
            self.enforcer.on_event = self.lessons.on_event = self.audit.record
            self.live.on_cut_event = self._audit_cut
        self.source = PolicySource(settings.policy_path, self.policy_dir, self.pseudonym,
                                   self.metrics, lambda: self.policy, self.apply_policy)
        self._stop_follow = asyncio.Event()
        self.ready = False
        self.metrics.active_lessons.set_function(self.activity.active_lessons)
        self.metrics.students_in_break.set_function(self.activity.students_in_break)
        self._show_policy(policy)

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
        self.enforcer.rt = self.runtime
        self._show_policy(policy)
        self.metrics.policy_reloads.inc()
        if self.scheduler.aps.running:
            self.scheduler.set_curfew_jobs(policy, self.curfew_cut)
        log.info("policy applied: version=%s sha=%s", policy.version, policy.sha)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self.reschedule_live())

    def reload_file(self) -> bool:
        """Read the policy file again (SIGHUP): applied if valid."""
        return self.source.reload_file()

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
                rule = Rule.CURFEW if pre.rule == Rule.CURFEW else Rule.POLICY
                await self.store.publish_cut(Cut(key, rule, self.settings.instance_name))
                continue
            d = lesson_deadline(state, now, pre.limits, pre.day, pre.until_curfew)
            for c in list(conns):
                self.live.schedule(c, d.at, d.rule)

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
                await self.live.cut(conn, Rule.CURFEW, late_of=None)

    async def calendar_upkeep(self) -> None:
        policy = self.policy
        self._show_policy(policy)
        if not any(p.calendar.statutory_holidays for p in policy.profiles.values()):
            return
        # today on the lesson clock's clock, not the host's
        today = dt.datetime.fromtimestamp(self.clock.now(), policy.profile(None, None).tz).date()
        warning = policy.national.coverage_warning(today)
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

    # ------------------------------------------------------------ lifetimes

    def lifetimes(self) -> list[Lifetime]:
        """One cleanup context per resource, in starting order."""
        return [self._store_lifetime, self._upstream_lifetime, self._audit_lifetime,
                self._follower_lifetime, self._scheduler_lifetime]

    async def _store_lifetime(self, app: web.Application) -> AsyncIterator[None]:
        start = getattr(self.store, "start", None)
        if start is not None:
            await start()
        try:
            await self.store.subscribe_cuts(self.live.on_cut)
            # store_up starts from a real answer, not from the first lesson request
            try:
                self.metrics.store_up.set(1 if await self.store.ping() else 0)
            except StoreUnavailable:
                self.metrics.store_up.set(0)
            yield
        finally:
            await self.store.close()
            if self.redis is not None:  # shared by the store, audit and follower
                await self.redis.close()

    async def _upstream_lifetime(self, app: web.Application) -> AsyncIterator[None]:
        if not self.settings.upstream:  # `tutorgate authz` asks no upstream
            yield
            return
        await self.forwarder.start(self.settings.pool_size)
        try:
            yield
        finally:
            # the live connections ride on the upstream session
            await self.live.close_all(Rule.SHUTDOWN)
            await self.forwarder.close()

    async def _audit_lifetime(self, app: web.Application) -> AsyncIterator[None]:
        if self.audit is not None:
            await self.audit.start()
        try:
            yield
        finally:
            if self.audit is not None:
                await self.audit.close()

    async def _follower_lifetime(self, app: web.Application) -> AsyncIterator[None]:
        follower = None
        # a store given from outside (tests) leaves no shared client: one of
        # the follower's own, closed with it
        own = None if self.redis is not None or not self.settings.redis_url else \
            RedisClient(self.settings.redis_url)
        client = self.redis or own
        if client is not None:
            follower = asyncio.create_task(follow(client, self.source.apply_pushed,
                                                  self._stop_follow))
        try:
            yield
        finally:
            self._stop_follow.set()
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            if own is not None:
                await own.close()

    async def _scheduler_lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.scheduler.every("lease-renewal", 10, self.live.renew_leases)
        self.scheduler.every("policy-watch", 1, self.source.watch)
        self.scheduler.every("lesson-sweep", 15, self.lessons.sweep)
        self.scheduler.daily("calendar-upkeep", 0, 5, 0, self.policy.model.timezone,
                             self.calendar_upkeep)
        self.scheduler.set_curfew_jobs(self.policy, self.curfew_cut)
        self.scheduler.start()
        try:
            await self.calendar_upkeep()
            self.ready = True
            yield
        finally:
            self.ready = False
            self.scheduler.shutdown()

    def main_app(self) -> web.Application:
        # auto_decompress=False: gzip bodies pass through as they are (docs/design.md)
        app = web.Application(handler_args={"auto_decompress": False},
                              client_max_size=1024 ** 4)
        app[GATEWAY] = self
        app.cleanup_ctx.extend(self.lifetimes())
        app.router.add_route("GET", STATUS_PATH, self.status)
        self._authz_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.proxy.handle)
        return app

    def authz_app(self) -> web.Application:
        """`tutorgate authz`: the decision service alone, no upstream."""
        app = web.Application()
        app[GATEWAY] = self
        app.cleanup_ctx.extend(self.lifetimes())
        app.router.add_route("GET", STATUS_PATH, self.status)
        self._authz_routes(app)
        return app

    def _authz_routes(self, app: web.Application) -> None:
        app.router.add_route("*", AUTHZ_PATH, self.authz.check)
        app.router.add_route("*", AUTHZ_PATH + "/{tail:.*}", self.authz.check)
        app.router.add_route("GET", DENIAL_PATH, self.authz.render)

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
            self.main_app() if s.upstream else self.authz_app(),
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
        return await student_status(self.enforcer, request)


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


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
             *settings.listen, settings.upstream or "decisions only (authz)",
             *settings.admin_listen,
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
    await gw.live.close_all(Rule.SHUTDOWN)
    await main_runner.cleanup()
    await admin_runner.cleanup()
    return 0


__all__ = ["GATEWAY", "Gateway", "load_policy", "serve"]
