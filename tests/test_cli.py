"""gateway/cli.py (with explain.py and summary.py): check, explain and calendar.

Most tests call `gateway.cli.main([...])` in-process and read capsys; a few
run the installed `tutorgate` script for real.

Goldens: tests/fixtures/golden/*.json hold outputs that are fully
deterministic (fixed policy file, fixed --at, fixed year). After an intended
change of output, regenerate them with

    TUTORGATE_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_cli.py

and review the diff before committing; the regenerating run fails on
purpose so it is never mistaken for a passing one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import cli, cli_policy

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
CLI_POLICY = FIXTURES / "good" / "cli.yaml"
WITH_2027 = FIXTURES / "good" / "with-2027.yaml"
TUTORGATE = Path(sys.executable).parent / "tutorgate"
REGEN = os.environ.get("TUTORGATE_REGEN_GOLDEN") == "1"

SUBJECT = "/classroom/subject/math/1"
RULE_ORDER = ["forbidden_feature", "identity_required", "bad_identity", "preschool", "curfew",
              "rest_day", "daily_limit", "break_required", "state_unavailable"]

D = dt.date


def days(first: D, last: D) -> list[D]:
    return [first + dt.timedelta(n) for n in range((last - first).days + 1)]


# The 2026 State Council notice as published (independent of the package).
HOLIDAYS_2026 = {
    "New Year": (D(2026, 1, 1), D(2026, 1, 3)),
    "Spring Festival": (D(2026, 2, 15), D(2026, 2, 23)),
    "Qingming": (D(2026, 4, 4), D(2026, 4, 6)),
    "Labour Day": (D(2026, 5, 1), D(2026, 5, 5)),
    "Dragon Boat": (D(2026, 6, 19), D(2026, 6, 21)),
    "Mid-Autumn": (D(2026, 9, 25), D(2026, 9, 27)),
    "National Day": (D(2026, 10, 1), D(2026, 10, 7)),
}
HOLIDAY_DAYS_2026 = {d for a, b in HOLIDAYS_2026.values() for d in days(a, b)}
MAKEUP_2026 = {D(2026, 1, 4), D(2026, 2, 14), D(2026, 2, 28), D(2026, 5, 9), D(2026, 9, 20),
               D(2026, 10, 10)}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def golden(name: str, data: Any) -> None:
    """Compare `data` with tests/fixtures/golden/NAME (or rewrite it, see the module doc)."""
    path = GOLDEN / name
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if REGEN:
        path.write_text(text, encoding="utf-8")
        pytest.fail(f"regenerated {path}; review it and run again without TUTORGATE_REGEN_GOLDEN")
    assert text == path.read_text(encoding="utf-8")


def freeze_today(monkeypatch: pytest.MonkeyPatch, fixed: D) -> D:
    """Make `check`'s "today" `fixed`, so its next-30-days summary is deterministic.

    cli_policy.cmd_check asks `dt.date.today()`; the modules' `dt` is swapped for one
    whose date.today() is fixed (datetime.date itself cannot be patched).
    """

    class FixedDate(dt.date):
        @classmethod
        def today(cls) -> D:
            return fixed

    shim = types.SimpleNamespace(**{k: getattr(dt, k) for k in dir(dt) if not k.startswith("_")})
    shim.date = FixedDate
    monkeypatch.setattr(cli, "dt", shim)
    monkeypatch.setattr(cli_policy, "dt", shim)
    return fixed


@pytest.fixture
def today_2026_02_10(monkeypatch: pytest.MonkeyPatch) -> D:
    return freeze_today(monkeypatch, D(2026, 2, 10))


# Rest days 2026-02-10..2026-03-11 under the default rules: the Spring Festival and the
# ordinary weekends, but not the make-up Saturdays 02-14 and 02-28.
NEXT_30_FROM_2026_02_10 = [*days(D(2026, 2, 15), D(2026, 2, 23)),
                           D(2026, 3, 1), D(2026, 3, 7), D(2026, 3, 8)]


def policy_routes(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text(encoding="utf-8"))["routes"])


# ---------------------------------------------------------------- check

def test_check_valid_policy_summarizes_it(capsys: pytest.CaptureFixture[str],
                                          today_2026_02_10: D) -> None:
    """check on the default policy exits 0 and lists its routes and the next 30 days'
    rest days (Spring Festival in, make-up Saturdays out)."""
    rc, out, err = run(capsys, "check", str(DEFAULT_POLICY))
    assert rc == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{DEFAULT_POLICY}: valid (version 1, sha ")
    for r in policy_routes(DEFAULT_POLICY):
        assert any(line.split()[:1] == [r["prefix"]] for line in lines), r["prefix"]
    header = "  rest days in the next 30 days (12):"
    assert header in lines
    listed = lines[lines.index(header) + 1: lines.index(header) + 13]
    assert [D.fromisoformat(line.split()[0]) for line in listed] == NEXT_30_FROM_2026_02_10
    assert "    2026-02-20 holiday: Spring Festival" in listed
    assert "2026-02-14" not in out
    assert "2026-02-28" not in out


def test_check_valid_policy_json(capsys: pytest.CaptureFixture[str], today_2026_02_10: D) -> None:
    """check --format json prints one object: valid, the routes in order, the rest days."""
    rc, out, _ = run(capsys, "check", str(DEFAULT_POLICY), "--format", "json")
    assert rc == 0
    s = json.loads(out)
    assert s["valid"] is True
    assert s["version"] == 1
    assert s["calendar_covered_until"] == "2026-12-31"
    want = [(r["prefix"], r["kind"], r.get("category", "forbidden"))
            for r in policy_routes(DEFAULT_POLICY)]
    assert [(r["prefix"], r["kind"], r["category"]) for r in s["routes"]] == want
    base = s["regions"]["base"]
    assert [D.fromisoformat(x.split()[0]) for x in base["rest_days_next_30"]] == \
        NEXT_30_FROM_2026_02_10
    assert (base["timezone"], base["max_duration"], base["min_break"]) == \
        ("Asia/Shanghai", "30m", "10m")


def test_check_summarizes_regions(capsys: pytest.CaptureFixture[str], today_2026_02_10: D) -> None:
    """check lists each region with its own zone and curfew."""
    rc, out, _ = run(capsys, "check", str(CLI_POLICY), "--format", "json")
    assert rc == 0
    reg = json.loads(out)["regions"]["650000"]
    assert (reg["timezone"], reg["curfew"]) == ("Asia/Urumqi", "22:00:00-07:00:00")


def test_check_warns_when_the_next_30_days_leave_the_calendar(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """From 2026-12-20 the next 30 days reach into 2027: check warns, and still exits 0."""
    freeze_today(monkeypatch, D(2026, 12, 20))
    rc, out, _ = run(capsys, "check", str(CLI_POLICY))
    assert rc == 0
    assert "WARNING: the national calendar has no data" in out
    rc, out, _ = run(capsys, "check", str(CLI_POLICY), "--format", "json")
    assert json.loads(out)["regions"]["base"]["calendar_covered"] is False


BAD_POLICY = """\
version: 1
lesson:
  max_duration: ten minutes
