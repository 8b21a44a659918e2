"""A headless Chromium driven over the DevTools protocol, for tests/test_demo.py.

The protocol is spoken directly over aiohttp's WebSocket client: the test
needs a page, a script evaluation, a screenshot and the console, which is a
few dozen lines, and so no browser-automation package (playwright would also
want to download a browser build of its own). The browser is the system's
/usr/bin/chromium (Debian's chromium + fonts-wqy-microhei for Chinese text);
its absence fails the test, never skips it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = os.environ.get("TUTORGATE_CHROMIUM", "/usr/bin/chromium")


class Page:
    """One tab: calls, console errors, navigation, evaluation, screenshots."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loaded = asyncio.Event()
        self.errors: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._calls.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.loadEventFired":
                self._loaded.set()
            elif method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                self.errors.append(f"exception: {d.get('exception', {}).get('description') or d}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                self.errors.append("console: " + " ".join(
                    str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                e = params["entry"]
                self.errors.append(f"log ({e.get('source')}): {e['text']} {e.get('url', '')}")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[n] = fut
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, 30)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        result: dict[str, Any] = data.get("result", {})
        return result

    async def goto(self, url: str) -> None:
        self._loaded.clear()
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(self._loaded.wait(), 15)

    async def eval(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll until the expression is truthy; its value. Fails with the page's text."""
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):  # mid-navigation: no context yet
                v = await self.eval(expression)
                if v:
                    return v
            if time.monotonic() > end:
                text = await self.eval("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out after {timeout}s waiting for {expression}; "
                                     f"page says: {text!r}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        r = await self.call("Page.captureScreenshot", format="png")
        # a few hundred KiB to a local disk in a test: blocking is fine
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))  # noqa: ASYNC240

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(profile: Path, width: int = 960, height: int = 720) -> AsyncIterator[Page]:
    """A fresh headless Chromium (own profile dir) and its one page."""
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium fonts-wqy-microhei "
                    "(./scripts/test installs both)")
    profile.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, never waited on in the loop
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--remote-allow-origins=*", f"--window-size={width},{height}",
         "--lang=zh-CN", "--accept-lang=zh-CN,zh", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"chromium did not start (exit {proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(url, max_msg_size=0) as ws:
                page = Page(ws)
                for domain in ("Page", "Runtime", "Log"):
                    await page.call(f"{domain}.enable")
                try:
                    yield page
                finally:
                    await page.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
