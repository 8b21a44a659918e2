"""Where Redis is and how to reach it: every URL form, TLS files, the key prefix.

```
redis://[[USER]:PASSWORD@]HOST:PORT[/DB]                           one server
rediss://...                                                       the same over TLS
unix:///path/to/redis.sock[?db=N]                                  one server, local socket
redis+sentinel://[[USER]:PASSWORD@]H1:P1[,H2:P2...]/SERVICE[/DB]   Sentinel names the master
redis+cluster://[[USER]:PASSWORD@]H1:P1[,H2:P2...]                 Redis Cluster, seed nodes
rediss+sentinel://...  rediss+cluster://...                        over TLS
```

The rest comes from the environment, read here and nowhere else, so every
command that takes `--redis` (serve, authz, policy push, audit) reads it
the same way: `TUTORGATE_REDIS_CA_FILE`, `TUTORGATE_REDIS_CERT_FILE`,
`TUTORGATE_REDIS_KEY_FILE` (TLS), `TUTORGATE_REDIS_SENTINEL_PASSWORD`
(Sentinels' own password; the URL's credentials are the data nodes'), and
`TUTORGATE_REDIS_PREFIX` (every key and channel, default `tutorgate:`).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote

Mode = Literal["single", "sentinel", "cluster"]
Addr = tuple[str, int]

PREFIX = "tutorgate:"
_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
}
FORMS = ("redis://HOST:PORT[/DB], rediss://..., unix:///PATH, "
         "redis+sentinel://H1:P1[,H2:P2...]/SERVICE[/DB], redis+cluster://H1:P1[,H2:P2...]")


@dataclass(frozen=True)
class RedisTarget:
    """One parsed `--redis` URL plus the environment's TLS, Sentinel and prefix settings."""

    mode: Mode
    nodes: tuple[Addr, ...]            # the server, the Sentinels, or the cluster's seeds
    path: str | None = None            # unix socket
    service: str | None = None         # Sentinel's name of the master
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    sentinel_password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    prefix: str = PREFIX
    _ssl: list[ssl.SSLContext] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def parse(cls, url: str, environ: Mapping[str, str] | None = None) -> RedisTarget:
        """Parse `url`; a clear ValueError names what is wrong with it."""
        env = os.environ if environ is None else environ
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in _SCHEMES:
            raise ValueError(f"not a Redis URL ({FORMS}): {_safe(url)}")
        mode, tls = _SCHEMES[scheme.lower()]
        rest, _, query = rest.partition("?")
        creds, at, hosts_path = rest.rpartition("@")
        if not at:
            creds, hosts_path = "", rest
        user, _, password = creds.partition(":") if ":" in creds else ("", "", creds)
        hosts, _, path = hosts_path.partition("/")
        db_q = parse_qs(query).get("db", [""])[0]
        nodes: tuple[Addr, ...] = ()
        sock = service = None
        if scheme == "unix":
            sock, db = hosts_path, db_q or "0"
        else:
            nodes = _addrs(hosts, url)
        if mode == "single" and sock is None:
            if len(nodes) != 1:
                raise ValueError(f"one HOST:PORT in a redis:// URL, got {len(nodes)}: "
                                 f"{_safe(url)} (several nodes: redis+cluster:// or "
                                 "redis+sentinel://)")
            db = db_q or path or "0"
        elif mode == "sentinel":
            service, _, db = path.partition("/")
            if not service:
                raise ValueError(f"redis+sentinel:// needs the master's name: "
                                 f"redis+sentinel://H1:P1,H2:P2/SERVICE[/DB]: {_safe(url)}")
            db = db or db_q or "0"
        elif mode == "cluster":
            if path.strip("/") not in ("", "0") or db_q not in ("", "0"):
                raise ValueError(f"a cluster has only database 0: {_safe(url)}")
            db = "0"
        e = _env_settings(env, tls)
        return cls(mode=mode, nodes=nodes, path=sock, service=unquote(service or "") or None,
                   tls=tls, username=unquote(user) or None, password=unquote(password) or None,
                   db=_db(db, url), sentinel_password=e["sentinel_password"],
                   ca_file=e["ca_file"], cert_file=e["cert_file"], key_file=e["key_file"],
                   prefix=e["prefix"] or PREFIX)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (made once): the CA file verifies the server, else
        the system's CAs do; cert+key is the client certificate."""
        if not self.tls:
            return None
        if not self._ssl:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            self._ssl.append(ctx)
        return self._ssl[0]

    def __str__(self) -> str:
        where = self.path or ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.mode == "sentinel":
            return f"sentinel {where} service {self.service}"
        return f"cluster {where}" if self.mode == "cluster" else where


def _env_settings(env: Mapping[str, str], tls: bool) -> dict[str, str | None]:
    files = {k: env.get(f"TUTORGATE_REDIS_{k.upper()}") or None
             for k in ("ca_file", "cert_file", "key_file")}
    if any(files.values()) and not tls:
        raise ValueError("TUTORGATE_REDIS_CA_FILE/CERT_FILE/KEY_FILE need a TLS URL "
                         "(rediss://, rediss+sentinel://, rediss+cluster://)")
    if bool(files["cert_file"]) != bool(files["key_file"]):
        raise ValueError("TUTORGATE_REDIS_CERT_FILE and TUTORGATE_REDIS_KEY_FILE go together")
    for name, value in files.items():
        if value and not os.path.isfile(value):
            raise ValueError(f"TUTORGATE_REDIS_{name.upper()}: no such file: {value}")
    prefix = env.get("TUTORGATE_REDIS_PREFIX") or PREFIX
    if any(c in prefix for c in "{} \r\n"):
        raise ValueError(f"TUTORGATE_REDIS_PREFIX may not hold braces or spaces: {prefix!r}")
    return {**files, "prefix": prefix,
            "sentinel_password": env.get("TUTORGATE_REDIS_SENTINEL_PASSWORD") or None}


def _addrs(hosts: str, url: str) -> tuple[Addr, ...]:
    out: list[Addr] = []
    for item in hosts.split(","):
        host, port = item or "127.0.0.1", "6379"
        if item.startswith("["):                      # [::1]:6379
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":") or "6379"
        elif ":" in item:
            host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not HOST:PORT: {item!r} in {_safe(url)}")
        out.append((host, int(port)))
    return tuple(out)


def _db(value: str, url: str) -> int:
    if not value.isdigit():
        raise ValueError(f"the database must be a number, got {value!r}: {_safe(url)}")
    return int(value)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, tail = rest.rpartition("@")
    if not at or ":" not in creds:
        return repr(url)
    return repr(f"{scheme}{sep}{creds.partition(':')[0]}:***@{tail}")