curfew:
  start: 23:00
  end: "06:00"
colour: blue
routes:
  - {prefix: /classroom/subject/, kind: lesson, category: subject}
"""


def bad_lines(path: Path) -> list[str]:
    return [f"{path}: lesson.max_duration: a duration is an integer with a unit s, m or h "
            "(e.g. 30m), got 'ten minutes' (line 3)",
            f"{path}: curfew.start: times must be quoted strings: YAML reads an unquoted "
            '23:00 as a number; write "23:00" (line 5)',
            f"{path}: colour: unknown key (line 7)"]


def test_check_invalid_policy_prints_one_line_per_problem(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """check on a bad policy exits 2 with `FILE: field.path: message (line N)` per problem."""
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_POLICY, encoding="utf-8")
    rc, out, err = run(capsys, "check", str(path))
    assert rc == 2
    assert sorted((out + err).splitlines()) == sorted(bad_lines(path))


def test_check_invalid_policy_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """check --format json on a bad policy prints {valid: false, errors: [...]} and exits 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_POLICY, encoding="utf-8")
    rc, out, _ = run(capsys, "check", str(path), "--format", "json")
    assert rc == 2
    got = json.loads(out)
    assert got["valid"] is False
    assert sorted((e["path"], e["line"]) for e in got["errors"]) == \
        [("colour", 7), ("curfew.start", 5), ("lesson.max_duration", 3)]
    assert {e["path"]: e["message"] for e in got["errors"]}["colour"] == "unknown key"


def test_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """check on a file that does not exist exits 2 and names it."""
    rc, out, err = run(capsys, "check", str(tmp_path / "nope.yaml"))
    assert rc == 2
    assert str(tmp_path / "nope.yaml") in out + err


# ---------------------------------------------------------------- explain

