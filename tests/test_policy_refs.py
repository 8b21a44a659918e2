"""What a policy names outside itself (JWT key variable or file, calendar
files, its own encoding) is checked by `check`, on reload, at `serve` start,
and on a fleet push: refused with one line per problem, never a traceback."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import RedisServer
from kit import Upstream, free_port, metric, policy_text, start_gateway

from gateway.fleet import CHANNEL, POLICY_KEY
from gateway.policy import load_policy

EXE = str(Path(sys.executable).parent / "tutorgate")
ENV = "TUTORGATE_TEST_UNSET_KEY"


def jwt(key: str) -> str:
    return policy_text(extra=f"identity:\n  source: jwt\n  jwt:\n    algorithm: HS256\n"
                             f"    {key}\n")


BROKEN: dict[str, tuple[bytes, str]] = {
    "key_env_unset": (jwt(f"key_env: {ENV}").encode(),
                      f"identity.jwt.key_env: environment variable {ENV} is not set"),
    "key_file_missing": (jwt("key_file: keys/nope.key").encode(),
                         "identity.jwt.key_file: cannot read keys/nope.key: No such file"),
    "not_utf8": (policy_text().encode() + b"# caf\xe9\n",
                 "<root>: the policy is not UTF-8 text: byte 0xe9"),
    "calendar_not_utf8": (policy_text(rest_days="{calendar_files: [cal.yaml]}").encode(),
                          "rest_days.calendar_files[0]: cal.yaml is not UTF-8 text"),
}


def write(tmp_path: Path, case: str) -> Path:
    (tmp_path / "cal.yaml").write_bytes(b"year: 2027\nholidays: []\n# \xff\n")
    p = tmp_path / f"{case}.yaml"
    p.write_bytes(BROKEN[case][0])
    return p


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_refuses_what_the_policy_names(tmp_path: Path, case: str) -> None:
    """`tutorgate check` exits 2 with one `FILE: field.path: message` line."""
    p = write(tmp_path, case)
    out = subprocess.run([EXE, "check", str(p)], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{p}: {BROKEN[case][1]}"), out.stdout
    assert "Traceback" not in out.stderr


def test_key_variable_set_and_key_file_present_are_valid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same policies load once the variable is set and the file exists."""
    monkeypatch.setenv(ENV, "secret")
    p = tmp_path / "p.yaml"
    p.write_text(jwt(f"key_env: {ENV}"))
    load_policy(p)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "nope.key").write_text("secret")
    p.write_text(jwt("key_file: keys/nope.key"))
    load_policy(p)


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_reload_refuses_counts_and_keeps_the_old_policy(
        tmp_path: Path, upstream: Upstream, case: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A reload to a broken policy is refused: counted, one ERROR line per
    problem and no traceback, the old policy stays live."""
    p = write(tmp_path, case)
    good = policy_text()
    p.write_text(good)
    gw = await start_gateway(good, upstream.url, policy_path=str(p))
    try:
        sha = gw.gateway.policy.sha
        p.write_bytes(BROKEN[case][0])
        with caplog.at_level(logging.ERROR):
            assert gw.gateway.reload_file() is False
        assert gw.gateway.policy.sha == sha
        assert metric(gw, "tutorgate_policy_reload_failures_total") == 1
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and BROKEN[case][1] in errors[0].getMessage()
        assert errors[0].exc_info is None
    finally:
        await gw.stop()


def test_serve_exits_2_before_binding(tmp_path: Path) -> None:
    """`serve` with an unset key variable exits 2 and never binds its port."""
    p = write(tmp_path, "key_env_unset")
    port = free_port()
    out = subprocess.run([EXE, "serve", "--policy", str(p), "--upstream", "http://127.0.0.1:9",
                          "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert BROKEN["key_env_unset"][1] in out.stderr and "Traceback" not in out.stderr


def test_policy_push_refuses_a_broken_policy(tmp_path: Path, redis_server: RedisServer) -> None:
    """`tutorgate policy push` validates first: exit 2, nothing pushed."""
    p = write(tmp_path, "key_file_missing")
    out = subprocess.run([EXE, "policy", "push", str(p), "--redis", redis_server.url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and BROKEN["key_file_missing"][1] in out.stderr


async def test_follower_refuses_a_broken_push_and_keeps_following(
        tmp_path: Path, private_redis: RedisServer, upstream: Upstream) -> None:
    """Pushed bytes that are not UTF-8, or a pushed policy naming an unset
    key variable, are refused and counted; the follower lives on and applies
    the next good push."""
    gw = await start_gateway(policy_text(), upstream.url, redis_url=private_redis.url,
                             policy_path=str(tmp_path / "p.yaml"))
    r = aioredis.Redis.from_url(private_redis.url)
    try:
        sha = gw.gateway.policy.sha

        async def push(text: bytes) -> None:
            await r.hset(POLICY_KEY, mapping={"text": text, "pushed_at": repr(time.time())})
            await r.publish(CHANNEL, "x")

        async def until(cond: Any) -> None:
            for _ in range(100):
                if cond():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("timed out")

        await push(BROKEN["not_utf8"][0])
        await until(lambda: metric(gw, "tutorgate_policy_reload_failures_total") == 1)
        await push(BROKEN["key_env_unset"][0])
        await until(lambda: metric(gw, "tutorgate_policy_reload_failures_total") == 2)
        assert gw.gateway.policy.sha == sha
        await push(policy_text(max_duration="7s").encode())
        await until(lambda: gw.gateway.policy.sha != sha)
    finally:
        await r.aclose()
        await gw.stop()
