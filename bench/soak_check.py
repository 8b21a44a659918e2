"""The soak's checker: proves the contract's rules from the upstream's log alone.

Inputs are the upstream's JSONL log (bench/soak_upstream.py: what was SERVED),
the fault timeline and the policy the run used (``run.json``, written by
bench/soak.py). Nothing the gateways or the client say is trusted: a rule
holds only if no request that reached the upstream breaks it. The one
exception is what a denial cannot show upstream: on a cluster, the
``state_unavailable`` answers the client met (in ``run.json``) must all be
to students of a failing master, within the failover + 2 s.

    python bench/soak_check.py bench/results/soak-latest     # re-check a kept run

Every tolerance is a named constant below, with the reason for its size.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
import string
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

# The contract's own tolerance for a lesson's length and a cut's lateness.
LIMIT_TOL = 1.0
# A quiet gap this much shorter than min_break still starts a new lesson in the
# log: the gateway measures the gap between its DECISIONS, the log sees the
# requests a little later (decision -> upstream latency), and the Redis fast
# path writes activity behind by up to 0.25 s (TOUCH_EVERY), which a gateway
# SIGKILL loses.
GAP_TOL = 0.5
# The curfew edges: a request decided just before the start is logged just after.
CURFEW_TOL = 0.5
# Fail-closed: lesson requests already decided when the store fails are served,
# and the Redis store's fast path continues a lesson it knows without a round
# trip until a write fails: touches are flushed every 0.25 s (TOUCH_EVERY) and a
# write times out after op_timeout 0.25 s, so <= 0.5 s after the fault, plus the
# decision -> upstream latency.
FAIL_TOL = 0.6
# The bound on a store fault's denials (a cluster run): a failing
# master's students get their lesson routes back within the failover (kill ->
# replica promoted; SIGCONT for a stop) + 2 s.
FAILOVER_TOL = 2.0
STORE_FAULTS = ("redis_kill", "redis_stop", "cluster_master_kill")
SLOTS = 16384

ID_RE = re.compile(r"^[A-Za-z0-9\-_.:@]{1,128}$")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


# ------------------------------------------------------------------- paths


def decode_unreserved(path: str) -> str | None:
    """The path with percent-encoded unreserved characters decoded (once), or
    None if it cannot be made safe: an encoded / or \\, a raw \\, a control
    byte raw or encoded, invalid percent-encoding (the contract's bad_path)."""
    out: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "%":
            hx = path[i + 1 : i + 3]
            if len(hx) < 2 or not set(hx) <= _HEX:
                return None
            ch = chr(int(hx, 16))
            if ch in "/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
                return None
            out.append(ch if ch in _UNRESERVED else "%" + hx.upper())
            i += 3
            continue
        if c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F:
            return None
        out.append(c)
        i += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 (``/a/b/.`` -> ``/a/b/``, ``/a/b/..`` -> ``/a/``)."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./") or inp.startswith("/./"):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = inp[3:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            cut = inp.find("/", start)
            seg, inp = (inp, "") if cut < 0 else (inp[:cut], inp[cut:])
            out += seg
    return out


def merge_slashes(path: str) -> str:
    return re.sub(r"/{2,}", "/", path)


def origin_path(target: str) -> tuple[str, bool]:
    """The path part of a request target (no query) and whether it came in
    absolute form."""
    absolute = bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target))
    if absolute:
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    return target.split("?", 1)[0].split("#", 1)[0], absolute


def canonical(path: str) -> str | None:
    """The path the gateway must forward (None: it must not forward at all)."""
    decoded = decode_unreserved(path)
    if decoded is None:
        return None
    return remove_dot_segments(merge_slashes(decoded))


def match_path(path: str) -> str | None:
    """The path routes are matched on: canonical, ``;parameters`` ignored
    (stripped before the dot segments too, as Tomcat-style servers do)."""
    decoded = decode_unreserved(path)
    if decoded is None:
        return None
    no_params = "/".join(seg.split(";", 1)[0] for seg in decoded.split("/"))
    return remove_dot_segments(merge_slashes(no_params))


@dataclass(frozen=True)
class Route:
    prefix: str
    kind: str  # lesson | forbidden
    category: str