CONTRACT_KEYS = {"decision", "rule", "retry_after", "lesson_remaining", "checked"}


def explain(capsys: pytest.CaptureFixture[str], *extra: str,
            policy: Path = CLI_POLICY, path: str = SUBJECT) -> dict[str, Any]:
    rc, out, err = run(capsys, "explain", "--policy", str(policy), "--path", path,
                       "--format", "json", *extra)
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1  # one object
    result: dict[str, Any] = json.loads(out)
    assert result.keys() >= CONTRACT_KEYS
    assert result["decision"] in ("allow", "deny")
    for c in result["checked"]:
        assert set(c) == {"rule", "applies", "why"}
        assert isinstance(c["applies"], bool)
        assert isinstance(c["why"], str)
    codes = [c["rule"] for c in result["checked"]]
    assert codes == [r for r in RULE_ORDER if r in codes]
    for key in ("retry_after", "lesson_remaining"):
        assert result[key] is None or isinstance(result[key], int)
    return result


def contract_part(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("decision", "rule", "retry_after", "lesson_remaining")}


def test_explain_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    """An allowed subject request on a school-day morning: a new 30-minute lesson."""
    r = explain(capsys, "--at", "2026-03-03T10:00", "--grade", "5")
    assert contract_part(r) == {"decision": "allow", "rule": None, "retry_after": None,
                                "lesson_remaining": 1800}
    assert [c["rule"] for c in r["checked"]] == ["forbidden_feature", "identity_required",
                                                 "bad_identity", "preschool", "curfew",
                                                 "rest_day", "break_required"]
    assert not any(c["applies"] for c in r["checked"])


def test_explain_curfew_denial(capsys: pytest.CaptureFixture[str]) -> None:
    """At 23:30 the answer is curfew, retry_after the 6.5 hours to 06:00."""
    r = explain(capsys, "--at", "2026-03-03T23:30")
    assert contract_part(r) == {"decision": "deny", "rule": "curfew", "retry_after": 23400,
                                "lesson_remaining": None}
    assert r["checked"][-1] == {"rule": "curfew", "applies": True, "why": r["checked"][-1]["why"]}
    golden("explain-curfew.json", r)


def test_explain_at_with_an_offset(capsys: pytest.CaptureFixture[str]) -> None:
    """--at with an explicit UTC offset is that instant (15:30Z is 23:30 in Shanghai)."""
    r = explain(capsys, "--at", "2026-03-03T15:30:00+00:00")
    assert (r["rule"], r["retry_after"]) == ("curfew", 23400)


def test_explain_break_required_after_a_full_lesson(capsys: pytest.CaptureFixture[str]) -> None:
    """A lesson started 31 minutes ago ended at 30; the break lasts until 40: 540 s left."""
    r = explain(capsys, "--at", "2026-03-03T10:31", "--lesson-started", "2026-03-03T10:00")
    assert contract_part(r) == {"decision": "deny", "rule": "break_required",
                                "retry_after": 540, "lesson_remaining": None}


def test_explain_lesson_in_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """750.7 s into a lesson, 1049.3 s remain: 1049 in whole seconds, rounded down."""
    r = explain(capsys, "--at", "2026-03-03T10:12:30.700", "--lesson-started",
                "2026-03-03T10:00")
    assert contract_part(r) == {"decision": "allow", "rule": None, "retry_after": None,
                                "lesson_remaining": 1049}


def test_explain_rounds_retry_after_up(capsys: pytest.CaptureFixture[str]) -> None:
    """retry_after is whole seconds rounded up (0.3 s before 06:00 -> 1)."""
    r = explain(capsys, "--at", "2026-03-04T05:59:59.700")
    assert (r["rule"], r["retry_after"]) == ("curfew", 1)


def test_explain_lesson_cut_by_curfew(capsys: pytest.CaptureFixture[str]) -> None:
    """A lesson starting at 22:50 has 600 s before the curfew."""
    r = explain(capsys, "--at", "2026-03-03T22:50")
    assert (r["decision"], r["lesson_remaining"]) == ("allow", 600)


def test_explain_rest_day(capsys: pytest.CaptureFixture[str]) -> None:
    """A subject class on a Spring Festival Sunday is a rest_day until Tue 02-24 00:00."""
    r = explain(capsys, "--at", "2026-02-15T10:00")
    assert contract_part(r) == {"decision": "deny", "rule": "rest_day",
                                "retry_after": 14 * 3600 + 8 * 86400, "lesson_remaining": None}


