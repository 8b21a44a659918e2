"""Baseline: a bare aiohttp pass-through proxy, no policy, no state.

The floor the gateway is measured against: uvloop, one pooled ClientSession with a
DummyCookieJar, no decompression, bodies streamed both ways, hop-by-hop headers
dropped, X-Forwarded-For appended.

    python bench/bare_proxy.py --port 8002 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvloop
from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "host",
    }
)
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = set(HOP_BY_HOP)
    for value in headers.getall("Connection", ()):
        drop.update(token.strip().lower() for token in value.split(","))
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


async def proxy(request: web.Request) -> web.StreamResponse:
    headers = end_to_end(request.headers)
    prior, peer = request.headers.get("X-Forwarded-For"), request.remote or ""
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    body = request.content if request.body_exists else None
    async with request.app[SESSION].request(
        request.method, url, headers=headers, data=body, allow_redirects=False
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(end_to_end(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def make_app(upstream: str) -> web.Application:
    @asynccontextmanager
    async def session(app: web.Application) -> AsyncIterator[None]:
        timeout = ClientTimeout(total=None, sock_connect=5, sock_read=60)
        async with ClientSession(
            connector=TCPConnector(limit=256),
            cookie_jar=DummyCookieJar(),
            auto_decompress=False,
            timeout=timeout,
        ) as client:
            app[SESSION] = client
            yield

    app = web.Application(handler_args={"auto_decompress": False})
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{path:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
