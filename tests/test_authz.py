"""The decision service (/_tutorgate/authz): the answers serve would give,
without proxying, on a real redis-server shared with a serve instance."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from authz_kit import AUTHZ, STATEFUL, STATELESS, assert_same_denial, fetch, rules_policy
from kit import ARTS, FORBIDDEN, SUBJECT, free_port, metric, near_local_midnight, policy_text

EXE = str(Path(sys.executable).parent / "tutorgate")


@pytest.fixture
async def pair(redis_server, upstream, gateways):  # type: ignore[no-untyped-def]
    """`tutorgate authz` (no upstream) and `tutorgate serve` on one Redis and policy."""
    redis_server.flush()
    text = rules_policy()
    authz = await gateways(text, "", redis_url=redis_server.url)
    serve = await gateways(text, upstream.url, redis_url=redis_server.url)
    return authz, serve


def ask(path: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers of a check as nginx sends them: the original target raw."""
    return {"X-Original-URI": path, **(headers or {})}


@pytest.mark.skipif(near_local_midnight(), reason="rest_day and curfew regions move at midnight")
async def test_every_denial_is_the_one_serve_gives(pair, http):  # type: ignore[no-untyped-def]
    """For every rule, the check answers the status, body and Retry-After of serve."""
    authz, serve = pair
    for rule, path, headers in STATELESS:
        got = await fetch(http, authz.url(AUTHZ), ask(path, headers))
        want = await fetch(http, serve.url(path), headers)
        assert_same_denial(got, want, rule)
        assert got.headers["x-tutorgate-decision"] == "deny"
        assert got.headers["x-tutorgate-rule"] == rule
    for rule, headers in STATEFUL:
        first = await fetch(http, authz.url(AUTHZ), ask(SUBJECT, headers))
        assert first.status == 200, rule
    await asyncio.sleep(1.1)
    for rule, headers in STATEFUL:
        got = await fetch(http, authz.url(AUTHZ), ask(SUBJECT, headers))
        want = await fetch(http, serve.url(SUBJECT), headers)
        assert_same_denial(got, want, rule)
        assert got.headers["x-tutorgate-rule"] == rule


async def test_html_and_english_denials_match_serve(pair, http):  # type: ignore[no-untyped-def]
    """Accept and Accept-Language choose the page and language as in serve."""
    authz, serve = pair
    for extra in ({"Accept": "text/html"}, {"Accept-Language": "en"},
                  {"Accept": "text/html,*/*;q=0.8", "Accept-Language": "en-GB"}):
        headers = {"X-Student-Id": "s-pre", "X-Student-Grade": "preschool", **extra}
        got = await fetch(http, authz.url(AUTHZ), ask(SUBJECT, headers))
        want = await fetch(http, serve.url(SUBJECT), headers)
        assert_same_denial(got, want, "preschool")


