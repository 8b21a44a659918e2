"""The `tutorgate` command: a thin layer over settings, policy and app."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, logs
from .cli_policy import (
    _calendar_gap,
    _fail,
    _load,
    cmd_calendar,
    cmd_check,
    cmd_explain,
)
from .eventloop import use_uvloop
from .policy import Policy
from .settings import UPSTREAM_POOL, Settings, env, parse_hostport

log = logging.getLogger("tutorgate")


def _log_format(a: argparse.Namespace) -> logs.LogFormat:
    """--log-format, else TUTORGATE_LOG_FORMAT, else text."""
    value = a.log_format or env("TUTORGATE_LOG_FORMAT") or "text"
    if value not in logs.LOG_FORMATS:
        raise ValueError(f"TUTORGATE_LOG_FORMAT must be text or json, got {value!r}")
    return value


def _setup_logging(a: argparse.Namespace, instance: str | None = None) -> None:
    logs.setup(a.log_level or env("TUTORGATE_LOG_LEVEL") or "INFO", _log_format(a), instance)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bool_env(name: str) -> bool:
    v = env(name)
    if v is None or v.lower() in _FALSE:
        return False
    if v.lower() in _TRUE:
        return True
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {v!r}")


# ---------------------------------------------------------------- serve

def cmd_serve(a: argparse.Namespace) -> int:
    """`serve`, and `authz` (serve without an upstream: decisions only)."""
    args = _serve_args(a)
    if isinstance(args, str):
        return _fail(args)
    policy_path, upstream, listen, admin, redis_url, workers, secret = args
    policy = _load(policy_path)
    if isinstance(policy, int):
        return policy
    try:
        log_format = _log_format(a)
        settings = _settings_from_env(Settings(
            policy_path=policy_path, upstream=upstream, listen=listen, admin_listen=admin,
            redis_url=redis_url, id_secret=secret.encode() if secret else None,
            instance=env("TUTORGATE_INSTANCE") or "",
            access_log=a.access_log or _bool_env("TUTORGATE_ACCESS_LOG")))
    except ValueError as e:
        return _fail(str(e))
    log_level = a.log_level or env("TUTORGATE_LOG_LEVEL") or "INFO"
    logs.setup(log_level, log_format, settings.instance_name)
    if not secret:
        log.warning("TUTORGATE_ID_SECRET is not set: using a random key (memory mode only; "
                    "pseudonyms change on restart)")
    refused = _gap_refuses(policy)
    if refused is not None:
        return _fail(refused)
    try:
        if workers > 1:
            from .workers import supervise
            return supervise(settings, workers, log_level=log_level, log_format=log_format)
        from .app import serve
        use_uvloop()
        return asyncio.run(serve(settings, policy))
    except OSError as e:
        return _fail(f"cannot listen: {e}", 1)


ServeArgs = tuple[str, str, tuple[str, int], tuple[str, int], str | None, int, str | None]


def _serve_args(a: argparse.Namespace) -> ServeArgs | str:
    """What `serve`/`authz` need before the policy is read, or why not."""
    from .workers import parse_workers, workers_problem
    policy_path = a.policy or env("TUTORGATE_POLICY")
    # `authz` is serve without an upstream: decisions only (authz.py)
    upstream = "" if a.command == "authz" else a.upstream or env("TUTORGATE_UPSTREAM") or ""
    if not policy_path:
        return f"{a.command} needs --policy FILE (or TUTORGATE_POLICY)"
    if not upstream and a.command == "serve":
        return "serve needs --upstream URL (or TUTORGATE_UPSTREAM)"
    try:
        listen = parse_hostport(a.listen or env("TUTORGATE_LISTEN") or "127.0.0.1:8080")
        admin = parse_hostport(a.admin_listen or env("TUTORGATE_ADMIN_LISTEN") or "127.0.0.1:9100")
        workers = parse_workers(a.workers or env("TUTORGATE_WORKERS"))
    except ValueError as e:
        return str(e)
    redis_url = a.redis or env("TUTORGATE_REDIS_URL")
    problem = workers_problem(workers, redis_url)
    if problem is not None:
        return problem
    secret = env("TUTORGATE_ID_SECRET")
    if redis_url and not secret:
        return ("TUTORGATE_ID_SECRET is required with --redis: student pseudonyms must "
                "agree across instances and restarts")
    if redis_url and (bad := _redis_problem(redis_url)):
        return bad
    return policy_path, upstream, listen, admin, redis_url, workers, secret


def _settings_from_env(settings: Settings) -> Settings:
    """The settings that only the environment sets (ValueError names a bad one)."""
    changes: dict[str, Any] = {"max_body": _int_env("TUTORGATE_MAX_BODY")}
    if pool := _int_env("TUTORGATE_UPSTREAM_POOL"):
        changes["pool_size"] = pool
    if retention := _int_env("TUTORGATE_AUDIT_RETENTION_DAYS"):
        changes["audit_retention_days"] = float(retention)
    if conns := _int_env("TUTORGATE_MAX_CONNECTIONS"):
        changes["max_connections"] = conns
    if (head := _seconds_env("TUTORGATE_HEADER_TIMEOUT")) is not None:
        changes["header_timeout"] = head
    if (idle := _seconds_env("TUTORGATE_KEEPALIVE_TIMEOUT")) is not None:
        changes["keepalive_timeout"] = idle
    return dataclasses.replace(settings, **changes)



def _gap_refuses(policy: Policy) -> str | None:
    """The calendar gap warning, logged; returned when the policy says a gap
    today refuses to serve."""
    gap = _calendar_gap(policy)
    if gap is None:
        return None
    if policy.model.rest_days.calendar_gap == "refuse" and \
            not policy.national.covers(dt.date.today()):
        return gap
    log.warning("%s", gap)
    return None


def _int_env(name: str) -> int | None:
    v = env(name)
    if v is None:
        return None
    if not v.isdigit():
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    return int(v)


def _seconds_env(name: str) -> float | None:
    v = env(name)
    if v is None:
        return None
    try:
        seconds = float(v)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise ValueError(f"{name} must be a number of seconds above 0, got {v!r}")
    return seconds


# ---------------------------------------------------------------- demo

def cmd_demo(a: argparse.Namespace) -> int:
    try:
        _setup_logging(a)
    except ValueError as e:
        return _fail(str(e))
    listen = parse_hostport(a.listen or env("TUTORGATE_LISTEN") or "127.0.0.1:8080")
    admin = parse_hostport(a.admin_listen or env("TUTORGATE_ADMIN_LISTEN") or "127.0.0.1:9100")
    from .demo.run import run_demo
    use_uvloop()
    return asyncio.run(run_demo(listen, admin))


def cmd_demo_upstream(a: argparse.Namespace) -> int:
    try:
        _setup_logging(a)
    except ValueError as e:
        return _fail(str(e))
    listen = parse_hostport(a.listen, default_host="0.0.0.0")
    from .demo.site import run_site
    use_uvloop()
    return asyncio.run(run_site(listen))


# ---------------------------------------------------------------- policy push, audit

def cmd_policy_push(a: argparse.Namespace) -> int:
    policy = _load(a.file)
    if isinstance(policy, int):
        return policy
    redis_url = a.redis or env("TUTORGATE_REDIS_URL")
    if not redis_url:
        return _fail("policy push needs --redis URL")
    if bad := _redis_problem(redis_url):
        return _fail(bad)
    from .fleet import push_policy
    try:
        n = asyncio.run(push_policy(redis_url, Path(a.file).read_text(encoding="utf-8")))
    except Exception as e:
        return _fail(f"could not push to Redis: {e}", 1)
    print(f"pushed policy sha={policy.sha} version={policy.version}; "
          f"{n} instance(s) listening")
    return 0


def _redis_problem(url: str) -> str | None:
    """What is wrong with a --redis URL (or its TLS settings), if anything."""
    from .redis import RedisTarget
    try:
        RedisTarget.parse(url)
    except ValueError as e:
        return f"--redis: {e}"
    return None


def cmd_audit(a: argparse.Namespace) -> int:
    from .audit import run_audit_command
    return run_audit_command(a)


# ---------------------------------------------------------------- parser

# Settings read only from the environment (no option): listed in `serve
# --help` and in the README, the two places an operator looks.
ENV_ONLY: tuple[tuple[str, str], ...] = (
    ("TUTORGATE_ID_SECRET", "key that pseudonymises student ids (HMAC); required with "
                            "--redis, the same on every instance; random in memory mode"),
    ("TUTORGATE_MAX_BODY", "request body cap in bytes; larger bodies get 413 (default: none)"),
    ("TUTORGATE_UPSTREAM_POOL", f"upstream connections; each open WebSocket holds one "
                                f"(default {UPSTREAM_POOL})"),
    ("TUTORGATE_AUDIT_RETENTION_DAYS", "audit events older than this are trimmed "
                                       "(default 180)"),
    ("TUTORGATE_INSTANCE", "this instance's name in logs and audit records "
                           "(default HOSTNAME:PORT)"),
    ("TUTORGATE_HEADER_TIMEOUT", "seconds a client has to send a request head (default 10)"),
    ("TUTORGATE_KEEPALIVE_TIMEOUT", "seconds an idle keep-alive connection stays open"),
    ("TUTORGATE_MAX_CONNECTIONS", "client connections served at once; more wait in the "
                                  "listen backlog"),
    ("TUTORGATE_JWT_KEY", "any name the policy gives in identity.jwt.key_env: the JWT "
                          "verification key"),
    ("TUTORGATE_REDIS_CA_FILE", "with rediss://...: the CA that verifies Redis (default: "
                                "the system's CAs)"),
    ("TUTORGATE_REDIS_CERT_FILE", "with rediss://...: client certificate (with KEY_FILE)"),
    ("TUTORGATE_REDIS_KEY_FILE", "with rediss://...: the client certificate's key"),
    ("TUTORGATE_REDIS_SENTINEL_PASSWORD", "the Sentinels' own password (the URL's "
                                          "credentials are the data nodes')"),
    ("TUTORGATE_REDIS_PREFIX", "prefix of every Redis key and channel (default tutorgate:)"),
)


def _env_epilog() -> str:
    lines = ["environment-only settings:"]
    for name, text in ENV_ONLY:
        lines.append(f"  {name}")
        lines += textwrap.wrap(text, 76, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", metavar="LEVEL",
                   help="DEBUG, INFO, WARNING or ERROR (default INFO) [TUTORGATE_LOG_LEVEL]")
    p.add_argument("--log-format", choices=logs.LOG_FORMATS,
                   help="text (default) or json: one object a line with time, level, "
                        "message and the request's fields [TUTORGATE_LOG_FORMAT]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tutorgate",
        description="A reverse proxy that enforces the Double Reduction rules for online "
                    "training per student: 30-minute lessons, 10-minute breaks, a nightly "
                    "curfew, no subject classes on rest days, nothing for preschoolers, no "
                    "photo search.")
    p.add_argument("--version", action="version", version=f"tutorgate {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           help="run `tutorgate COMMAND --help` for its options")

    s = sub.add_parser("serve", help="run the gateway in front of an upstream",
                       description="Run the gateway. Every option also reads an environment\n"
                                   "variable (shown in brackets); the settings below have no\n"
                                   "option.",
                       epilog=_env_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--policy", metavar="FILE", help="policy YAML file [TUTORGATE_POLICY]")
    s.add_argument("--upstream", metavar="URL", help="upstream base URL, e.g. "
                                                     "http://127.0.0.1:8000 [TUTORGATE_UPSTREAM]")
    s.add_argument("--listen", metavar="HOST:PORT",
                   help="address for students (default 127.0.0.1:8080) [TUTORGATE_LISTEN]")
    s.add_argument("--admin-listen", metavar="HOST:PORT",
                   help="address of /healthz /readyz /metrics (default 127.0.0.1:9100) "
                        "[TUTORGATE_ADMIN_LISTEN]")
    s.add_argument("--redis", metavar="URL",
                   help="Redis URL for shared state: redis://, rediss://, "
                        "redis+sentinel://H:P,.../SERVICE, redis+cluster://H:P,... "
                        "(docs/redis.md); "
                        "without it state is kept in process memory (one instance) "
                        "[TUTORGATE_REDIS_URL]")
    s.add_argument("--workers", metavar="N",
                   help="worker processes sharing the listen port (SO_REUSEPORT), one per "
                        "core; above 1 needs --redis (default 1) [TUTORGATE_WORKERS]")
    s.add_argument("--access-log", action="store_true", default=False,
                   help="log one line per request: method, policy route (never the path), "
                        "status, time, request id, student pseudonym (default off) "
                        "[TUTORGATE_ACCESS_LOG=1]")
    _log_options(s)
    s.set_defaults(func=cmd_serve)

    az = sub.add_parser("authz", help="decide for an ingress (nginx, Envoy, Traefik) "
                                      "without proxying",
                        description="Answer /_tutorgate/authz for an ingress that asks before "
                                    "it forwards (nginx auth_request, Envoy ext_authz, "
                                    "Traefik ForwardAuth): the same rules, clock, metrics "
                                    "and audit as serve, no upstream. Every option also "
                                    "reads an environment variable (in brackets).",
                        epilog=_env_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    az.add_argument("--policy", metavar="FILE", help="policy YAML file [TUTORGATE_POLICY]")
    az.add_argument("--listen", metavar="HOST:PORT",
                    help="address the ingress asks (default 127.0.0.1:8080) "
                         "[TUTORGATE_LISTEN]")
    az.add_argument("--admin-listen", metavar="HOST:PORT",
                    help="address of /healthz /readyz /metrics (default 127.0.0.1:9100) "
                         "[TUTORGATE_ADMIN_LISTEN]")
    az.add_argument("--redis", metavar="URL",
                    help="Redis URL for shared state: redis://, rediss://, "
                         "redis+sentinel://H:P,.../SERVICE, redis+cluster://H:P,... "
                         "(docs/redis.md); without it state is kept in process memory "
                         "(one instance) [TUTORGATE_REDIS_URL]")
    az.add_argument("--workers", metavar="N",
                    help="worker processes sharing the listen port (SO_REUSEPORT), one per "
                         "core; above 1 needs --redis (default 1) [TUTORGATE_WORKERS]")
    az.add_argument("--access-log", action="store_true", default=False,
                    help="log one line per check (default off) [TUTORGATE_ACCESS_LOG=1]")
    _log_options(az)
    az.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a policy and summarize what it enforces",
                       description="Validate a policy file: exit 0 and a summary if valid, "
                                   "exit 2 and one line per problem if not.")
    c.add_argument("file", help="the policy YAML file")
    c.add_argument("--format", choices=("text", "json"), default="text",
                   help="text (default) or json: the summary, or the problems with their lines")
    c.set_defaults(func=cmd_check)

    d = sub.add_parser("demo", help="a demo tutoring site behind the gateway (in memory)",
                       description="Start a demo tutoring site behind the gateway on the "
                                   "embedded in-memory store, with short lessons, and print "
                                   "its URL.")
    d.add_argument("--listen", metavar="HOST:PORT",
                   help="address of the demo (default 127.0.0.1:8080) [TUTORGATE_LISTEN]")
    d.add_argument("--admin-listen", metavar="HOST:PORT",
                   help="address of /metrics (default 127.0.0.1:9100) [TUTORGATE_ADMIN_LISTEN]")
    _log_options(d)
    d.set_defaults(func=cmd_demo)

    du = sub.add_parser("demo-upstream", help="only the demo tutoring site (no gateway)",
                        description="Serve the demo tutoring site alone, as an upstream for "
                                    "a gateway started separately (the compose stack).")
    du.add_argument("--listen", metavar="HOST:PORT", default="0.0.0.0:8000",
                    help="address of the site (default 0.0.0.0:8000)")
    _log_options(du)
    du.set_defaults(func=cmd_demo_upstream)

    e = sub.add_parser("explain", help="what would happen to a request, and why",
                       description="Decide one request offline (an identified student) and "
                                   "show every rule checked. Exit 0 when it could answer, 2 "
                                   "on bad arguments or an invalid policy.")
    e.add_argument("--policy", metavar="FILE", required=True, help="the policy YAML file")
    e.add_argument("--path", required=True,
                   help="request path, e.g. /classroom/subject/math (starts with /)")
    e.add_argument("--at", metavar="ISO8601", required=True,
                   help="when the request arrives (no offset = the policy's time zone)")
    e.add_argument("--grade", help="the student's grade: preschool or 1-12 (default: none)")
    e.add_argument("--region", help="the student's region code, e.g. 650000 (default: the "
                                    "base policy)")
    e.add_argument("--lesson-started", metavar="ISO8601",
                   help="a lesson has been going on since then (default: no lesson)")
    e.add_argument("--format", choices=("text", "json"), default="text",
                   help="text (default) or json: one object")
    e.set_defaults(func=cmd_explain)

    cal = sub.add_parser("calendar", help="days closed to subject classes in a year",
                         description="List the days of YEAR when subject classes are not "
                                     "allowed, and why. Exit 3 if the calendar lacks data.")
    cal.add_argument("year", type=int, help="the year, e.g. 2026")
    cal.add_argument("--policy", metavar="FILE", required=True, help="the policy YAML file")
    cal.add_argument("--region", help="a region code of the policy (default: the base policy)")
    cal.add_argument("--format", choices=("text", "json"), default="text",
                     help="text (default) or json: a list of days")
    cal.add_argument("--include-workdays", action="store_true",
                     help='also list make-up school days (调休), with reason "workday"')
    cal.set_defaults(func=cmd_calendar)

    pol = sub.add_parser("policy", help="fleet policy operations",
                         description="Operations on the policy every instance on a Redis "
                                     "runs.")
    psub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True,
                              help="push")
    push = psub.add_parser("push", help="publish a policy to every instance on a Redis",
                           description="Validate FILE and publish it: every gateway on that "
                                       "Redis switches to it within a second.")
    push.add_argument("file", help="the policy YAML file")
    push.add_argument("--redis", metavar="URL",
                      help="the fleet's Redis [TUTORGATE_REDIS_URL]")
    push.set_defaults(func=cmd_policy_push)

    au = sub.add_parser("audit", help="the regulator's audit trail",
                        description="Read the audit trail the gateways write to Redis "
                                    "(lesson starts and ends, denials, cuts).")
    asub = au.add_subparsers(dest="audit_command", metavar="ACTION", required=True,
                             help="export or report")
    ex = asub.add_parser("export", help="audit events, oldest first",
                         description="Print the audit events between --since and --until, "
                                     "oldest first. Students appear as pseudonyms; a denial "
                                     "without a student (photo search) as \"anonymous\".")
    ex.add_argument("--redis", metavar="URL", help="the fleet's Redis [TUTORGATE_REDIS_URL]")
    ex.add_argument("--since", metavar="ISO8601",
                    help="first event time (no offset = UTC; default: the oldest kept)")
    ex.add_argument("--until", metavar="ISO8601",
                    help="last event time (no offset = UTC; default: now)")
    ex.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                    help="jsonl (default): one JSON object a line; csv: a header and rows")
    ex.set_defaults(func=cmd_audit)
    rep = asub.add_parser("report", help="a day's compliance summary",
                          description="Summarise one day: lessons started, ended and still "
                                      "in progress, their lengths, breaks, cuts and denials.")
    rep.add_argument("--redis", metavar="URL", help="the fleet's Redis [TUTORGATE_REDIS_URL]")
    rep.add_argument("--day", metavar="YYYY-MM-DD", required=True,
                     help="the day, by the time stamps' own offset (the policy's zone)")
    rep.add_argument("--format", choices=("text", "json"), default="text",
                     help="text (default) or json: one object")
    rep.set_defaults(func=cmd_audit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