def route_of(routes: Iterable[Route], path: str) -> Route | None:
    for r in routes:
        if path.startswith(r.prefix):
            return r
    return None


# ------------------------------------------------------------------- slots


def pseudonym(secret: str, student_id: str) -> str:
    """The contract's student pseudonym: HMAC-SHA256 of the id, 128 bits, hex.
    Mirrored here (bench/soak.py proves the mirror on a live cluster first)."""
    return hmac.new(secret.encode(), student_id.encode(), hashlib.sha256).hexdigest()[:32]


def slot_of(tag: str) -> int:
    """Redis Cluster's hash slot of a hash tag: CRC16 (XMODEM) mod 16384."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


def in_ranges(slot: int, ranges: Iterable[Iterable[int]]) -> bool:
    return any(lo <= slot <= hi for lo, hi in ranges)


Affects = Callable[[dict[str, Any], str], bool]


def affects_of(run: dict[str, Any]) -> Affects:
    """Whether a store fault touched a student: every student on one server;
    on a cluster, the students whose slot the failing master held."""
    secret = run.get("id_secret")
    slots: dict[str, int] = {}

    def affects(fault: dict[str, Any], sid: str) -> bool:
        if "slots" not in fault:
            return True
        if secret is None:
            raise ValueError("a cluster run's run.json must carry id_secret")
        if sid not in slots:
            slots[sid] = slot_of(pseudonym(secret, sid))
        return in_ranges(slots[sid], fault["slots"])

    return affects


# ------------------------------------------------------------------- check


@dataclass
class Result:
    violations: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, kind: str, example: Any) -> None:
        self.violations[kind] += 1
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(example)

    def as_dict(self) -> dict[str, Any]:
        return {
            "violations": dict(sorted(self.violations.items())),
            "violations_total": sum(self.violations.values()),
            "examples": {k: v for k, v in sorted(self.examples.items())},
            "figures": self.figures,
            "tolerances": {"limit_s": LIMIT_TOL, "gap_s": GAP_TOL, "curfew_edge_s": CURFEW_TOL,
                           "fail_closed_s": FAIL_TOL, "failover_s": FAILOVER_TOL},
        }


def read_log(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    records.sort(key=lambda r: r["t"])
    return records


def check(records: list[dict[str, Any]], run: dict[str, Any]) -> Result:
    """Every invariant of the soak over the served requests ``records``."""
    res = Result()
    pol = run["policy"]
    routes = [Route(r["prefix"], r["kind"], r.get("category", "")) for r in pol["routes"]]
    max_d, min_b = float(pol["max_duration"]), float(pol["min_break"])
    cs, ce = float(pol["curfew_start"]), float(pol["curfew_end"])
    tz = ZoneInfo(pol["timezone"])
    rest_region, rest_dates = pol["rest_region"], set(pol["rest_dates"])
    end_of_run = float(run["ended"])

    # one served lesson activity: (start, end, what) per student
    activity: dict[str, list[tuple[float, float, dict[str, Any]]]] = defaultdict(list)
    ws_open: dict[int, dict[str, Any]] = {}
    # (t, via, student) of every served lesson request
    lesson_times: list[tuple[float, str, str]] = []
    counts: dict[str, int] = defaultdict(int)

    for rec in records:
        counts[rec["kind"]] += 1
        if rec["kind"] == "ws_close":
            opened = ws_open.pop(rec["ws"], None)
            if opened is not None:
                opened["closed"] = rec["t"]
            continue
        raw = rec["p"]
        path, absolute = origin_path(raw)
        ex = {"t": round(rec["t"], 3), "p": raw[:120], "ids": rec["ids"][:3]}
        if absolute:
            res.add("absolute_form_forwarded", ex)
        forward = canonical(path)
        if forward is None:
            res.add("bad_path_forwarded", ex)
        elif forward != _upper_hex(path):
            res.add("forwarded_path_not_canonical", ex)
        mpath = match_path(path)
        route = route_of(routes, mpath if mpath is not None else path)
        if route is None:
            continue
        if route.kind == "forbidden":
            res.add("photo_search_served", ex)
            continue
        ids, grades = rec["ids"], rec["grades"]
        if len(ids) > 1 or len(grades) > 1:
            res.add("duplicate_identity_forwarded", ex)
        if not ids:
            res.add("identity_missing_forwarded", ex)
            continue
        if not ID_RE.match(ids[0]):
            res.add("bad_identity_forwarded", ex)
        if grades and grades[0] == "preschool":
            res.add("preschool_served", ex)
        t = rec["t"]
        lesson_times.append((t, rec["via"], ids[0]))
        if cs + CURFEW_TOL <= t < ce - CURFEW_TOL:
            res.add("served_in_curfew", ex)
        region = rec["regions"][0] if rec["regions"] else None
        day = dt.datetime.fromtimestamp(t, tz).date().isoformat()
        if route.category == "subject" and region == rest_region and day in rest_dates:
            res.add("served_on_rest_day", ex)
        item: dict[str, Any] = {"t": t, "p": raw[:120], "kind": rec["kind"]}
        if rec["kind"] == "ws_open":
            item["closed"] = None
            ws_open[rec["ws"]] = item
        activity[ids[0]].append((t, t, item))

    kills = [f["start"] for f in run["faults"] if f["kind"] == "redis_kill"]
    _check_lessons(res, activity, max_d, min_b, cs, ce, end_of_run, kills)
    affects = affects_of(run)
    _check_store_faults(res, run["faults"], lesson_times, affects)
    if run.get("topology") == "cluster":
        _check_denials(res, run["faults"], run["client"].get("unavailable", []), affects)
    res.figures["served"] = dict(counts)
    res.figures["students_served"] = len(activity)
    res.figures["lesson_requests_served"] = len(lesson_times)
    res.figures["interruptions"] = interruptions(run["faults"], lesson_times, (cs, ce), affects)
    return res


def _upper_hex(path: str) -> str:
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), path)


def _check_lessons(res: Result, activity: dict[str, list[tuple[float, float, dict[str, Any]]]],
                   max_d: float, min_b: float, cs: float, ce: float, end_of_run: float,
                   kills: list[float]) -> None:
    """Group each student's served activity into lessons (a quiet gap of
    min_break starts a new one) and check each lesson's length; WebSockets are
    activity from open to close and must be cut at the limit and the curfew."""
    longest = 0.0
    lessons = across_kill = 0
    for student, items in activity.items():
        spans = []
        for start, _, item in items:
            end = start
            if item["kind"] == "ws_open":
                closed = item["closed"]
                if closed is None:
                    res.add("ws_never_closed", {"student": student, **item})
                    closed = end_of_run
                end = closed
                if start < cs and closed > cs + LIMIT_TOL:
                    res.add("ws_not_cut_at_curfew", {"student": student, **item})
            spans.append((start, end, item))
        spans.sort(key=lambda s: s[0])
        g_start, g_end, members = spans[0][0], spans[0][1], [spans[0]]
        for span in [*spans[1:], None]:
            if span is not None and span[0] - g_end < min_b - GAP_TOL:
                g_end = max(g_end, span[1])
                members.append(span)
                continue
            lessons += 1
            length = g_end - g_start
            longest = max(longest, length)
            if length > max_d + LIMIT_TOL:
                res.add("lesson_over_limit", {"student": student, "start": round(g_start, 3),
                                              "length_s": round(length, 3)})
                # a lesson across a Redis SIGKILL may have lost its start to the AOF
                if any(g_start <= k <= g_end for k in kills):
                    across_kill += 1
                limit = g_start + max_d + LIMIT_TOL
                for s, e, item in members:
                    if item["kind"] == "ws_open" and e > limit:
                        res.add("ws_not_cut_at_limit", {"student": student, **item})
                    elif s > limit:
                        res.add("served_in_break", {"student": student, "t": round(s, 3)})
            if span is not None:
                g_start, g_end, members = span[0], span[1], [span]
    res.figures["lessons"] = lessons
    res.figures["longest_lesson_s"] = round(longest, 3)
    res.figures["lessons_over_limit_across_redis_kill"] = across_kill


def _check_store_faults(res: Result, faults: list[dict[str, Any]],
                        lesson_times: list[tuple[float, str, str]], affects: Affects) -> None:
    """fail_closed: nothing on lesson routes while the store is down (after
    FAIL_TOL for what was decided or fast-pathed when it failed); on a
    cluster, nothing for the students of the failed master until its
    replica was promoted."""
    tail = 0.0
    for f in faults:
        if f["kind"] not in STORE_FAULTS or f.get("recovered") is None:
            continue
        # down from the fault until the restarted server was spawned (it may
        # answer the gateways before the soak's own readiness poll sees it)
        start, rec = f["start"], f.get("restarted", f["recovered"])
        for t, _, sid in lesson_times:
            if start <= t < rec and affects(f, sid):
                tail = max(tail, t - start)
                if t > start + FAIL_TOL:
                    res.add("served_while_store_down", {"fault": f["kind"], "t": round(t, 3),
                                                        "after_fault_s": round(t - start, 3)})
    res.figures["served_after_store_fault_max_s"] = round(tail, 3)


def _check_denials(res: Result, faults: list[dict[str, Any]],
                   denials: list[list[Any]], affects: Affects) -> None:
    """A cluster keeps the other masters' students going: every
    state_unavailable the client met must fall inside a store fault (from its
    start to its recovery + FAILOVER_TOL) that touched that student's slot."""
    windows = [f for f in faults if f["kind"] in STORE_FAULTS and f.get("recovered")]
    longest: dict[str, float] = {}
    per_fault: list[float] = [0.0] * len(windows)
    for t, sid, via, how in denials:
        ex = {"t": round(t, 3), "student": sid, "via": via, "how": how}
        live = [i for i, f in enumerate(windows)
                if f["start"] <= t <= f["recovered"] + FAILOVER_TOL]
        mine = [i for i in live if affects(windows[i], sid)]
        if not live:
            res.add("unavailable_outside_store_fault", ex)
        elif not mine:
            res.add("denied_on_live_master", ex)
        for i in mine:
            f = windows[i]
            per_fault[i] = max(per_fault[i], t - f["start"])
            longest[f["kind"]] = round(max(longest.get(f["kind"], 0.0), t - f["start"]), 3)
    res.figures["state_unavailable_denials"] = len(denials)
    res.figures["longest_denial_after_fault_s"] = longest
    res.figures["master_kills"] = [
        {"failover_s": f.get("failover_s"), "longest_denial_s": round(per_fault[i], 3),
         "denial_after_promotion_s": round(max(0.0, f["start"] + per_fault[i]
                                               - f["recovered"]), 3)}
        for i, f in enumerate(windows) if f["kind"] == "cluster_master_kill"]


