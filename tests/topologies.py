"""Redis topologies for tests: a cluster, a Sentinel set, a TLS server.

Real servers on free loopback ports, started and stopped by fixtures
(`tests/conftest.py` has the single server). A missing binary fails loudly.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port

from gateway.redis.resp import slot as key_slot


def _exe(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed (apt-get install redis-server redis-tools)")
    return exe


def cli(port: int, *args: str, tls: list[str] | None = None) -> str:
    """redis-cli against 127.0.0.1:port; its output."""
    out = subprocess.run([_exe("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *(tls or []),
                          *args], capture_output=True, text=True, timeout=20)
    return out.stdout + out.stderr


def wait_ping(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"redis on {port} did not start")


class Server:
    """One redis-server process with extra options; kill() is a crash."""

    def __init__(self, workdir: Path, *options: str, port: int | None = None,
                 ping: bool = True) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self.start(ping)

    def start(self, ping: bool = True) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [_exe("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", str(self.workdir), *self.options],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if ping:
            wait_ping(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port <= 55535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                pass


class Cluster:
    """3 masters, 3 replicas, `cluster-require-full-coverage no`."""

    def __init__(self, workdir: Path, node_timeout: int = 2000) -> None:
        self.servers: list[Server] = []
        for _ in range(6):
            port = cluster_port()
            d = workdir / str(port)
            d.mkdir()
            self.servers.append(Server(
                d, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout),
                "--cluster-require-full-coverage", "no", port=port))
        out = cli(self.servers[0].port, "--cluster", "create",
                  *[f"127.0.0.1:{s.port}" for s in self.servers],
                  "--cluster-replicas", "1", "--cluster-yes")
        if "All 16384 slots covered" not in out:
            raise RuntimeError(f"cluster create failed: {out}")
        self.wait_ok()
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:3])

    def wait_ok(self, within: float = 20.0) -> None:
        """Every node says ok and every replica is in sync (a replica that
        never synced cannot take over)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            live = [s for s in self.servers if s.proc is not None]
            if all("cluster_state:ok" in cli(s.port, "CLUSTER", "INFO") for s in live):
                infos = [cli(s.port, "INFO", "replication") for s in live]
                if all("role:master" in i or "master_link_status:up" in i for i in infos):
                    return
            time.sleep(0.1)
        raise RuntimeError("cluster not ok")

    def master_of(self, key: str) -> Server:
        """The server that holds `key`'s slot now."""
        slot = key_slot(key)
        for s in self.servers:
            if s.proc is None:
                continue
            for line in cli(s.port, "CLUSTER", "NODES").splitlines():
                f = line.split()
                if "myself" in f[2] and "master" in f[2]:
                    for rng in f[8:]:
                        lo, _, hi = rng.partition("-")
                        if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                            return s
        raise RuntimeError(f"no master for slot {slot}")

    def stop(self) -> None:
        for s in self.servers:
            s.kill()


class SentinelSet:
    """A master, its replica and 3 Sentinels watching them as `svc`."""

    def __init__(self, workdir: Path, *, sentinel_password: str | None = None) -> None:
        self.master = Server(workdir)
        self.replica = Server(workdir, "--replicaof", "127.0.0.1", str(self.master.port))
        self.sentinels: list[Server] = []
        for _ in range(3):
            port = free_port()
            conf = workdir / f"sentinel-{port}.conf"   # writable: Sentinel rewrites it
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor svc 127.0.0.1 {self.master.port} 2\n"
                "sentinel down-after-milliseconds svc 1000\n"
                "sentinel failover-timeout svc 5000\n"
                + (f"requirepass {sentinel_password}\n" if sentinel_password else ""))
            log = open(workdir / f"sentinel-{port}.log", "ab")  # noqa: SIM115
            s = Server.__new__(Server)
            s.port, s.workdir, s.options = port, workdir, ()
            s.proc = subprocess.Popen([_exe("redis-server"), str(conf), "--sentinel"],
                                      stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
            log.close()
            self.sentinels.append(s)
        auth = ["--pass", sentinel_password] if sentinel_password else []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            info = cli(self.master.port, "INFO", "replication")
            known = all("num-other-sentinels" in cli(s.port, *auth, "SENTINEL", "MASTER", "svc")
                        for s in self.sentinels)
            if "connected_slaves:1" in info and known and "master_link_status:up" in cli(
                    self.replica.port, "INFO", "replication"):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("sentinel set did not come up")
        self.url = ("redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
                    + "/svc")

    def current_master(self, sentinel_password: str | None = None) -> int:
        auth = ["--pass", sentinel_password] if sentinel_password else []
        for s in self.sentinels:
            out = cli(s.port, *auth, "SENTINEL", "get-master-addr-by-name", "svc").split()
            if len(out) == 2 and out[1].isdigit():
                return int(out[1])
        raise RuntimeError("no sentinel answers")

    def stop(self) -> None:
        for s in [*self.sentinels, self.master, self.replica]:
            s.kill()


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    openssl = _exe("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    for name in ("server", "client", "other"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", "san.ext")
    # a certificate signed by nobody the server trusts
    run("x509", "-req", "-in", "other.csr", "-signkey", "other.key", "-days", "2",
        "-out", "other.crt")
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                "client.key", "other.crt", "other.key")}