async def test_state_unavailable_matches_serve(upstream, gateways, http):  # type: ignore[no-untyped-def]
    """With the store down (fail_closed), the check answers serve's 503."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    authz = await gateways(policy_text(), "", redis_url=dead)
    serve = await gateways(policy_text(), upstream.url, redis_url=dead)
    headers = {"X-Student-Id": "s-down"}
    got = await fetch(http, authz.url(AUTHZ), ask(SUBJECT, headers))
    want = await fetch(http, serve.url(SUBJECT), headers)
    assert_same_denial(got, want, "state_unavailable")


async def test_pass_and_forbidden_touch_no_store(upstream, gateways, http):  # type: ignore[no-untyped-def]
    """Unenforced routes pass and forbidden ones deny without the store: both
    answer with Redis down."""
    authz = await gateways(policy_text(), "", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    r = await fetch(http, authz.url(AUTHZ), ask("/static/app.js"))
    assert (r.status, r.headers["x-tutorgate-decision"], r.body) == (200, "pass", b"")
    r = await fetch(http, authz.url(AUTHZ), ask(FORBIDDEN + "?q=1"))
    assert r.status == 403 and r.json()["rule"] == "forbidden_feature"
    assert metric(authz, "tutorgate_store_latency_seconds_count", op="advance") == 0
    assert metric(authz, "tutorgate_authz_checks_total", answer="pass") == 1
    assert metric(authz, "tutorgate_authz_checks_total", answer="deny") == 1


async def test_allow_carries_lesson_remaining(pair, http):  # type: ignore[no-untyped-def]
    """An allowed lesson check is 200 allow with X-Lesson-Remaining, counted as serve counts."""
    authz, _ = pair
    r = await fetch(http, authz.url(AUTHZ), ask(ARTS, {"X-Student-Id": "s-allow"}))
    assert r.status == 200 and r.body == b""
    assert r.headers["x-tutorgate-decision"] == "allow"
    assert int(r.headers["x-lesson-remaining"]) in (59, 60)
    assert metric(authz, "tutorgate_decisions_total", decision="allow",
                  category="non_subject") == 1
    assert metric(authz, "tutorgate_lessons_started_total") == 1


async def test_where_the_original_target_is_read(pair, http):  # type: ignore[no-untyped-def]
    """X-Forwarded-Uri, else X-Original-URI, else the path after the endpoint
    with the check's own query (Envoy), else /."""
    authz, _ = pair
    sid = {"X-Student-Id": "s-uri"}
    cases = [
        ({"X-Forwarded-Uri": FORBIDDEN, "X-Original-URI": "/static/x"}, AUTHZ, "deny"),
        ({"X-Original-URI": FORBIDDEN}, AUTHZ, "deny"),
        ({}, AUTHZ + FORBIDDEN + "?x=1", "deny"),
        ({}, AUTHZ + "/classroom/subject/../arts/x?y=2", "allow"),
        ({}, AUTHZ + "?only=query", "pass"),
        ({}, AUTHZ, "pass"),
        # the canonical path decides: a dot segment does not walk around a route
        ({"X-Forwarded-Uri": "/static/../api/photo-search"}, AUTHZ, "deny"),
        ({"X-Forwarded-Uri": "/api/photo-search;jsessionid=1"}, AUTHZ, "deny"),
    ]
    for headers, path, want in cases:
        r = await fetch(http, authz.url(path), {**sid, **headers}, method="POST")
        assert r.headers["x-tutorgate-decision"] == want, (headers, path)


async def test_lesson_begun_by_checks_continues_through_serve(pair, http):  # type: ignore[no-untyped-def]
    """A check is lesson activity: the lesson it starts is the one serve continues."""
    authz, serve = pair
    sid = {"X-Student-Id": "s-continue"}
    r = await fetch(http, authz.url(AUTHZ), ask(SUBJECT, sid))
    assert r.headers["x-tutorgate-decision"] == "allow"
    await asyncio.sleep(1.1)
    r = await fetch(http, serve.url(SUBJECT), sid)
    assert r.status == 200 and int(r.headers["x-lesson-remaining"]) <= 58
    assert metric(authz, "tutorgate_lessons_started_total") == 1
    assert metric(serve, "tutorgate_lessons_started_total") == 0


async def test_nginx_mode_and_denial_page(pair, http):  # type: ignore[no-untyped-def]
    """X-Tutorgate-Mode: nginx denies with 403 and the real status in a header;
    /_tutorgate/denial then gives serve's answer."""
    authz, serve = pair
    headers = {"X-Student-Id": "s-cf", "X-Student-Region": "cf"}
    r = await fetch(http, authz.url(AUTHZ), ask(SUBJECT, {**headers, "X-Tutorgate-Mode": "nginx"}))
    assert r.status == 403 and r.body == b""
    assert r.headers["x-tutorgate-status"] == "403" and r.headers["x-tutorgate-rule"] == "curfew"
    retry = r.headers["retry-after"]
    got = await fetch(http, authz.url(f"/_tutorgate/denial?rule=curfew&retry_after={retry}"))
    want = await fetch(http, serve.url(SUBJECT), headers)
    assert_same_denial(got, want, "curfew")
    r = await fetch(http, authz.url(AUTHZ), ask("/x%2F", {"X-Tutorgate-Mode": "nginx"}))
    assert (r.status, r.headers["x-tutorgate-status"]) == (403, "400")
    for bad in ("rule=nope", "rule=curfew&retry_after=-1", "rule=curfew&retry_after=x"):
        r = await fetch(http, authz.url("/_tutorgate/denial?" + bad))
        assert r.status == 400, bad


