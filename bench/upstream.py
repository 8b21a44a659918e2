"""Benchmark upstream: answers 200 with a tiny body on any method and path.

A request body is read in chunks, counted and thrown away; the count comes back in
the ``X-Received-Bytes`` header and the body (``bench/upload_memory.py`` checks it).

    python bench/upstream.py --port 8001
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web

OK = b"ok\n"


async def answer(request: web.Request) -> web.Response:
    if not request.body_exists:
        return web.Response(body=OK, content_type="text/plain")
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.Response(
        text=f"{received}\n",
        content_type="text/plain",
        headers={"X-Received-Bytes": str(received)},
    )


def make_app() -> web.Application:
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{path:.*}", answer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
