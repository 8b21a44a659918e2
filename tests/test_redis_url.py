"""Every `--redis` URL form and its environment (TLS files, Sentinel password,
prefix), and TLS against a real redis-server with a CA and client certificates."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from topologies import Server, make_certs

from gateway.clock import ClockLimits
from gateway.errors import StoreUnavailable
from gateway.redis import RedisClient, RedisTarget
from gateway.store.redis import RedisStore

L = ClockLimits(max_duration=1800.0, min_break=600.0)


@pytest.mark.parametrize(("url", "want"), [
    ("redis://127.0.0.1:6380/2", dict(mode="single", nodes=(("127.0.0.1", 6380),), db=2)),
    ("redis://:pw@h:1", dict(mode="single", password="pw", username=None)),
    ("redis://u:p%40ss@h:1/0", dict(username="u", password="p@ss")),
    ("rediss://h:6379", dict(mode="single", tls=True)),
    ("unix:///run/redis.sock?db=3", dict(path="/run/redis.sock", db=3)),
    ("redis+sentinel://s1:26379,s2:26380/mymaster/4",
     dict(mode="sentinel", nodes=(("s1", 26379), ("s2", 26380)), service="mymaster", db=4)),
    ("rediss+sentinel://u:p@s1:26379/svc", dict(tls=True, username="u", password="p")),
    ("redis+cluster://a:7000,b:7001,[::1]:7002",
     dict(mode="cluster", nodes=(("a", 7000), ("b", 7001), ("::1", 7002)))),
    ("rediss+cluster://:pw@a:7000", dict(mode="cluster", tls=True, password="pw")),
])
def test_every_url_form_parses(url: str, want: dict[str, object]) -> None:
    """Each URL form of the contract gives its mode, nodes, credentials and database."""
    t = RedisTarget.parse(url, {})
    assert {k: getattr(t, k) for k in want} == want
    assert t.prefix == "tutorgate:"


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://h:1", "not a Redis URL"),
    ("redis://a:1,b:2", "one HOST:PORT"),
    ("redis+sentinel://a:1", "needs the master's name"),
    ("redis+cluster://a:1/3", "only database 0"),
    ("redis://h:99999", "not HOST:PORT"),
    ("redis://h:1/x", "must be a number"),
])
def test_bad_urls_say_what_is_wrong(url: str, fragment: str) -> None:
    """A bad URL is refused with a message naming the problem."""
    with pytest.raises(ValueError, match=fragment):
        RedisTarget.parse(url, {})


def test_passwords_stay_out_of_messages() -> None:
    """A refused URL's message never shows its password."""
    with pytest.raises(ValueError) as e:
        RedisTarget.parse("redis+cluster://u:hunter2@a:1/5", {})
    assert "hunter2" not in str(e.value)


def test_environment_settings(tmp_path: Path) -> None:
    """TLS files, the Sentinel password and the prefix come from the environment, checked."""
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    env = {"TUTORGATE_REDIS_CA_FILE": str(ca), "TUTORGATE_REDIS_SENTINEL_PASSWORD": "sp",
           "TUTORGATE_REDIS_PREFIX": "tg-test:"}
    t = RedisTarget.parse("rediss+sentinel://s:1/svc", env)
    assert (t.ca_file, t.sentinel_password, t.prefix) == (str(ca), "sp", "tg-test:")
    with pytest.raises(ValueError, match="need a TLS URL"):
        RedisTarget.parse("redis://h:1", env)
    with pytest.raises(ValueError, match="go together"):
        RedisTarget.parse("rediss://h:1", {"TUTORGATE_REDIS_CERT_FILE": str(ca)})
    with pytest.raises(ValueError, match="no such file"):
        RedisTarget.parse("rediss://h:1", {"TUTORGATE_REDIS_CA_FILE": str(tmp_path / "nope")})


def test_serve_refuses_a_bad_url_before_binding(tmp_path: Path) -> None:
    """`serve --redis` with a malformed URL exits 2 with the reason."""
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nroutes: []\n")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "tutorgate"), "serve", "--policy", str(policy),
         "--upstream", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{free_port()}",
         "--redis", "redis+sentinel://127.0.0.1:1"],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "TUTORGATE_ID_SECRET": "s"})
    assert out.returncode == 2 and "needs the master's name" in out.stderr


async def test_prefix_setting_names_every_key(redis_server: object, monkeypatch:
                                              pytest.MonkeyPatch) -> None:
    """TUTORGATE_REDIS_PREFIX is the one setting for the store's keys."""
    import redis.asyncio as aioredis
    url = redis_server.url  # type: ignore[attr-defined]
    monkeypatch.setenv("TUTORGATE_REDIS_PREFIX", "tgp:")
    store = RedisStore(url)
    try:
        await store.advance("pfx", L, 1, 100.0, now=1000.0)
    finally:
        await store.close()
    async with aioredis.Redis.from_url(url) as r:
        assert await r.exists("tgp:{pfx}:clock") == 1
        assert await r.exists("tutorgate:{pfx}:clock") == 0


# ---------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, Path]]]:
    d = tmp_path_factory.mktemp("tls")
    certs = make_certs(d)
    port = free_port()
    srv = Server(d, "--port", "0", "--tls-port", str(port), "--tls-cert-file",
                 str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"]),
                 "--tls-ca-cert-file", str(certs["ca.crt"]), "--tls-auth-clients", "yes",
                 port=port, ping=False)
    import time
    time.sleep(0.5)
    yield srv, certs
    srv.kill()


async def _works(url: str, env: dict[str, str]) -> bool:
    client = RedisClient(RedisTarget.parse(url, env), op_timeout=1.0)
    try:
        return bool(await client.command(None, "PING") == b"PONG")
    finally:
        await client.close()


async def test_tls_with_ca_and_client_certificate(tls: tuple[Server, dict[str, Path]]) -> None:
    """rediss:// with the CA and a client certificate talks to a TLS-only Redis."""
    srv, c = tls
    env = {"TUTORGATE_REDIS_CA_FILE": str(c["ca.crt"]),
           "TUTORGATE_REDIS_CERT_FILE": str(c["client.crt"]),
           "TUTORGATE_REDIS_KEY_FILE": str(c["client.key"])}
    assert await _works(f"rediss://127.0.0.1:{srv.port}", env)


@pytest.mark.parametrize("case", ["no client certificate", "untrusted client", "wrong CA",
                                  "plain text"])
async def test_tls_refusals(tls: tuple[Server, dict[str, Path]], case: str) -> None:
    """A missing or untrusted client certificate, a server the CA does not
    vouch for, or plain text to a TLS port: StoreUnavailable, quickly."""
    srv, c = tls
    env = {"TUTORGATE_REDIS_CA_FILE": str(c["ca.crt"])}
    url = f"rediss://127.0.0.1:{srv.port}"
    if case == "untrusted client":
        env |= {"TUTORGATE_REDIS_CERT_FILE": str(c["other.crt"]),
                "TUTORGATE_REDIS_KEY_FILE": str(c["other.key"])}
    elif case == "wrong CA":
        env = {"TUTORGATE_REDIS_CA_FILE": str(c["other.crt"]),
               "TUTORGATE_REDIS_CERT_FILE": str(c["client.crt"]),
               "TUTORGATE_REDIS_KEY_FILE": str(c["client.key"])}
    elif case == "plain text":
        env, url = {}, f"redis://127.0.0.1:{srv.port}"
    with pytest.raises(StoreUnavailable):
        await _works(url, env)
