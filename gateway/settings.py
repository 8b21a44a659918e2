"""Process settings from argv and the environment (never from the policy)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

# Upstream connections. Every open WebSocket holds one for its whole life,
# so this bounds live connections too (TUTORGATE_UPSTREAM_POOL).
UPSTREAM_POOL = 20000


@dataclass(frozen=True)
class Settings:
    policy_path: str
    upstream: str
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    admin_listen: tuple[str, int] = ("127.0.0.1", 9100)
    redis_url: str | None = None
    id_secret: bytes | None = None
    max_body: int | None = None        # bytes; None = no cap (the platform's choice)
    read_timeout: float | None = 300.0  # upstream idle read timeout, seconds
    instance: str = ""
    grace: float = 10.0                 # seconds ordinary requests get on SIGTERM
    pool_size: int = UPSTREAM_POOL
    audit_retention_days: float = 180.0  # audit stream trimmed by age
    access_log: bool = False            # one line per request (TUTORGATE_ACCESS_LOG)
    # Client connections (server.py): the whole request head within
    # header_timeout; idle keep-alive connections closed after keepalive_timeout;
    # max_connections None = sized from the open-files limit at start.
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int | None = None
    # `serve --workers N` (workers.py): each worker binds the listen port with
    # SO_REUSEPORT and serves its admin app on a private socket instead.
    reuse_port: bool = False
    admin_socket: str | None = None

    @property
    def instance_name(self) -> str:
        return self.instance or f"{socket.gethostname()}:{self.listen[1]}"


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "PORT"; IPv6 as "[::1]:8080"."""
    v = value.strip()
    if v.startswith("["):
        host, _, port = v[1:].partition("]:")
    elif ":" in v:
        host, _, port = v.rpartition(":")
    else:
        host, port = "", v
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {value!r}")
    return host or default_host, int(port)


def env(name: str) -> str | None:
    v = os.environ.get(name)
    return v if v else None