async def test_serve_answers_the_endpoint_too(pair, http):  # type: ignore[no-untyped-def]
    """serve's main port decides /_tutorgate/authz itself, never forwarding it."""
    _, serve = pair
    r = await fetch(http, serve.url(AUTHZ), ask(ARTS, {"X-Student-Id": "s-serve"}))
    assert r.status == 200 and r.headers["x-tutorgate-decision"] == "allow"
    assert "x-upstream" not in r.headers


async def test_upgrade_check_is_a_plain_lesson_request(pair, http):  # type: ignore[no-untyped-def]
    """A WebSocket upgrade asked about is decided like any lesson request; no
    connection is held by the service."""
    authz, _ = pair
    headers = {"X-Student-Id": "s-ws", "Upgrade": "websocket", "Connection": "Upgrade"}
    r = await fetch(http, authz.url(AUTHZ), ask("/classroom/arts/live", headers))
    assert r.headers["x-tutorgate-decision"] == "allow"
    assert not authz.gateway.live.by_key


def test_authz_command(redis_server, tmp_path):  # type: ignore[no-untyped-def]
    """`tutorgate authz` serves decisions and health; --redis without a secret exits 2."""
    import urllib.request

    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text())
    env = {k: v for k, v in os.environ.items() if k != "TUTORGATE_ID_SECRET"}
    out = subprocess.run([EXE, "authz", "--policy", str(policy), "--redis", redis_server.url],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 2 and "TUTORGATE_ID_SECRET" in out.stderr
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([EXE, "authz", "--policy", str(policy), "--listen",
                             f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                             "--redis", redis_server.url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**env, "TUTORGATE_ID_SECRET": "k"})
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        req = urllib.request.Request(f"http://127.0.0.1:{port}{AUTHZ}",
                                     headers={"X-Forwarded-Uri": ARTS, "X-Student-Id": "s-cli"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.headers["X-Tutorgate-Decision"] == "allow"
        with pytest.raises(urllib.error.HTTPError) as e:  # no upstream: nothing else served
            urllib.request.urlopen(f"http://127.0.0.1:{port}/classroom/arts/x", timeout=5)
        assert e.value.code == 404
    finally:
        proc.terminate()
        proc.wait(10)


async def test_target_header_sent_twice_is_refused(pair, http):  # type: ignore[no-untyped-def]
    """Two X-Forwarded-Uri (or X-Original-URI): which one the ingress set is
    unknowable (a client's own may come first), so the check is bad_path,
    never the first copy's decision."""
    authz, _ = pair
    for name in ("X-Forwarded-Uri", "X-Original-URI"):
        for first, second in (("/static/x", FORBIDDEN), (FORBIDDEN, "/static/x")):
            async with http.get(authz.url(AUTHZ), headers=[(name, first), (name, second)]) as r:
                body = await r.json()
                assert (r.status, body["rule"]) == (400, "bad_path"), (name, first)
                assert r.headers["x-tutorgate-decision"] == "deny"


async def test_denial_page_retry_after_of_any_digits_is_a_400(pair, http):  # type: ignore[no-untyped-def]
    """retry_after that str.isdigit() accepts but int() does not (a superscript
    digit), or too large for a float, is a 400, not a 500."""
    authz, _ = pair
    for retry in ("%C2%B2", "%D9%A3", "9" * 400):
        r = await fetch(http, authz.url("/_tutorgate/denial?rule=curfew&retry_after=" + retry))
        assert r.status == 400, retry
