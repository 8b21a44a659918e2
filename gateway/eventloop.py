"""The event loop a tutorgate process runs on."""

from __future__ import annotations

import asyncio


def use_uvloop() -> None:
    """uvloop where it is installed (every supported platform): the proxy's
    per-request cost is mostly the loop's and the HTTP parser's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on exotic platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
