"""The fault soak (bench/soak.py) and its checker (bench/soak_check.py).

The checker tests feed it hand-made upstream logs, one per invariant, so each
rule is seen to fail; the slow test runs a short soak end to end against real
processes (two gateways, Redis with AOF, the logging upstream) and asserts
that nothing it served breaks a rule and that every fault kind was injected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import soak_check  # noqa: E402

T0 = 1_800_000_000.0  # 2027-01-15 16:00 in Asia/Shanghai
CS, CE = T0 + 100, T0 + 110
ROUTES = [
    {"prefix": "/classroom/subject/", "kind": "lesson", "category": "subject"},
    {"prefix": "/classroom/arts/", "kind": "lesson", "category": "non_subject"},
    {"prefix": "/api/photo-search", "kind": "forbidden", "category": ""},
]


def run(faults: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"ended": T0 + 300, "faults": faults or [], **extra,
            "policy": {"max_duration": 6, "min_break": 3, "curfew_start": CS,
                       "curfew_end": CE, "timezone": "Asia/Shanghai", "rest_region": "990000",
                       "rest_dates": ["2027-01-15"], "routes": ROUTES}}


def req(t: float, path: str = "/classroom/arts/x", sid: str | None = "s-1", *,
        region: str | None = None, kind: str = "http", ws: int | None = None,
        ids: list[str] | None = None, grades: list[str] | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"t": T0 + t, "kind": kind, "m": "GET", "p": path,
                           "ids": ids if ids is not None else ([sid] if sid else []),
                           "grades": grades or [], "regions": [region] if region else [],
                           "via": "127.0.0.1:1"}
    if ws is not None:
        rec["ws"] = ws
    return rec


def violations(records: list[dict[str, Any]], faults: list[dict[str, Any]] | None = None,
               **extra: Any) -> dict[str, int]:
    return dict(soak_check.check(sorted(records, key=lambda r: r["t"]),
                                 run(faults, **extra)).violations)


def test_clean_log_has_no_violation() -> None:
    """Lessons within the limit, breaks kept, a cut WebSocket: nothing to report."""
    recs = [req(t) for t in (0, 1, 2, 3, 4, 5, 5.9)]            # one 6 s lesson
    recs += [req(t) for t in (9.0, 10, 14.5)]                     # after the 3 s break
    recs += [req(20, "/classroom/arts/live", kind="ws_open", ws=1),
             req(26.2, "/classroom/arts/live", kind="ws_close", ws=1)]
    recs += [req(1, "/static/app.js", sid=None), req(2, "/api/other", sid=None)]
    assert violations(recs) == {}


def test_lesson_over_limit_and_requests_in_the_break_are_found() -> None:
    """Requests every second for 9 s: one lesson too long, the late ones in the break."""
    got = violations([req(float(t)) for t in range(10)])
    assert got == {"lesson_over_limit": 1, "served_in_break": 2}


def test_websocket_held_past_the_limit_is_found() -> None:
    """A lesson WebSocket open for 9 s was not cut at the 6 s limit."""
    got = violations([req(0, "/classroom/arts/live", kind="ws_open", ws=1),
                      req(9, "/classroom/arts/live", kind="ws_close", ws=1)])
    assert got == {"lesson_over_limit": 1, "ws_not_cut_at_limit": 1}


def test_curfew_rest_day_and_photo_search_are_found() -> None:
    """Served inside the curfew, a subject class on the region's rest day, and
    photo search through path tricks are each a violation."""
    recs = [req(105, sid="s-2"),
            req(50, "/classroom/subject/math", sid="s-3", region="990000"),
            req(51, "/classroom/arts/x", sid="s-4", region="990000"),  # arts: allowed
            req(60, "/api;x=1/photo-search", sid=None),
            req(61, "/api/%70hoto-search", sid=None),
            req(62, "http://127.0.0.1:9/api/photo-search", sid=None)]
    got = violations(recs)
    assert got == {"served_in_curfew": 1, "served_on_rest_day": 1, "photo_search_served": 3,
                   "forwarded_path_not_canonical": 1, "absolute_form_forwarded": 1}


def test_websocket_open_across_the_curfew_start_is_found() -> None:
    """A WebSocket opened before the curfew and closed 3 s into it was not cut."""
    got = violations([req(98, "/classroom/arts/live", kind="ws_open", ws=1),
                      req(103, "/classroom/arts/live", kind="ws_close", ws=1)])
    assert got == {"ws_not_cut_at_curfew": 1}


def test_hostile_identity_and_paths_that_reached_the_upstream_are_found() -> None:
    """Duplicate ids, a malformed id, a missing id on a lesson route, an unsafe
    path and a dot-segment path forwarded as it came are violations."""
    recs = [req(1, ids=["a", "b"]), req(2, ids=["bad id"]), req(3, sid=None),
            req(4, "/classroom/arts%2Fx", sid=None), req(5, "/classroom/subject/.", sid="s-9"),
            req(6, grades=["preschool"], sid="s-8")]
    got = violations(recs)
    assert got == {"duplicate_identity_forwarded": 1, "bad_identity_forwarded": 1,
                   "identity_missing_forwarded": 1, "bad_path_forwarded": 1,
                   "forwarded_path_not_canonical": 1, "preschool_served": 1}


def test_lesson_served_while_the_store_is_down_is_found() -> None:
    """fail_closed: a lesson request served past the tolerance inside a Redis
    outage is a violation; one within the tolerance is not."""
    fault = {"kind": "redis_stop", "start": T0 + 40, "recovered": T0 + 42}
    recs = [req(40.3, sid="s-1"), req(41.0, sid="s-2"), req(42.1, sid="s-3")]
    assert violations(recs, [fault]) == {"served_while_store_down": 1}


def test_interruption_is_the_longest_gap_overlapping_the_fault() -> None:
    """The interruption of a fault is the gap in served lessons around it,
    minus any part of the curfew."""
    fault = {"kind": "redis_kill", "start": T0 + 40, "restarted": T0 + 41, "recovered": T0 + 41.5}
    recs = [req(39.9, sid="s-1"), req(42.5, sid="s-2"), req(43, sid="s-3")]
    result = soak_check.check(recs, run([fault]))
    assert result.figures["interruptions"] == {"redis_kill": 2.5}


SECRET = "soak-test-secret"


def student_on(lo: int, hi: int, avoid: tuple[int, int] | None = None) -> str:
    """A student id whose pseudonym's slot is in lo..hi."""
    for i in range(100_000):
        sid = f"c-{i}"
        if lo <= soak_check.slot_of(soak_check.pseudonym(SECRET, sid)) <= hi:
            return sid
    raise AssertionError("no such student")


