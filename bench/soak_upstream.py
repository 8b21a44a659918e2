"""Soak upstream: answers 200 on any method and path and logs every request it serves.

One JSON object a line (JSONL) per request, written before the answer:

    {"t": 1764590000.123, "kind": "http", "m": "GET", "p": "/classroom/arts/x",
     "ids": ["s-17"], "grades": [], "regions": ["990000"], "via": "127.0.0.1:41234"}

``p`` is the request target exactly as it arrived (raw, undecoded); ``ids``,
``grades`` and ``regions`` are every value of the identity headers (a
duplicated header shows up as two values); ``via`` is ``X-Forwarded-Host``,
which names the gateway that forwarded it. A WebSocket upgrade on a path
ending in ``/live`` is accepted and logged twice: ``ws_open`` when the
handshake is answered and ``ws_close`` (same ``ws`` number) when it ends.
The soak's checker (bench/soak_check.py) reads this log alone.

The low-level aiohttp server is used on purpose: no router, so odd targets
(``..``, ``%2e``, ``;x=1``, absolute form) reach the handler and are logged as
they came instead of being answered 404 by a router.

    python bench/soak_upstream.py --port 8001 --log results/soak/upstream.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import time
from typing import IO, Any

from aiohttp import WSMsgType, web

OK = b"ok\n"


class Log:
    """Buffered JSONL writer, flushed every 0.2 s and on exit."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._ws = itertools.count(1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def next_ws(self) -> int:
        return next(self._ws)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        self._file.close()


def _record(request: web.BaseRequest, kind: str) -> dict[str, Any]:
    h = request.headers
    return {
        "t": time.time(),
        "kind": kind,
        "m": request.method,
        "p": request.raw_path,
        "ids": h.getall("X-Student-Id", []),
        "grades": h.getall("X-Student-Grade", []),
        "regions": h.getall("X-Student-Region", []),
        "via": h.get("X-Forwarded-Host", ""),
    }


def make_handler(log: Log):  # type: ignore[no-untyped-def]
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and request.path.endswith("/live"):
            return await _websocket(request, log)
        log.write(_record(request, "http"))
        if request.body_exists:
            async for _chunk in request.content.iter_any():
                pass
        return web.Response(body=OK, content_type="text/plain")

    return handle


async def _websocket(request: web.BaseRequest, log: Log) -> web.StreamResponse:
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    number = log.next_ws()
    rec = _record(request, "ws_open")
    rec["ws"] = number
    log.write(rec)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
    finally:
        rec = _record(request, "ws_close")
        rec["ws"] = number
        log.write(rec)
    return ws


async def serve(host: str, port: int, log_path: str) -> None:
    log = Log(log_path)
    server = web.Server(make_handler(log), handler_args={"auto_decompress": False})
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            log.flush()
    finally:
        srv.close()
        await server.shutdown(1.0)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.log))


if __name__ == "__main__":
    main()
