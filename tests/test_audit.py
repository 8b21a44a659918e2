"""The audit trail on a real redis-server: complete, ordered, agreeing with
the metrics, trimmed by age, and free of raw student ids."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from kit import ARTS, FORBIDDEN, SUBJECT, TZ, metric, near_local_midnight, policy_text

EXE = str(Path(sys.executable).parent / "tutorgate")
LIVE = "/classroom/arts/room/live"


def export(url: str, *args: str) -> list[dict]:  # type: ignore[type-arg]
    out = subprocess.run([EXE, "audit", "export", "--redis", url, *args], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


async def scripted_day(gw, http) -> list[str]:  # type: ignore[no-untyped-def]
    """Two students through lessons, a break denial, a cut and static denials."""
    ids = ["alice-0001", "bob.0002"]
    for s in ids:
        async with http.get(gw.url(SUBJECT), headers={"X-Student-Id": s}) as r:
            assert r.status == 200
    async with http.get(gw.url(FORBIDDEN)) as r:
        assert r.status == 403
    async with http.get(gw.url(SUBJECT), headers={"X-Student-Id": ids[0],
                                                  "X-Student-Grade": "preschool"}) as r:
        assert r.status == 403
    async with http.ws_connect(gw.ws_url(LIVE), headers={"X-Student-Id": ids[1]}) as ws:
        msg = await ws.receive(timeout=5)   # cut at the 1 s lesson limit
        assert msg.extra == "lesson_limit"
    await asyncio.sleep(0.3)
    async with http.get(gw.url(ARTS), headers={"X-Student-Id": ids[1]}) as r:
        assert r.status == 429              # break_required
    await asyncio.sleep(1.2)                # the break (1 s) is over for both
    for s in ids:
        async with http.get(gw.url(ARTS), headers={"X-Student-Id": s}) as r:
            assert r.status == 200          # second lessons: the first ones end
    await settle(gw)
    return ids


async def settle(gw) -> None:  # type: ignore[no-untyped-def]
    """Let the ended-lesson reports finish, then write the audit buffer."""
    await asyncio.gather(*list(gw.gateway.lessons._tasks))
    await gw.gateway.audit.flush()


@pytest.mark.skipif(near_local_midnight(), reason="the day's events would span two days")
async def test_export_complete_ordered_and_matches_metrics(upstream, gateways, http,
                                                          private_redis):
    """audit export returns every event of the day in order; audit report
    agrees with the gateway's own counters."""
    gw = await gateways(policy_text(max_duration="1s", min_break="1s"), upstream.url,
                        redis_url=private_redis.url)
    await scripted_day(gw, http)
    events = export(private_redis.url)
    kinds = [e["event"] for e in events]
    assert kinds.count("lesson_start") == 4 == metric(gw, "tutorgate_lessons_started_total")
    assert kinds.count("lesson_end") == 2
    assert kinds.count("cut") == 1 == metric(gw, "tutorgate_connections_cut_total")
    denies = [e["rule"] for e in events if e["event"] == "deny"]
    assert sorted(denies) == ["break_required", "forbidden_feature", "preschool"]
    times = [dt.datetime.fromisoformat(e["time"]) for e in events]
    assert times == sorted(times) and all(t.utcoffset() is not None for t in times)
    for e in events:
        for k in ("time", "event", "student", "rule", "category", "region", "policy_version",
                  "instance"):
            assert k in e, (k, e)
    today = dt.datetime.now(TZ).date().isoformat()
    out = subprocess.run([EXE, "audit", "report", "--redis", private_redis.url, "--day", today,
                          "--format", "json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["lessons"] == metric(gw, "tutorgate_lessons_started_total")
    assert rep["cuts"] == {"lesson_limit": 1}
    for rule, n in rep["denials"].items():
        assert n == metric(gw, "tutorgate_decisions_total", decision="deny", rule=rule)
    assert rep["lesson_seconds_max"] <= 1.0 + 0.5
    assert rep["lesson_seconds_mean"] > 0
    assert rep["breaks"] == 2 == metric(gw, "tutorgate_breaks_total")
    assert rep["breaks_honoured"] == 2 == metric(gw, "tutorgate_breaks_total", honoured="true")
    csv_out = subprocess.run([EXE, "audit", "export", "--redis", private_redis.url,
                              "--format", "csv"], capture_output=True, text=True, timeout=30)
    assert csv_out.stdout.splitlines()[0].startswith("time,event,student")
    assert len(csv_out.stdout.splitlines()) == len(events) + 1


async def test_no_raw_student_id_in_redis(upstream, gateways, http, private_redis):
    """Nothing in Redis (keys, hashes, zsets, the audit stream) holds a raw id."""
    gw = await gateways(policy_text(max_duration="1s", min_break="1s"), upstream.url,
                        redis_url=private_redis.url)
    ids = await scripted_day(gw, http)
    r = redis.Redis.from_url(private_redis.url)
    dump = []
    for key in r.scan_iter(count=1000):
        dump.append(key)
        kind = r.type(key).decode()
        if kind == "hash":
            dump.extend(b for kv in r.hgetall(key).items() for b in kv)
        elif kind == "zset":
            dump.extend(m for m, _ in r.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            for _, fields in r.xrange(key):
                dump.extend(b for kv in fields.items() for b in kv)
        elif kind == "string":
            dump.append(r.get(key) or b"")
    blob = b"\n".join(dump)
    assert blob, "nothing was written to Redis"
    for s in ids:
        assert s.encode() not in blob
    assert gw.gateway.pseudonym(ids[0]).encode() in blob


async def test_retention_trims_old_events(upstream, gateways, http, private_redis):
    """Events older than the retention are trimmed as new ones are written."""
    retention_s = 1.0
    gw = await gateways(policy_text(), upstream.url, redis_url=private_redis.url,
                        audit_retention_days=retention_s / 86400)
    for _ in range(3):
        async with http.get(gw.url(FORBIDDEN)) as r:
            assert r.status == 403
    await settle(gw)
    assert len(export(private_redis.url)) == 3
    time.sleep(retention_s + 0.2)
    async with http.get(gw.url(FORBIDDEN)) as r:
        assert r.status == 403
    await gw.gateway.audit.flush()
    assert len(export(private_redis.url)) == 1


async def test_lesson_without_a_successor_is_reported_once(upstream, gateways, http,
                                                           private_redis):
    """A lesson after which the student never comes back is reported ended
    by the sweep of the instance that started it, with its real length; a
    later lesson of the same student does not report it a second time, even
    through another instance."""
    pol = policy_text(max_duration="1s", min_break="1s")
    a = await gateways(pol, upstream.url, redis_url=private_redis.url)
    b = await gateways(pol, upstream.url, redis_url=private_redis.url)
    s = "carol-0003"
    async with http.get(a.url(ARTS), headers={"X-Student-Id": s}) as r:
        assert r.status == 200
    await asyncio.sleep(1.3)          # the 1 s lesson and its quiet time are over
    await b.gateway.lessons.sweep()   # b started nothing: reports nothing
    await a.gateway.lessons.sweep()
    await settle(a)
    ends = [e for e in export(private_redis.url) if e["event"] == "lesson_end"]
    assert len(ends) == 1 and ends[0]["student"] == a.gateway.pseudonym(s)
    assert 0 <= ends[0]["duration"] <= 1.0
    assert metric(a, "tutorgate_lesson_duration_seconds_count") == 1
    await asyncio.sleep(0.8)
    async with http.get(b.url(ARTS), headers={"X-Student-Id": s}) as r:
        assert r.status == 200        # a new lesson through the other instance
    await settle(b)
    await a.gateway.lessons.sweep()
    await settle(a)
    ends = [e for e in export(private_redis.url) if e["event"] == "lesson_end"]
    assert len(ends) == 1, ends
    assert metric(b, "tutorgate_lesson_duration_seconds_count") == 0


def test_export_since_until_and_bad_arguments(private_redis):
    """--since/--until select a window; a bad --day is exit 2."""
    r = redis.Redis.from_url(private_redis.url)
    for i, t in enumerate(("2026-03-01T10:00:00+08:00", "2026-03-02T10:00:00+08:00")):
        ms = int(dt.datetime.fromisoformat(t).timestamp() * 1000)
        r.xadd("tutorgate:audit", {"time": t, "event": "deny", "student": f"h{i}",
                                   "rule": "curfew", "category": "subject", "region": "base",
                                   "policy_version": "1/x", "instance": "i"}, id=f"{ms}-0")
    assert [e["student"] for e in export(private_redis.url)] == ["h0", "h1"]
    got = export(private_redis.url, "--since", "2026-03-02T00:00:00+08:00")
    assert [e["student"] for e in got] == ["h1"]
    got = export(private_redis.url, "--until", "2026-03-02T00:00:00+08:00")
    assert [e["student"] for e in got] == ["h0"]
    out = subprocess.run([EXE, "audit", "report", "--redis", private_redis.url, "--day", "x"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    out = subprocess.run([EXE, "audit", "report", "--redis", private_redis.url,
                          "--day", "2026-03-01", "--format", "json"],
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["denials"] == {"curfew": 1}


def _add(r: redis.Redis, t: str, event: str, student: str, rule: str = "",
         **extra: str) -> None:
    ms = int(dt.datetime.fromisoformat(t).timestamp() * 1000)
    r.xadd("tutorgate:audit", {"time": t, "event": event, "student": student, "rule": rule,
                               "category": "subject", "region": "base",
                               "policy_version": "1/x", "instance": "i", **extra},
           id=f"{ms}-*")


def report_of(url: str, day: str, fmt: str = "json") -> str:
    out = subprocess.run([EXE, "audit", "report", "--redis", url, "--day", day,
                          "--format", fmt], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_report_counts_lessons_in_progress_and_anonymous_denials(private_redis):
    """report tells ended lessons from lessons still in progress (also when the
    previous lesson's end is recorded just after the next one starts), sums
    aggregated denials' `count`, and names denials without a student anonymous."""
    r = redis.Redis.from_url(private_redis.url)
    _add(r, "2026-03-01T23:50:00+08:00", "lesson_start", "c")
    _add(r, "2026-03-02T09:00:00.000+08:00", "lesson_start", "c")
    # c's first lesson, reported by c's next request
    _add(r, "2026-03-02T09:00:00.400+08:00", "lesson_end", "c", duration="1200.000")
    _add(r, "2026-03-02T10:00:00+08:00", "lesson_start", "a")
    _add(r, "2026-03-02T10:15:00+08:00", "lesson_end", "a", duration="600.000")
    _add(r, "2026-03-02T11:00:00+08:00", "lesson_start", "b")
    _add(r, "2026-03-02T12:00:00+08:00", "deny", "", "forbidden_feature", count="3")
    _add(r, "2026-03-02T12:00:01+08:00", "deny", "", "forbidden_feature")
    _add(r, "2026-03-02T12:00:02+08:00", "deny", "h1", "curfew")
    rep = json.loads(report_of(private_redis.url, "2026-03-02"))
    assert (rep["lessons"], rep["lessons_ended"], rep["lessons_in_progress"]) == (3, 2, 2)
    assert rep["lesson_seconds_max"] == 1200.0
    assert rep["denials"] == {"forbidden_feature": 4, "curfew": 1}
    assert rep["denials_anonymous"] == 4
    text = report_of(private_redis.url, "2026-03-02", "text")
    assert "3 lessons started by 3 students, 2 ended, 2 still in progress" in text
    assert "denials: curfew 1, forbidden_feature 4 (4 anonymous: no student id)" in text
    denied = [e for e in export(private_redis.url) if e["event"] == "deny"]
    assert [(e["student"], e.get("count")) for e in denied] == \
        [("anonymous", 3), ("anonymous", None), ("h1", None)]


def test_report_of_a_day_with_only_a_lesson_in_progress(private_redis):
    """A lesson still going on is reported in progress, not as a 0 s lesson."""
    r = redis.Redis.from_url(private_redis.url)
    _add(r, "2026-03-05T10:00:00+08:00", "lesson_start", "a")
    rep = json.loads(report_of(private_redis.url, "2026-03-05"))
    assert (rep["lessons"], rep["lessons_ended"], rep["lessons_in_progress"]) == (1, 0, 1)
    text = report_of(private_redis.url, "2026-03-05", "text")
    assert "0 ended, 1 still in progress; no lesson has ended;" in text
    assert "mean 0.0s" not in text