def test_pseudonym_and_slot_mirror_the_gateway() -> None:
    """The checker's student -> slot mapping is the gateway's (HMAC key, CRC16 hash tag)."""
    from gateway.identity import Pseudonymizer
    from gateway.redis.resp import slot

    for sid in ("s-00001", "s-01999", "soak-probe"):
        p = soak_check.pseudonym(SECRET, sid)
        assert p == Pseudonymizer(SECRET.encode())(sid)
        assert soak_check.slot_of(p) == slot(f"tutorgate:{{{p}}}:clock")


def cluster_run_faults() -> tuple[dict[str, Any], str, str]:
    kill = {"kind": "cluster_master_kill", "start": T0 + 40, "recovered": T0 + 43.5,
            "failover_s": 3.5, "slots": [[0, 5460]]}
    return kill, student_on(0, 5460), student_on(5461, 16383)


def test_cluster_fail_closed_only_binds_the_failed_masters_students() -> None:
    """On a cluster, a lesson served during a master's failover is a violation
    for that master's students only."""
    kill, victim, other = cluster_run_faults()
    recs = [req(41.0, sid=victim), req(41.0, sid=other), req(42.0, sid=other)]
    got = violations(recs, [kill], topology="cluster", id_secret=SECRET,
                     client={"unavailable": []})
    assert got == {"served_while_store_down": 1}


