"""Shared fixtures: a real redis-server on a free port, free ports, policies."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real redis-server process on loopback; stop() and start() again on
    the same port to simulate an outage."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            # Never a silent skip: CI installs it (.ci/run), so missing is a failure.
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests use their own keys/flush."""
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (outage tests stop and restart it)."""
    srv = RedisServer(tmp_path)
    yield srv
    srv.stop()


# ---------------------------------------------------------------- gateway kit

@pytest.fixture
async def upstream():  # type: ignore[no-untyped-def]
    from kit import start_upstream

    up = await start_upstream()
    yield up
    assert up.runner is not None
    await up.runner.cleanup()


@pytest.fixture
async def gateways():  # type: ignore[no-untyped-def]
    """Factory: `await gateways(policy, upstream_url, **kw)`; all stopped at teardown."""
    from kit import start_gateway

    started = []

    async def start(policy, upstream_url, **kw):  # type: ignore[no-untyped-def]
        g = await start_gateway(policy, upstream_url, **kw)
        started.append(g)
        return g

    yield start
    for g in reversed(started):
        await g.stop()


@pytest.fixture
async def http():  # type: ignore[no-untyped-def]
    import aiohttp

    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Run an end-to-end test on both stores: None = memory, else a Redis URL."""
    if request.param == "memory":
        return None
    srv: RedisServer = request.getfixturevalue("redis_server")
    return srv.url


@pytest.fixture
def upstream_process(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The kit's upstream in a process of its own (for subprocess gateways)."""
    port = free_port()
    script = tmp_path / "up.py"
    script.write_text(
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from kit import start_upstream\n"
        "import kit\n"
        f"kit.free_port = lambda: {port}\n"
        "async def main():\n"
        "    await start_upstream()\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(5)