def test_explain_region(capsys: pytest.CaptureFixture[str]) -> None:
    """--region 650000 uses Urumqi time: 23:40 in Shanghai is 21:40 there, 20 min to curfew."""
    r = explain(capsys, "--at", "2026-03-03T23:40", "--region", "650000")
    assert contract_part(r) == {"decision": "allow", "rule": None, "retry_after": None,
                                "lesson_remaining": 1200}
    base = explain(capsys, "--at", "2026-03-03T23:40", "--region", "110000")
    assert base["rule"] == "curfew"


def test_explain_preschool(capsys: pytest.CaptureFixture[str]) -> None:
    """--grade preschool is denied outright, with no retry time."""
    r = explain(capsys, "--at", "2026-03-03T10:00", "--grade", "preschool")
    assert contract_part(r) == {"decision": "deny", "rule": "preschool", "retry_after": None,
                                "lesson_remaining": None}


def test_explain_bad_grade(capsys: pytest.CaptureFixture[str]) -> None:
    """--grade 13 is answered (exit 0) as bad_identity."""
    r = explain(capsys, "--at", "2026-03-03T10:00", "--grade", "13")
    assert (r["decision"], r["rule"]) == ("deny", "bad_identity")


def test_explain_forbidden_feature(capsys: pytest.CaptureFixture[str]) -> None:
    """A forbidden route is forbidden_feature at any hour, without retry."""
    r = explain(capsys, "--at", "2026-03-03T10:00", path="/api/photo-search")
    assert contract_part(r) == {"decision": "deny", "rule": "forbidden_feature",
                                "retry_after": None, "lesson_remaining": None}


def test_explain_passthrough_path(capsys: pytest.CaptureFixture[str]) -> None:
    """A path no route matches is allowed, unenforced, with nothing checked."""
    r = explain(capsys, "--at", "2026-03-03T23:30", path="/about")
    assert contract_part(r) == {"decision": "allow", "rule": None, "retry_after": None,
                                "lesson_remaining": None}
    assert r["checked"] == []


def test_explain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """The text form names the decision, the rule and the retry time."""
    rc, out, _ = run(capsys, "explain", "--policy", str(CLI_POLICY), "--path", SUBJECT,
                     "--at", "2026-03-03T23:30")
    assert rc == 0
    assert "DENY (curfew)" in out.splitlines()[0]
    assert "retry after 6 h 30 m (23400 s)" in out
    assert out.splitlines()[-1] == "  legend: [x] the rule applies, [-] it does not"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (59, "59 s"), (60, "1 m"), (725, "12 m 5 s"), (3600, "1 h"),
    (12000, "3 h 20 m"), (86400, "1 d"), (363600, "4 d 5 h"),
])
def test_explain_durations_read_as_days_hours_minutes(seconds: int, text: str) -> None:
    """explain's text form gives durations in d/h/m/s, largest two units."""
    from gateway.durations import human_duration
    assert human_duration(seconds) == text