def test_cluster_denials_are_checked_against_the_failed_master() -> None:
    """state_unavailable for a live master's student, after the failover + 2 s,
    or outside any store fault is a violation; the failed master's students
    within the bound are not."""
    kill, victim, other = cluster_run_faults()
    denials = [[T0 + 41, victim, "gw", "http"], [T0 + 45.4, victim, "gw", "http"],
               [T0 + 42, other, "gw", "http"], [T0 + 46, victim, "gw", "http"],
               [T0 + 10, other, "gw", "ws_handshake"]]
    result = soak_check.check([], run([kill], topology="cluster", id_secret=SECRET,
                                      client={"unavailable": denials}))
    assert dict(result.violations) == {"denied_on_live_master": 1,
                                       "unavailable_outside_store_fault": 2}
    assert result.figures["master_kills"] == [
        {"failover_s": 3.5, "longest_denial_s": 5.4, "denial_after_promotion_s": 1.9}]


def test_cluster_interruption_counts_the_failed_masters_students() -> None:
    """A master kill's interruption is the gap in its own students' lessons,
    not hidden by other masters' students being served."""
    kill, victim, other = cluster_run_faults()
    recs = [req(39.5, sid=victim), req(44.0, sid=victim)]
    recs += [req(40 + i / 2, sid=other) for i in range(8)]
    result = soak_check.check(sorted(recs, key=lambda r: r["t"]),
                              run([kill], topology="cluster", id_secret=SECRET,
                                  client={"unavailable": []}))
    assert result.figures["interruptions"] == {"cluster_master_kill": 4.0}


@pytest.mark.parametrize(("raw", "want"), [
    ("/classroom/subject/.", "/classroom/subject/"),
    ("/a/b/..", "/a/"),
    ("/a//b/./c/../d", "/a/b/d"),
    ("/%2e%2e/api/photo-search", "/api/photo-search"),
    ("/api/photo-search%2Fx", None),
    ("/a\\b", None),
    ("/a%zz", None),
])
def test_canonical_path(raw: str, want: str | None) -> None:
    """The checker's canonical path follows the contract (RFC 3986 dot segments)."""
    assert soak_check.canonical(raw) == want


@pytest.mark.slow
def test_short_soak_serves_nothing_against_the_rules(tmp_path: Path) -> None:
    """A ~60 s soak (300 students, each fault kind once) ends with zero violations."""
    out = tmp_path / "soak"
    done = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--students", "300", "--duration", "55",
         "--faults", "5", "--curfew-at", "22", "--seed", "7", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    result = json.loads((out / "result.json").read_text())
    kinds = {f["kind"] for f in result["run"]["faults"] if "error" not in f}
    assert kinds == {"redis_kill", "redis_stop", "gateway_kill", "policy_broken",
                     "hostile_burst"}, result["run"]["faults"]
    assert result["figures"]["lesson_requests_served"] > 1000
    assert result["violations"] == {}, done.stdout


@pytest.mark.slow
def test_short_cluster_soak_kills_a_master_and_serves_nothing_against_the_rules(
        tmp_path: Path) -> None:
    """A ~60 s soak on a 3-master, 3-replica cluster (a master killed and
    rejoined, each fault kind once): zero violations, the killed master's
    students were denied (the fault bit) and nobody else was."""
    out = tmp_path / "soak"
    # the curfew after the faults: a master kill inside it would meet no lesson
    done = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--cluster", "--students", "300",
         "--duration", "55", "--faults", "5", "--curfew-at", "60", "--seed", "7",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    result = json.loads((out / "result.json").read_text())
    faults = [f for f in result["run"]["faults"] if "error" not in f]
    assert {f["kind"] for f in faults} == {"cluster_master_kill", "redis_stop", "gateway_kill",
                                           "policy_broken", "hostile_burst"}, faults
    kill = next(f for f in faults if f["kind"] == "cluster_master_kill")
    assert kill["rejoined_as_replica"], kill
    assert result["figures"]["master_kills"][0]["longest_denial_s"] > 0, done.stdout
    assert result["figures"]["lesson_requests_served"] > 1000
    assert result["violations"] == {}, done.stdout
