"""Logs and request ids: JSON lines from a real `tutorgate serve`, the access
log, denials logged by pseudonym, X-Request-Id kept, generated or replaced."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kit import ARTS, FORBIDDEN, SUBJECT, headers_of, make_policy, policy_text, spawn_gateway

from gateway.identity import Pseudonymizer

RAW_ID = "stu-secret-4711"


def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_json_logs_of_a_real_serve_parse_and_carry_the_fields(
        tmp_path: Path, upstream_process: str) -> None:
    """`serve` with TUTORGATE_LOG_FORMAT=json and --access-log writes one JSON
    object a line (time, level, message), denials at INFO with the rule, and
    request ids, instance and pseudonyms as fields; never the raw student id."""
    pol = tmp_path / "p.yaml"
    pol.write_text(policy_text(max_duration="1h"))
    log_path = tmp_path / "gw.log"
    with log_path.open("wb") as err:
        gw = spawn_gateway(str(pol), upstream_process, secret="s3", args=("--access-log",),
                           env={"TUTORGATE_LOG_FORMAT": "json", "TUTORGATE_INSTANCE": "gw-a"},
                           stderr=err)
        try:
            who = {"X-Student-Id": RAW_ID}
            assert get(gw.url(ARTS), {**who, "X-Request-Id": "lesson-1"})[0] == 200
            assert get(gw.url(FORBIDDEN), {"X-Request-Id": "deny-1"})[0] == 403
            assert get(gw.url(SUBJECT + "?name=" + RAW_ID), who)[0] in (200, 429)
        finally:
            gw.stop()
    text = log_path.read_text()
    assert RAW_ID not in text
    lines = [json.loads(ln) for ln in text.splitlines()]  # every line parses
    assert lines and all({"time", "level", "message"} <= set(ln) for ln in lines)
    assert all(ln["instance"] == "gw-a" for ln in lines)
    assert any("memory" in ln["message"] for ln in lines)
    deny = [ln for ln in lines if ln["logger"] == "tutorgate.proxy" and ln.get("rule")]
    assert [(d["level"], d["rule"], d["request_id"], d["route"]) for d in deny] == \
        [("INFO", "forbidden_feature", "deny-1", "/api/photo-search")]
    access = {ln["request_id"]: ln for ln in lines if ln["logger"] == "tutorgate.access"}
    lesson = access["lesson-1"]
    assert lesson["student"] == Pseudonymizer(b"s3")(RAW_ID)
    assert (lesson["status"], lesson["route"], lesson["method"]) == (200, "/classroom/arts/", "GET")
    assert access["deny-1"]["status"] == 403 and "student" not in access["deny-1"]
    assert len(access) == 3


def test_text_logs_name_the_fields(tmp_path: Path, upstream_process: str) -> None:
    """The text format appends the same fields as key=value to the line."""
    pol = tmp_path / "p.yaml"
    pol.write_text(policy_text(max_duration="1h"))
    log_path = tmp_path / "gw.log"
    with log_path.open("wb") as err:
        gw = spawn_gateway(str(pol), upstream_process, args=("--log-format", "text"),
                           env={"TUTORGATE_INSTANCE": "gw-b"}, stderr=err)
        try:
            assert get(gw.url(FORBIDDEN), {"X-Request-Id": "deny-2"})[0] == 403
        finally:
            gw.stop()
    deny = [ln for ln in log_path.read_text().splitlines() if "denied" in ln]
    assert len(deny) == 1
    assert re.search(r" INFO tutorgate\.proxy: denied: forbidden_feature .* "
                     r"request_id=deny-2 rule=forbidden_feature route=/api/photo-search "
                     r"region=base instance=gw-b$", deny[0]), deny[0]


@pytest.mark.parametrize(("sent", "kept"), [
    ("abc-DEF_1.2", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("has space", False),
    ("semi;colon", False),
    ("", False),
    (None, False),
])
async def test_request_id_kept_if_valid_else_generated(
        upstream: Any, gateways: Any, http: Any, sent: str | None, kept: bool) -> None:
    """A valid X-Request-Id goes upstream and back unchanged; a missing or invalid
    one is replaced by a generated id, the same upstream and to the client."""
    gw = await gateways(make_policy(max_duration="1h"), upstream.url)
    headers = {"X-Student-Id": "stu-1"}
    if sent is not None:
        headers["X-Request-Id"] = sent
    async with http.get(gw.url(ARTS), headers=headers) as r:
        assert r.status == 200
        back = r.headers["X-Request-Id"]
        upstream_saw = headers_of(await r.json())["x-request-id"]
    assert back == upstream_saw
    if kept:
        assert back == sent
    else:
        assert back != sent and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", back)


async def test_request_ids_are_unique_and_on_denials_and_passthrough(
        upstream: Any, gateways: Any, http: Any) -> None:
    """Generated ids differ per request; denials and unenforced routes carry one too."""
    gw = await gateways(make_policy(max_duration="1h"), upstream.url)
    seen = set()
    for path in (FORBIDDEN, "/plain/x", "/plain/y", "/_tutorgate/status"):
        async with http.get(gw.url(path)) as r:
            await r.read()
            seen.add(r.headers["X-Request-Id"])
    async with http.get(gw.url(FORBIDDEN), headers={"X-Request-Id": "mine"}) as r:
        assert r.status == 403 and r.headers["X-Request-Id"] == "mine"
    assert len(seen) == 4