@pytest.mark.parametrize("argv", [
    ["--at", "yesterday"],
    ["--at", "2026-13-01T10:00"],
    ["--at", "2026-03-03T10:00", "--lesson-started", "soon"],
    ["--at", "2026-03-03T10:00", "--lesson-started", "2026-03-03T10:30"],
], ids=["words", "month-13", "bad-lesson-started", "started-after-at"])
def test_explain_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str],
                                      argv: list[str]) -> None:
    """A bad --at or --lesson-started exits 2 with a message on stderr and no answer."""
    rc, out, err = run(capsys, "explain", "--policy", str(CLI_POLICY), "--path", SUBJECT,
                       "--format", "json", *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith("tutorgate: ")


def test_explain_path_must_be_absolute(capsys: pytest.CaptureFixture[str]) -> None:
    """--path without a leading / exits 2."""
    rc, out, _ = run(capsys, "explain", "--policy", str(CLI_POLICY), "--path", "classroom",
                     "--at", "2026-03-03T10:00")
    assert (rc, out) == (2, "")


def test_explain_invalid_policy_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """explain with an invalid policy exits 2 with its problem lines."""
    bad = FIXTURES / "bad" / "duration-zero.yaml"
    rc, out, err = run(capsys, "explain", "--policy", str(bad), "--path", SUBJECT,
                       "--at", "2026-03-03T10:00")
    assert rc == 2
    assert f"{bad}: lesson.min_break: must be > 0s (line 4)" in (out + err).splitlines()


def test_explain_requires_at() -> None:
    """Leaving out --at is a usage error, exit 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(["explain", "--policy", str(CLI_POLICY), "--path", SUBJECT])
    assert info.value.code == 2


# ---------------------------------------------------------------- calendar

def expected_2026_cli_policy() -> list[tuple[str, str]]:
    """(date, reason) of every 2026 day closed to subject classes under
    tests/fixtures/good/cli.yaml, worked out from the 2026 notice and the file."""
    summer = set(days(D(2026, 7, 11), D(2026, 8, 31)))
    out = []
    for d in days(D(2026, 1, 1), D(2026, 12, 31)):
        if d == D(2026, 12, 1):
            reason = "extra"
        elif d in summer:
            reason = "vacation"
        elif d == D(2026, 12, 5):          # extra_workdays
            continue
        elif d in HOLIDAY_DAYS_2026:
            reason = "holiday"
        elif d in MAKEUP_2026:
            continue
        elif d.weekday() >= 5:
            reason = "weekend"
        else:
            continue
        out.append((d.isoformat(), reason))
    return out


def test_calendar_2026_json(capsys: pytest.CaptureFixture[str]) -> None:
    """calendar 2026 lists, in date order, exactly the holidays, weekends, vacation and
    extra days, without make-up working days."""
    rc, out, err = run(capsys, "calendar", "2026", "--policy", str(CLI_POLICY),
                       "--format", "json")
    assert (rc, err) == (0, "")
    got = json.loads(out)
    assert all(set(d) == {"date", "reason", "name"} for d in got)
    assert [(d["date"], d["reason"]) for d in got] == expected_2026_cli_policy()
    by_date = {d["date"]: d for d in got}
    for d in days(D(2026, 2, 15), D(2026, 2, 23)):
        assert by_date[d.isoformat()]["name"] == "Spring Festival"
    for absent in ("2026-02-14", "2026-02-28", "2026-09-20", "2026-10-10", "2026-12-05"):
        assert absent not in by_date
    assert by_date["2026-03-07"]["name"] == "Saturday"
    assert by_date["2026-07-15"]["name"] == "summer"
    golden("calendar-2026-cli.json", got)


def test_calendar_text(capsys: pytest.CaptureFixture[str]) -> None:
    """The text form prints one line per day and the count."""
    rc, out, _ = run(capsys, "calendar", "2026", "--policy", str(CLI_POLICY))
    assert rc == 0
    lines = out.splitlines()
    n = len(expected_2026_cli_policy())
    assert len(lines) == n + 1
    assert lines[-1] == f"{n} days closed to subject classes in 2026"
    assert lines[0].split()[:2] == ["2026-01-01", "holiday"]


def test_calendar_region(capsys: pytest.CaptureFixture[str]) -> None:
    """--region uses the region's vacations."""
    rc, out, _ = run(capsys, "calendar", "2027", "--policy", str(CLI_POLICY), "--region",
                     "650000", "--format", "json")
    assert rc == 3  # 2027 is not in the packaged data
    by_date = {d["date"]: d for d in json.loads(out)}
    assert all(by_date[d.isoformat()]["reason"] == "vacation"
               for d in days(D(2027, 1, 10), D(2027, 2, 20)))
    assert by_date["2027-01-12"]["name"] == "winter"


def test_calendar_gap_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    """calendar 2027 without calendar files exits 3 and says so on stderr."""
    rc, out, err = run(capsys, "calendar", "2027", "--policy", str(CLI_POLICY),
                       "--format", "json")
    assert rc == 3
    assert "2027" in err
    assert "calendar_files" in err
    json.loads(out)  # the days it could work out are still printed


def test_calendar_supplied_year_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """With a calendar file for 2027, calendar 2027 exits 0 with the supplied holidays."""
    rc, out, err = run(capsys, "calendar", "2027", "--policy", str(WITH_2027),
                       "--format", "json")
    assert (rc, err) == (0, "")
    by_date = {d["date"]: d for d in json.loads(out)}
    assert by_date["2027-02-08"] == {"date": "2027-02-08", "reason": "holiday",
                                     "name": "Spring Festival"}
    assert "2027-02-20" not in by_date       # supplied make-up Saturday
    assert by_date["2027-02-27"]["reason"] == "weekend"


def test_calendar_without_statutory_holidays_has_no_gap(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    """A policy that ignores the national calendar covers 2027: exit 0, weekends only."""
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrest_days: {statutory_holidays: false, vacations: []}\n"
                    "routes: [{prefix: /s/, kind: lesson, category: subject}]\n",
                    encoding="utf-8")
    rc, out, err = run(capsys, "calendar", "2027", "--policy", str(path), "--format", "json")
    assert (rc, err) == (0, "")
    got = json.loads(out)
    assert {d["reason"] for d in got} == {"weekend"}
    assert len(got) == sum(1 for d in days(D(2027, 1, 1), D(2027, 12, 31)) if d.weekday() >= 5)


def test_calendar_year_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    """An absurd year exits 2."""
    rc, _, err = run(capsys, "calendar", "1066", "--policy", str(CLI_POLICY))
    assert rc == 2
    assert "1066" in err


# ---------------------------------------------------------------- the real command

def test_installed_command_check() -> None:
    """The installed `tutorgate check` validates the default policy (exit 0) and refuses
    a bad one (exit 2) with its problem line."""
    ok = subprocess.run([str(TUTORGATE), "check", str(DEFAULT_POLICY)], capture_output=True,
                        text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert f"{DEFAULT_POLICY}: valid" in ok.stdout
    bad = FIXTURES / "bad" / "unknown-key-top.yaml"
    no = subprocess.run([str(TUTORGATE), "check", str(bad)], capture_output=True, text=True,
                        timeout=60, check=False)
    assert no.returncode == 2
    assert (no.stdout + no.stderr).splitlines() == [
        f"{bad}: timezon: unknown key; did you mean timezone? (line 2)"]


def test_installed_command_calendar_gap() -> None:
    """The installed `tutorgate calendar 2027` exits 3 with the gap on stderr."""
    p = subprocess.run([str(TUTORGATE), "calendar", "2027", "--policy", str(CLI_POLICY),
                        "--format", "json"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 3
    assert "no data for 2027" in p.stderr
    assert isinstance(json.loads(p.stdout), list)


# ---------------------------------------------------------------- help texts

def _walk(parser: Any, name: str = "tutorgate") -> Any:
    import argparse
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _walk(sub, f"{name} {sub_name}")


def test_every_command_and_option_has_help() -> None:
    """Every subcommand has a description and every option and argument a help text."""
    import argparse
    missing = []
    for name, parser in _walk(cli.build_parser()):
        if name != "tutorgate" and not (parser.description or "").strip():
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name}: {action.option_strings or action.dest}")
    assert missing == []


def test_serve_help_lists_every_environment_setting() -> None:
    """`serve --help` names every TUTORGATE_ variable the gateway's code reads."""
    code = "\n".join(p.read_text() for p in Path(cli.__file__).parent.rglob("*.py"))
    used = set(re.findall(r"\"(TUTORGATE_[A-Z_]+)\"", code))
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert {"TUTORGATE_ID_SECRET", "TUTORGATE_MAX_BODY", "TUTORGATE_LOG_FORMAT",
            "TUTORGATE_HEADER_TIMEOUT"} <= set(re.findall(r"TUTORGATE_[A-Z_]+", help_text))
    assert sorted(v for v in used if v not in help_text) == []
# ---------------------------------------------------------------- beyond the calendar (issue 10)

SHIPPED_POLICIES = sorted((ROOT / "policies").glob("*.yaml"))
SPRING_FESTIVAL_2027 = days(D(2027, 2, 5), D(2027, 2, 8))   # eve + days 1-3


@pytest.mark.parametrize("day", [D(2027, 1, 1), *SPRING_FESTIVAL_2027], ids=str)
@pytest.mark.parametrize("policy", SHIPPED_POLICIES, ids=lambda p: p.name)
def test_explain_beyond_the_data_is_a_provisional_rest_day(
        capsys: pytest.CaptureFixture[str], policy: Path, day: D) -> None:
    """On New Year's Day and the Spring Festival 2027 every shipped policy denies subject
    classes with rest_day, marked provisional (the bug: "2027-01-01 is a school day")."""
    rc, out, err = run(capsys, "explain", "--policy", str(policy), "--path",
                       "/classroom/subject/math", "--at", f"{day}T10:00", "--grade", "5",
                       "--format", "json")
    assert (rc, err) == (0, "")
    r = json.loads(out)
    assert (r["decision"], r["rule"], r.get("provisional")) == ("deny", "rest_day", True)
    assert "provisional" in r["checked"][-1]["why"]


def test_explain_text_marks_provisional(capsys: pytest.CaptureFixture[str]) -> None:
    """The text form of a provisional answer says so in its own line."""
    rc, out, _ = run(capsys, "explain", "--policy", str(DEFAULT_POLICY), "--path", SUBJECT,
                     "--at", "2027-01-01T10:00", "--grade", "5")
    assert rc == 0
    assert "school day" not in out
    assert any(line.strip().startswith("provisional:") for line in out.splitlines())


def test_explain_within_the_data_is_not_provisional(capsys: pytest.CaptureFixture[str]) -> None:
    """A covered date (2026-12-02, a Wednesday) answers without the provisional key."""
    rc, out, _ = run(capsys, "explain", "--policy", str(DEFAULT_POLICY), "--path", SUBJECT,
                     "--at", "2026-12-02T10:00", "--grade", "5", "--format", "json")
    assert rc == 0
    r = json.loads(out)
    assert r["decision"] == "allow"
    assert "provisional" not in r


def test_explain_school_day_beyond_the_data_is_provisional(
        capsys: pytest.CaptureFixture[str]) -> None:
    """An allowed subject lesson on Monday 2027-01-04 is provisional too: the notice may
    make it a day off in lieu."""
    rc, out, _ = run(capsys, "explain", "--policy", str(DEFAULT_POLICY), "--path", SUBJECT,
                     "--at", "2027-01-04T10:00", "--grade", "5", "--format", "json")
    assert rc == 0
    r = json.loads(out)
    assert (r["decision"], r.get("provisional")) == ("allow", True)


def test_calendar_2027_lists_provisional_days_and_exits_3(
        capsys: pytest.CaptureFixture[str]) -> None:
    """calendar 2027 --format json lists the law's days and weekends with "provisional": true
    (only those), reports the uncovered dates on stderr and exits 3."""
    rc, out, err = run(capsys, "calendar", "2027", "--policy", str(CLI_POLICY),
                       "--format", "json")
    assert rc == 3
    assert "2027-01-01..2027-12-31" in err
    by_date = {d["date"]: d for d in json.loads(out)}
    assert by_date["2027-01-01"] == {"date": "2027-01-01", "reason": "holiday",
                                     "name": "New Year's Day", "provisional": True}
    assert by_date["2027-06-09"]["name"] == "Dragon Boat Festival"   # a Wednesday
    assert by_date["2027-01-09"]["provisional"] is True               # a Saturday
    assert "2027-01-04" not in by_date
    assert all(d["provisional"] is True for d in by_date.values()
               if d["reason"] in ("holiday", "weekend"))
    assert all("provisional" not in d for d in by_date.values()
               if d["reason"] in ("vacation", "extra"))


def test_calendar_covered_year_has_no_provisional_key(capsys: pytest.CaptureFixture[str]) -> None:
    """A supplied 2027 is official: no entry carries "provisional"."""
    rc, out, _ = run(capsys, "calendar", "2027", "--policy", str(WITH_2027), "--format", "json")
    assert rc == 0
    assert all("provisional" not in d for d in json.loads(out))


def test_calendar_include_workdays(capsys: pytest.CaptureFixture[str]) -> None:
    """--include-workdays merges the make-up school days in, reason "workday", in date
    order; without it the list is unchanged (closed days only)."""
    rc, out, _ = run(capsys, "calendar", "2026", "--policy", str(CLI_POLICY), "--format",
                     "json", "--include-workdays")
    assert rc == 0
    got = json.loads(out)
    assert [d["date"] for d in got] == sorted(d["date"] for d in got)
    work = {d["date"] for d in got if d["reason"] == "workday"}
    # cli.yaml: 2026-12-05 is an extra workday (a Saturday)
    assert work == {d.isoformat() for d in MAKEUP_2026} | {"2026-12-05"}
    assert [(d["date"], d["reason"]) for d in got if d["reason"] != "workday"] == \
        expected_2026_cli_policy()
    rc, text, _ = run(capsys, "calendar", "2026", "--policy", str(CLI_POLICY),
                      "--include-workdays")
    assert "2026-02-14  workday" in text
    assert text.splitlines()[-1] == \
        f"{len(expected_2026_cli_policy())} days closed to subject classes in 2026"


@pytest.mark.parametrize(("today", "warns"), [(D(2026, 10, 31), False), (D(2026, 11, 2), True),
                                              (D(2026, 12, 1), True), (D(2027, 1, 1), True)])
def test_check_warns_60_days_before_the_data_ends(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        today: D, warns: bool) -> None:
    """check warns (and still exits 0) from 60 days before the calendar data ends."""
    freeze_today(monkeypatch, today)
    rc, out, _ = run(capsys, "check", str(DEFAULT_POLICY))
    assert rc == 0
    assert ("WARNING: the holiday calendar" in out) is warns
    rc, out, _ = run(capsys, "check", str(DEFAULT_POLICY), "--format", "json")
    assert (json.loads(out)["calendar_warning"] is not None) is warns


def test_check_no_warning_with_next_years_file(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With the 2027 file in the policy, 2026-12-01 is far from the end: no warning."""
    freeze_today(monkeypatch, D(2026, 12, 1))
    rc, out, _ = run(capsys, "check", str(WITH_2027), "--format", "json")
    assert rc == 0
    assert json.loads(out)["calendar_warning"] is None


def test_check_refuses_a_calendar_file_missing_a_law_day(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A 2027 file without the Spring Festival eve and Mid-Autumn is refused (exit 2), the
    message naming both days."""
    (tmp_path / "calendars").mkdir()
    (tmp_path / "calendars" / "cn-2027.yaml").write_text(
        "year: 2027\nholidays:\n"
        "  - {name: New Year's Day, start: 2027-01-01, end: 2027-01-01}\n"
        "  - {name: Spring Festival, start: 2027-02-06, end: 2027-02-12}\n"
        "  - {name: Tomb-sweeping Day, start: 2027-04-05, end: 2027-04-05}\n"
        "  - {name: Labour Day, start: 2027-05-01, end: 2027-05-05}\n"
        "  - {name: Dragon Boat Festival, start: 2027-06-09, end: 2027-06-09}\n"
        "  - {name: National Day, start: 2027-10-01, end: 2027-10-07}\n", encoding="utf-8")
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrest_days:\n  calendar_files: [calendars/cn-2027.yaml]\n"
                      "routes: [{prefix: /s/, kind: lesson, category: subject}]\n",
                      encoding="utf-8")
    rc, out, _ = run(capsys, "check", str(policy))
    assert rc == 2
    (line,) = out.splitlines()
    assert line.startswith(f"{policy}: rest_days.calendar_files[0]: calendars/cn-2027.yaml: "
                           "holidays: misses statutory day(s)")
    assert "2027-02-05 (Spring Festival)" in line
    assert "2027-09-15 (Mid-autumn Festival)" in line


def test_shipped_example_calendar_file_passes_check(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """policies/calendars/cn-2027.example.yaml, the template for the notice, validates."""
    example = ROOT / "policies" / "calendars" / "cn-2027.example.yaml"
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: 1\nrest_days:\n  calendar_files: [{example}]\n"
                      "routes: [{prefix: /s/, kind: lesson, category: subject}]\n",
                      encoding="utf-8")
    rc, out, _ = run(capsys, "check", str(policy))
    assert rc == 0, out


def test_serve_on_new_years_day_2027_denies_and_says_provisional(tmp_path: Path) -> None:
    """`tutorgate serve` with its clock on 2027-01-01 (faketime) warns at start, denies a
    subject lesson with 403 rest_day and shows tutorgate_calendar_provisional 1."""
    import shutil
    import time
    import urllib.error
    import urllib.request

    from kit import free_port

    faketime = shutil.which("faketime")
    assert faketime, "faketime is required (apt-get install faketime)"
    port, admin = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [faketime, "-f", "@2027-01-01 02:00:00", str(TUTORGATE), "serve", "--policy",
             str(DEFAULT_POLICY), "--upstream", f"http://127.0.0.1:{free_port()}",
             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
            stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "TUTORGATE_ID_SECRET": "x", "TZ": "UTC"})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics",
                                            timeout=2) as r:
                    metrics = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert "tutorgate_calendar_provisional 1.0" in metrics
        req = urllib.request.Request(f"http://127.0.0.1:{port}{SUBJECT}",
                                     headers={"X-Student-Id": "s1", "X-Student-Grade": "5"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 403
        assert json.loads(info.value.read())["rule"] == "rest_day"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert "PROVISIONAL rest days" in log.read_text()


def test_explain_reasons_give_durations_in_hours_and_minutes(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The curfew reason says when the curfew starts in h/m, not in raw seconds."""
    rc, out, _ = run(capsys, "explain", "--policy", str(DEFAULT_POLICY), "--path", SUBJECT,
                     "--at", "2026-12-02T10:00", "--grade", "5", "--format", "json")
    assert rc == 0
    (curfew,) = [c for c in json.loads(out)["checked"] if c["rule"] == "curfew"]
    assert curfew["why"].endswith("it starts in 13 h"), curfew["why"]
