"""The regulator's audit trail: a Redis Stream of enforcement events.

Events (lesson_start, lesson_end, deny, cut) carry the time, the student's
keyed hash (never the id), region, category, rule, policy version and the
gateway instance. They are buffered and written in pipelined batches a few
times a second, so the hot path gains no round trip; the stream is trimmed
by age (MINID) as it is written. `tutorgate audit export` and `audit report`
read it back for an inspection.

One server (or Sentinel) holds one stream, `tutorgate:audit`. On a cluster
one stream would be one hot key on one node, so each batch goes to the next
of SHARDS streams `tutorgate:audit:{0}`..`{15}` (their hash tags spread
them over the masters); export and report read every stream and merge them
by time. Writes go through the process's shared Redis client.

Under a state-store outage every lesson request is denied with
`state_unavailable`; one event each flooded the buffer (71.8k events, +78 MB,
a 0.8 s stall writing them back). Those denials are counted instead: one
`deny` event per (rule, category, region) and AGGREGATE_SECONDS, with `count`
and `interval` (seconds, starting at `time`) and no student. The buffer is
bounded in events and bytes (the oldest go first, counted in
`tutorgate_audit_dropped_total`), and a flush writes FLUSH_BATCH events per
pipeline, yielding to the event loop between pipelines.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import logging
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any
from zoneinfo import ZoneInfo

from .errors import StoreUnavailable
from .metrics import Metrics
from .redis import RedisClient
from .redis.resp import pack
from .timesource import Clock, SystemClock

log = logging.getLogger("tutorgate.audit")

STREAM = "tutorgate:audit"   # with the default prefix; see `streams`
SHARDS = 16
FIELDS = ("time", "event", "student", "rule", "category", "region", "policy_version",
          "instance", "duration", "break_seconds", "break_honoured", "count", "interval")
FLUSH_SECONDS = 0.25
# Denials counted per interval rather than recorded one by one.
AGGREGATED = frozenset({"state_unavailable"})
AGGREGATE_SECONDS = 1.0
# The buffer's bounds (Redis down for long): the oldest events are dropped.
MAX_BUFFER = 20_000
MAX_BUFFER_BYTES = 8 * 1024 * 1024
# Events per pipeline: a few ms of the loop's time to pack and to read back.
FLUSH_BATCH = 200


def _size(ev: dict[str, str]) -> int:
    # what the event costs: its text plus a dict's and its strings' overhead
    return 400 + sum(len(k) + len(v) for k, v in ev.items())
# What export and report call the student of an event that has none (a
# forbidden feature is denied before anyone is identified).
ANONYMOUS = "anonymous"
# A lesson_end matches a lesson_start when the start plus the length is no
# later than the end's record time plus this (the instance's clock and
# Redis's may differ a little).
CLOCK_SLACK = 1.0


class AuditWriter:
    """Buffers events and XADDs them in batches."""

    def __init__(self, redis: str | RedisClient, instance: str, metrics: Metrics,
                 tz: str = "Asia/Shanghai", retention_days: float = 180.0, *,
                 clock: Clock | None = None,
                 max_events: int = MAX_BUFFER, max_bytes: int = MAX_BUFFER_BYTES) -> None:
        self._target = redis
        self.instance = instance
        self.metrics = metrics
        self.tz = ZoneInfo(tz)
        self.clock: Clock = clock or SystemClock()
        self.retention_ms = int(retention_days * 86400 * 1000)
        self.policy_version = "1"
        self.max_events, self.max_bytes = max_events, max_bytes
        # (sequence number, event, size), oldest first
        self._buf: deque[tuple[int, dict[str, str], int]] = deque()
        self._bytes = 0
        self._seq = 0
        # (rule, category, region) -> count, since _agg_start
        self._agg: dict[tuple[str, str, str], int] = {}
        self._agg_start = 0.0
        self._redis: RedisClient | None = None
        self._streams: list[str] = []  # streams(prefix), once the client is known
        self._shard = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def _time(self, t: float) -> str:
        return dt.datetime.fromtimestamp(t, self.tz).isoformat(timespec="milliseconds")

    def record(self, event: str, student: str | None, rule: str | None, category: str,
               region: str, duration: float | None = None, at: float | None = None,
               break_seconds: float | None = None, break_honoured: bool | None = None) -> None:
        t = self.clock.now() if at is None else at
        if event == "deny" and rule in AGGREGATED:
            k = (rule, category, region)
            if not self._agg:
                self._agg_start = t
            self._agg[k] = self._agg.get(k, 0) + 1
            return
        ev = {
            "time": self._time(t),
            "event": event, "student": student or "", "rule": rule or "",
            "category": category, "region": region, "policy_version": self.policy_version,
            "instance": self.instance,
        }
        if duration is not None:
            ev["duration"] = f"{duration:.3f}"
        if break_seconds is not None:
            # the break before this lesson, and whether it was min_break long
            ev["break_seconds"] = f"{break_seconds:.3f}"
            ev["break_honoured"] = "true" if break_honoured else "false"
        self._push(ev)

    def _push(self, ev: dict[str, str]) -> None:
        size = _size(ev)
        while self._buf and (len(self._buf) >= self.max_events
                             or self._bytes + size > self.max_bytes):
            self._bytes -= self._buf.popleft()[2]
            self.metrics.audit_dropped.labels("buffer_full").inc()
            self.metrics.audit_failures.inc()
        self._seq += 1
        self._buf.append((self._seq, ev, size))
        self._bytes += size

    def roll(self, *, force: bool = False) -> None:
        """Turn the counted denials into events once their interval is over
        (or now, with `force`)."""
        if not self._agg:
            return
        now = self.clock.now()
        if not force and now - self._agg_start < AGGREGATE_SECONDS:
            return
        agg, self._agg = self._agg, {}
        when, interval = self._time(self._agg_start), f"{max(now - self._agg_start, 0.0):.3f}"
        for (rule, category, region), n in agg.items():
            self._push({"time": when, "event": "deny", "student": "", "rule": rule,
                        "category": category, "region": region,
                        "policy_version": self.policy_version, "instance": self.instance,
                        "count": str(n), "interval": interval})

    async def start(self) -> None:
        t = self._target
        self._redis = t if isinstance(t, RedisClient) else RedisClient(t, op_timeout=2.0)
        self._streams = streams(self._redis.prefix)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(FLUSH_SECONDS)
            self.roll()
            await self.flush()

    async def flush(self) -> None:
        """Write what is buffered, FLUSH_BATCH events per pipeline, yielding
        to the loop between pipelines. Events stay buffered until written."""
        while self._buf and self._redis is not None:
            batch = [self._buf[i] for i in range(min(FLUSH_BATCH, len(self._buf)))]
            minid = f"{int(self.clock.now() * 1000) - self.retention_ms}-0"
            key = self._stream()
            # exact MINID: "~" trims only whole stream nodes, so a small
            # stream would keep events past their retention
            cmds = [pack("XADD", key, "MINID", minid, "*",
                         *[x for kv in ev.items() for x in kv]) for _, ev, _ in batch]
            try:
                await self._redis.call(None, cmds, key)
            except StoreUnavailable as e:
                if not self._failing:  # once per outage, not every FLUSH_SECONDS
                    log.warning("audit events not written yet (%d buffered): %s",
                                len(self._buf), e)
                self._failing = True
                return
            if self._failing:
                self._failing = False
                log.info("audit stream reachable again; writing %d buffered events",
                         len(self._buf))
            # the bound may have dropped some of the batch meanwhile
            last = batch[-1][0]
            while self._buf and self._buf[0][0] <= last:
                self._bytes -= self._buf.popleft()[2]
            await asyncio.sleep(0)

    def _stream(self) -> str:
        """The stream of the next batch: the one stream, or on a cluster the
        next shard (named by `streams`, which export and report read)."""
        assert self._redis is not None
        if not self._redis.cluster:
            return self._streams[0]
        self._shard = (self._shard + 1) % SHARDS
        return self._streams[1 + self._shard]

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.roll(force=True)
        await self.flush()
        if self._buf:
            self.metrics.audit_dropped.labels("shutdown").inc(len(self._buf))
            self.metrics.audit_failures.inc(len(self._buf))
        if self._redis is not None and not isinstance(self._target, RedisClient):
            await self._redis.close()


# ---------------------------------------------------------------- reading

def _ms(value: str | None, default: str) -> str:
    if value is None:
        return default
    t = dt.datetime.fromisoformat(value)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return str(int(t.timestamp() * 1000))


def streams(prefix: str) -> list[str]:
    """Every stream an audit trail may be in: one server's, a cluster's shards."""
    return [prefix + "audit", *(f"{prefix}audit:{{{i}}}" for i in range(SHARDS))]


async def _pages(client: RedisClient, key: str, start: str,
                 end: str) -> AsyncIterator[tuple[tuple[int, int], dict[str, Any]]]:
    while True:
        page = await client.command(None, "XRANGE", key, start, end, "COUNT", "1000", key=key)
        if not page:
            return
        for eid, fields in page:
            ms, _, seq = eid.decode().partition("-")
            ev = _typed({fields[i].decode(): fields[i + 1].decode()
                         for i in range(0, len(fields), 2)})
            ev["id"] = eid.decode()
            yield (int(ms), int(seq or 0)), ev
        start = "(" + page[-1][0].decode()


async def read_events(client: RedisClient, since: str | None = None,
                      until: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """Events oldest first, every stream merged by time, in pages (the
    streams may be long)."""
    start, end = _ms(since, "-"), _ms(until, "+")
    heads: list[tuple[tuple[int, int], int, dict[str, Any], AsyncIterator[Any]]] = []
    for i, key in enumerate(streams(client.prefix)):
        it = _pages(client, key, start, end)
        first = await anext(it, None)
        if first is not None:
            heads.append((first[0], i, first[1], it))
    while heads:
        heads.sort(key=lambda h: (h[0], h[1]))
        _, i, ev, it = heads[0]
        yield ev
        nxt = await anext(it, None)
        if nxt is None:
            heads.pop(0)
        else:
            heads[0] = (nxt[0], i, nxt[1], it)


def _typed(ev: dict[str, Any]) -> dict[str, Any]:
    """An event as export prints it: numbers as numbers, empties as null."""
    ev["rule"] = ev.get("rule") or None
    ev["student"] = ev.get("student") or ANONYMOUS
    ev["duration"] = float(ev["duration"]) if ev.get("duration") else None
    ev["break_seconds"] = float(ev["break_seconds"]) if ev.get("break_seconds") else None
    ev["break_honoured"] = (ev["break_honoured"] == "true"
                            if ev.get("break_honoured") else None)
    # denials counted over an interval (an outage's state_unavailable)
    ev["count"] = int(ev["count"]) if ev.get("count") else None
    ev["interval"] = float(ev["interval"]) if ev.get("interval") else None
    return ev


def report(events: Iterable[dict[str, Any]], day: dt.date) -> dict[str, Any]:
    """A day's summary. `events` run oldest first and may reach beyond `day`
    either side: earlier starts pair with ends, later ends close the day's
    lessons."""
    lessons = 0
    durations: list[float] = []
    cuts: dict[str, int] = {}
    denials: dict[str, int] = {}
    anonymous = 0
    students: set[str] = set()
    breaks = breaks_honoured = 0
    # lessons with no end seen yet: student -> [(start time, counted today)]
    open_: dict[str, list[tuple[float, bool]]] = {}
    for ev in events:
        t = dt.datetime.fromisoformat(ev["time"])
        today = t.date() == day
        kind = ev["event"]
        if kind == "lesson_start":
            open_.setdefault(ev["student"], []).append((t.timestamp(), today))
            if not today:
                continue
            lessons += 1
            students.add(ev["student"])
            if ev.get("break_seconds") is not None:
                breaks += 1
                breaks_honoured += bool(ev.get("break_honoured"))
        elif kind == "lesson_end" and ev["duration"] is not None:
            _close(open_.get(ev["student"], []), ev["duration"], t.timestamp())
            if today:
                durations.append(ev["duration"])
        elif not today:
            continue
        elif kind == "cut":
            cuts[ev["rule"]] = cuts.get(ev["rule"], 0) + 1
        elif kind == "deny":
            n = int(ev.get("count") or 1)
            denials[ev["rule"]] = denials.get(ev["rule"], 0) + n
            if ev["student"] == ANONYMOUS:
                anonymous += n
    return {
        "day": day.isoformat(), "lessons": lessons, "students": len(students),
        "lessons_ended": len(durations),
        "lessons_in_progress": sum(today for starts in open_.values() for _, today in starts),
        "lesson_seconds_mean": round(sum(durations) / len(durations), 3) if durations else 0.0,
        "lesson_seconds_max": round(max(durations), 3) if durations else 0.0,
        "breaks": breaks, "breaks_honoured": breaks_honoured,
        "cuts": cuts, "denials": denials, "denials_anonymous": anonymous,
    }


def _close(starts: list[tuple[float, bool]], duration: float, at: float) -> None:
    """Pair an ended lesson with the earliest open start it fits. The end of
    a lesson may be recorded just after the next one started (by its first
    request): that next start is too late to fit."""
    for i, (start, _) in enumerate(starts):
        if start + duration <= at + CLOCK_SLACK:
            del starts[i]
            return


def render_report(rep: dict[str, Any]) -> str:
    ended, going = rep["lessons_ended"], rep["lessons_in_progress"]
    if ended:
        length = (f"ended lessons' length mean {rep['lesson_seconds_mean']}s, "
                  f"max {rep['lesson_seconds_max']}s")
    else:
        length = "no lesson has ended"
    lines = [f"{rep['day']}: {rep['lessons']} lessons started by {rep['students']} students, "
             f"{ended} ended, {going} still in progress; {length}; "
             f"breaks {rep['breaks']} ({rep['breaks_honoured']} of at least min_break)",
             "cuts: " + (", ".join(f"{k} {v}" for k, v in sorted(rep["cuts"].items()))
                         or "none"),
             "denials: " + (", ".join(f"{k} {v}" for k, v in sorted(rep["denials"].items()))
                            or "none")
             + (f" ({rep['denials_anonymous']} anonymous: no student id)"
                if rep["denials_anonymous"] else "")]
    return "\n".join(lines)


def run_audit_command(a: argparse.Namespace) -> int:
    import os

    from .redis import RedisTarget
    url = a.redis or os.environ.get("TUTORGATE_REDIS_URL")
    if not url:
        print("tutorgate: audit needs --redis URL", file=sys.stderr)
        return 2
    try:
        target = RedisTarget.parse(url)
    except ValueError as e:
        print(f"tutorgate: --redis: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_audit(a, RedisClient(target, op_timeout=10.0)))
    except StoreUnavailable as e:
        print(f"tutorgate: cannot read the audit stream: {e}", file=sys.stderr)
        return 1


async def _audit(a: argparse.Namespace, client: RedisClient) -> int:
    try:
        if a.audit_command == "export":
            return await _export(a, client)
        try:
            day = dt.date.fromisoformat(a.day)
        except ValueError:
            print(f"tutorgate: --day must be YYYY-MM-DD, got {a.day!r}", file=sys.stderr)
            return 2
        # the day's events lie within a day and a half either side in any zone
        since = dt.datetime.combine(day - dt.timedelta(days=1), dt.time(12), dt.UTC)
        until = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(12), dt.UTC)
        events = [ev async for ev in read_events(client, since.isoformat(), until.isoformat())]
        rep = report(events, day)
        if a.format == "json":
            print(json.dumps(rep, ensure_ascii=False))
        else:
            print(render_report(rep))
        return 0
    finally:
        await client.close()


async def _export(a: argparse.Namespace, client: RedisClient) -> int:
    try:
        events = read_events(client, a.since, a.until)
        if a.format == "csv":
            columns = list(dict.fromkeys([*FIELDS, "count", "id"]))
            w = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            async for ev in events:
                w.writerow(ev)
        else:
            async for ev in events:
                print(json.dumps(ev, ensure_ascii=False))
    except ValueError as e:
        print(f"tutorgate: --since/--until: {e}", file=sys.stderr)
        return 2
    return 0
