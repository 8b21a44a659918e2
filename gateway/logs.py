"""Log lines: text or JSON with the same fields, request ids, the access log.

Every line may carry the fields below when they are known. Fields about
the request being served come from `current` (a context variable the proxy
sets per request: aiohttp runs each request in its own task, so nothing
leaks between requests); a call may also pass them as `extra=`.

A line about a student names only the pseudonym (the keyed hash), never
the id: the proxy only ever has the pseudonym to put there.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from typing import Any, Literal

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

REQUEST_ID = "X-Request-Id"
# A client's (or the ingress's) request id is kept when it is this shape:
# short enough to log, nothing that could break a log line or a header.
_VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# The extra fields, in the order a text line shows them.
FIELDS = ("request_id", "student", "rule", "route", "region", "instance")


class RequestContext:
    """What is known about the request being served, filled in as the proxy
    learns it."""

    __slots__ = ("region", "request_id", "route", "rule", "student")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.student: str | None = None
        self.route: str | None = None
        self.rule: str | None = None
        self.region: str | None = None


current: ContextVar[RequestContext | None] = ContextVar("tutorgate_request", default=None)


class _Ids:
    """Generated request ids: a random per-process prefix and a counter,
    unique across instances and cheaper than a UUID per request."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter):x}"


_ids = _Ids()
if hasattr(os, "register_at_fork"):  # a forked worker must not repeat its parent's ids
    os.register_at_fork(after_in_child=_ids.reset)


def request_id() -> str:
    """The id of the request being served (a new one outside a request):
    what goes upstream and back to the client."""
    ctx = current.get()
    return ctx.request_id if ctx is not None else _ids.next()


def begin_request(sent: str | None) -> RequestContext:
    """Start the log context of a request (see `current`)."""
    # The id it came with if valid (1-128 of A-Z a-z 0-9 . _ -), else a new
    # one; _Ids.next inlined: this runs on every request, and the calls cost
    # ~1.5k of its instructions (bench/instructions.py)
    if sent is None or not _VALID_ID.fullmatch(sent):
        ids = _ids
        sent = f"{ids.prefix}-{next(ids.counter):x}"
    ctx = RequestContext(sent)
    current.set(ctx)
    return ctx


class ContextFilter(logging.Filter):
    """Adds the request's fields and the instance name to every record."""

    def __init__(self, instance: str | None = None) -> None:
        super().__init__()
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current.get()
        if ctx is not None:
            for name in ("request_id", "student", "route", "rule", "region"):
                if getattr(record, name, None) is None:
                    setattr(record, name, getattr(ctx, name))
        if self.instance and getattr(record, "instance", None) is None:
            record.instance = self.instance
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FIELDS:
        v = getattr(record, name, None)
        if v is not None and v != "":
            out[name] = v
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the known
    fields, then any other extra the call passed."""

    _RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
        "message", "asctime", "taskName", *FIELDS}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created).astimezone()
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_fields(record))
        for k, v in record.__dict__.items():
            if k not in self._RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: message key=value ...` with the known fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return head + "".join(f" {k}={v}" for k, v in fields.items()) + sep + tail


def setup(level: str = "INFO", fmt: LogFormat = "text", instance: str | None = None) -> None:
    """Send every log line to stderr in `fmt`; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter(instance))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # APScheduler narrates every job run at INFO; its failures still show.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


ACCESS_LOGGER = "tutorgate.access"


class AccessLog(AbstractAccessLogger):
    """One INFO line per answered request (off by default).

    It names the policy route the request matched, never the path: a URL
    may carry a student's id or name, and the privacy contract says no log
    line holds one. The request id ties the line to the upstream's own
    log, which has the path."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        ctx = current.get()
        route = ctx.route if ctx is not None and ctx.route else "-"
        self.logger.info(
            "%s %s %d %.1fms", request.method, route, response.status, time * 1000,
            extra={"method": request.method, "status": response.status,
                   "duration_ms": round(time * 1000, 3),
                   "bytes": response.body_length,
                   "route": route})
