"""APScheduler jobs: the curfew cut, lease renewal, calendar and policy upkeep.

Per-connection deadlines live in the event loop (live.py); the scheduler
runs the few fleet-level timed jobs. Every job is wrapped so a failure is
logged and counted (`tutorgate_scheduler_job_failures_total{job}`) and never
kills the scheduler.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .metrics import Metrics
from .policy import Policy

log = logging.getLogger("tutorgate.scheduler")

Job = Callable[[], Awaitable[None]]


class Scheduler:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.aps = AsyncIOScheduler(job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 30})

    def _guard(self, name: str, job: Job) -> Job:
        @functools.wraps(job)
        async def run() -> None:
            try:
                await job()
            except Exception:
                self.metrics.scheduler_failures.labels(name).inc()
                log.exception("scheduled job %s failed", name)
        return run

    def every(self, name: str, seconds: float, job: Job) -> None:
        self.aps.add_job(self._guard(name, job), IntervalTrigger(seconds=seconds), id=name,
                         name=name, replace_existing=True)

    def daily(self, name: str, hour: int, minute: int, second: int, tz: str, job: Job) -> None:
        self.aps.add_job(self._guard(name, job),
                         CronTrigger(hour=hour, minute=minute, second=second, timezone=tz),
                         id=name, name=name, replace_existing=True, misfire_grace_time=5)

    def set_curfew_jobs(self, policy: Policy, job: Job) -> None:
        """One cron job per distinct (time zone, curfew start) of the policy's
        profiles; replaced whole on every reload."""
        for j in self.aps.get_jobs():
            if j.id.startswith("curfew-cut:"):
                j.remove()
        seen = {(p.tz.key, p.curfew_start) for p in policy.profiles.values()}
        for tz, start in sorted(seen, key=lambda x: (x[0], x[1].isoformat())):
            self.daily(f"curfew-cut:{tz}:{start.isoformat()}", start.hour, start.minute,
                       start.second, tz, job)

    def start(self) -> None:
        self.aps.start()

    def shutdown(self) -> None:
        if self.aps.running:
            self.aps.shutdown(wait=False)