def interruptions(faults: list[dict[str, Any]], lesson_times: list[tuple[float, str, str]],
                  curfew: tuple[float, float], affects: Affects | None = None
                  ) -> dict[str, float]:
    """Per fault kind, the longest gap in served lesson requests (through the
    killed gateway only, for a gateway kill; of the failed master's students
    only, on a cluster) that overlaps the fault, from its start to its
    recovery: how long students could not have a lesson. The curfew's share
    of a gap does not count (nobody may have a lesson then)."""
    cs, ce = curfew

    def length(a: float, b: float) -> float:
        return (b - a) - max(0.0, min(b, ce) - max(a, cs))

    worst: dict[str, float] = {}
    for f in faults:
        start, rec = f["start"], f.get("recovered") or f.get("end") or f["start"]
        via = f.get("via")
        times = [t for t, v, sid in lesson_times if (via is None or v == via)
                 and (affects is None or "slots" not in f or affects(f, sid))]
        before = [t for t in times if t <= start]
        prev = before[-1] if before else start
        longest = 0.0
        for t in times:
            if t <= prev:
                continue
            if prev <= rec:  # a gap that begins before recovery overlaps the fault
                longest = max(longest, length(max(prev, start), t))
            prev = t
            if t > rec:
                break
        worst[f["kind"]] = round(max(worst.get(f["kind"], 0.0), longest), 3)
    return worst


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: soak_check.py RUN_DIR (holding run.json and upstream.jsonl)",
              file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    run = json.loads((run_dir / "run.json").read_text())
    result = check(read_log(run_dir / "upstream.jsonl"), run).as_dict()
    print(json.dumps(result, indent=2))
    return 1 if result["violations_total"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
