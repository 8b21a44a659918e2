"""`tutorgate demo`: the demo site behind the gateway, on the in-memory store."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from importlib import resources
from zoneinfo import ZoneInfo

from aiohttp import web
from aiohttp.typedefs import Handler

from ..app import Gateway
from ..policy import Policy, parse_policy
from ..settings import Settings
from .site import make_site

log = logging.getLogger("tutorgate.demo")


def demo_policy(now: dt.datetime | None = None) -> Policy:
    """The packaged demo policy; if it is already past the curfew here, the
    demo moves the curfew an hour on so the site can be tried at any hour."""
    text = resources.files(__package__).joinpath("policy.yaml").read_text(encoding="utf-8")
    policy = parse_policy(text, "demo/policy.yaml")
    tz = ZoneInfo(policy.model.timezone)
    local = (now or dt.datetime.now(tz)).astimezone(tz)
    t = local.time()
    if t >= dt.time(23) or t < dt.time(6):
        start = (local + dt.timedelta(minutes=60)).strftime("%H:%M")
        end = (local + dt.timedelta(minutes=120)).strftime("%H:%M")
        text = text.replace('start: "23:00"', f'start: "{start}"').replace(
            'end: "06:00"', f'end: "{end}"')
        log.warning("it is curfew time now: the demo's curfew moves to %s-%s", start, end)
        policy = parse_policy(text, "demo/policy.yaml")
    return policy


@web.middleware
async def demo_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stands in for a platform's auth layer: the demo page's cookies become
    the trusted identity headers. Client-sent copies of those headers are
    dropped first, as a real auth layer must do."""
    headers = request.headers.copy()
    for h in ("X-Student-Id", "X-Student-Grade", "X-Student-Region"):
        headers.popall(h, None)
    sid = request.cookies.get("demo_sid")
    grade = request.cookies.get("demo_grade")
    if sid:
        headers["X-Student-Id"] = sid
    if grade:
        headers["X-Student-Grade"] = grade
    response: web.StreamResponse = await handler(request.clone(headers=headers))
    return response


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def demo_running(listen: tuple[str, int], admin: tuple[str, int],
                       policy: Policy | None = None) -> AsyncIterator[Gateway]:
    """The demo site behind a gateway on `listen` (in memory), until the block
    ends. `policy` defaults to the packaged demo policy (tests pass short ones)."""
    site_port = _free_port()
    site = web.AppRunner(make_site(), access_log=None)
    await site.setup()
    await web.TCPSite(site, "127.0.0.1", site_port).start()
    settings = Settings(policy_path="", upstream=f"http://127.0.0.1:{site_port}",
                        listen=listen, admin_listen=admin, id_secret=os.urandom(32))
    gw = Gateway(settings, policy or demo_policy())
    app = gw.main_app()
    app.middlewares.append(demo_auth)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    admin_runner = web.AppRunner(gw.admin_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(runner, *listen).start()
        await web.TCPSite(admin_runner, *admin).start()
        yield gw
    finally:
        await gw.live.close_all("shutdown")
        await runner.cleanup()
        await admin_runner.cleanup()
        await site.cleanup()


async def run_demo(listen: tuple[str, int], admin: tuple[str, int]) -> int:
    async with demo_running(listen, admin):
        log.info("state store: in process memory (demo)")
        print(f"tutorgate demo: open http://{listen[0]}:{listen[1]}/  "
              f"(metrics: http://{admin[0]}:{admin[1]}/metrics; Ctrl-C to stop)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0
