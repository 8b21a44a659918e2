"""The demo (gateway/demo/) in a real headless Chromium, as a student sees it.

Short policies (seconds) stand in for the demo's 45 s / 20 s. Screenshots go
to $TUTORGATE_SCREENSHOTS when set (docs/screenshots/ holds the committed
ones: `TUTORGATE_SCREENSHOTS=docs/screenshots pytest tests/test_demo.py`),
else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from browser import Page, chromium
from kit import TZ, free_port, policy_text

import gateway
from gateway.demo.run import demo_policy, demo_running
from gateway.policy import parse_policy

DEMO_ROUTES = """\
- {prefix: /classroom/subject/, kind: lesson, category: subject}
- {prefix: /classroom/arts/, kind: lesson, category: non_subject}
- {prefix: /api/photo-search, kind: forbidden, feature: photo_search}
"""


def shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("TUTORGATE_SCREENSHOTS") or tmp_path / "screenshots")


@asynccontextmanager
async def demo(text: str) -> AsyncIterator[str]:
    """The demo site behind a gateway with this policy; its base URL."""
    port = free_port()
    async with demo_running(("127.0.0.1", port), ("127.0.0.1", free_port()),
                            parse_policy(text, "demo-test.yaml")):
        yield f"http://127.0.0.1:{port}"


def page_errors(page: Page) -> list[str]:
    """The console's errors, less Chromium's note that a denied lesson page
    came with its denial status (the 429/403 is the gateway's answer, the
    page itself is the break or rest-day page)."""
    return [e for e in page.errors if not re.fullmatch(
        r"log \(network\): Failed to load resource: the server responded with a status of "
        r"(429|403) \(.*\) http://127\.0\.0\.1:\d+/classroom/subject/math", e)]


async def sign_in(page: Page, base: str, sid: str) -> None:
    """Fill the home page's form and save, as a student would."""
    await page.goto(base + "/")
    await page.eval(f"document.getElementById('sid').value={sid!r};"
                    "document.getElementById('grade').value='3';"
                    "document.querySelector('#who button').click()")
    assert "已保存" in await page.wait_for("document.getElementById('saved').textContent", 5)


async def test_passive_student_is_cut_and_sees_the_break(tmp_path: Path) -> None:
    """A student who opens the math class and only waits is cut at the limit
    (the page's WebSocket gets 4001 lesson_limit), sees the break page count
    down, and is back in a new lesson after the break; no console errors.
    (Quiet time shorter than the lesson: without the held socket the quiet
    page would count as the break and the reload would start a new lesson.)"""
    out = shots(tmp_path)
    text = policy_text(max_duration="8s", min_break="6s", routes=DEMO_ROUTES)
    async with demo(text) as base, chromium(tmp_path / "profile") as page:
        await sign_in(page, base, "passive-1")
        await page.screenshot(out / "home.png")
        assert await page.eval("document.title") == "tutorgate 演示课堂"

        await page.goto(base + "/classroom/subject/math")
        t0 = time.monotonic()
        assert await page.eval("document.title") == "数学课堂"
        await page.wait_for("document.getElementById('live').textContent.includes('直播中')", 5)
        await page.wait_for("/^[0-9]+ 秒$/.test(document.getElementById('left').textContent)", 5)
        await page.screenshot(out / "lesson.png")

        cut = await page.wait_for(
            "(function(){var l=document.getElementById('live');"
            "return l&&l.dataset.code?l.dataset.code+' '+l.dataset.reason:null})()", 12)
        assert cut == "4001 lesson_limit"
        assert time.monotonic() - t0 >= 7.0  # the limit, not the quiet time, ended it

        assert await page.wait_for("document.title==='课间休息'&&document.title", 5)
        first = await page.wait_for("document.getElementById('w').textContent", 3)
        assert first.endswith(" 秒")
        await page.screenshot(out / "break.png")
        assert await page.eval("document.querySelector('a.home').getAttribute('href')") == "/"
        await page.wait_for(f"document.getElementById('w').textContent!=={first!r}", 3)

        # the break over, the page asks again and a new lesson starts
        await page.wait_for("document.title==='数学课堂'", 10)
        assert page_errors(page) == []


async def test_id_field_refuses_what_the_gateway_would(tmp_path: Path) -> None:
    """The id field's pattern compiles in Chromium: a Chinese name is refused
    at the form (never saved, never a 400 page later); a valid id is saved."""
    async with demo(policy_text(routes=DEMO_ROUTES)) as base, \
            chromium(tmp_path / "profile") as page:
        await page.goto(base + "/")
        check = ("(function(v){var e=document.getElementById('sid');e.value=v;"
                 "return e.validity.patternMismatch})")
        assert await page.eval(check + "('张三')") is True
        assert await page.eval(check + "('a b')") is True
        await page.eval(check + "('张三');document.querySelector('#who button').click()")
        assert await page.eval("document.cookie") == ""
        assert await page.eval(check + "('demo-student.1:x@y_z')") is False
        await page.eval("document.querySelector('#who button').click()")
        assert "demo_sid=demo-student.1" in await page.eval("document.cookie")
        assert page_errors(page) == []


async def test_rest_day_and_curfew_pages(tmp_path: Path) -> None:
    """The rest-day and curfew pages say why, how long in hours and minutes,
    and lead back home; in Chinese glyphs, with no console errors."""
    out = shots(tmp_path)
    now = dt.datetime.now(TZ)
    today = now.date().isoformat()
    rest = policy_text(routes=DEMO_ROUTES, rest_days=(
        f"{{weekends: false, statutory_holidays: false, extra_holidays: [{today}]}}"))
    curfew = policy_text(routes=DEMO_ROUTES, curfew=(
        (now - dt.timedelta(hours=1)).strftime("%H:%M"),
        (now + dt.timedelta(hours=7)).strftime("%H:%M")))
    async with chromium(tmp_path / "profile") as page:
        for name, text, title in (("rest-day", rest, "今天是休息日"),
                                  ("curfew", curfew, "今天的课程已结束")):
            async with demo(text) as base:
                await sign_in(page, base, "pages-1")
                await page.goto(base + "/classroom/subject/math")
                assert await page.eval("document.title") == title
                wait = await page.eval("document.getElementById('w').textContent")
                assert "小时" in wait and "分钟" in wait, wait
                assert await page.eval("document.documentElement.lang") == "zh-CN"
                assert await page.eval("document.querySelector('a.home').textContent") == "返回首页"
                await page.screenshot(out / f"{name}.png")
        assert page_errors(page) == []


async def test_demo_keeps_serving_when_its_assets_vanish(tmp_path: Path) -> None:
    """The demo site reads its page template at start: removing the file under
    a running demo (as `./scripts/test`'s editable reinstall does) does not
    turn its pages into 500s."""
    pkg = tmp_path / "pkg"
    shutil.copytree(Path(gateway.__file__).parent, pkg / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    # the copy, not the installed package: it must be the one imported
    code = ("import sys, gateway; assert gateway.__file__.startswith(sys.argv[1]), "
            "gateway.__file__; from gateway.cli import main; "
            "sys.exit(main(['demo-upstream', '--listen', sys.argv[2]]))")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped in `finally`
        [sys.executable, "-c", code, str(pkg), f"127.0.0.1:{port}"], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(pkg)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}"
            end = time.monotonic() + 15
            while True:
                try:
                    async with http.get(url + "/") as r:
                        assert r.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    if proc.poll() is not None or time.monotonic() > end:
                        raise AssertionError(f"the demo site did not start: "
                                             f"{proc.communicate()[1].decode()}") from None
                    await asyncio.sleep(0.1)
            (pkg / "gateway" / "demo" / "page.html").unlink()
            for path in ("/", "/classroom/subject/math", "/library"):
                async with http.get(url + path) as r:
                    assert r.status == 200, path
                    assert "<title>" in await r.text()
    finally:
        proc.terminate()
        proc.wait(10)


def test_packaged_demo_policy_is_the_readme_s() -> None:
    """The packaged demo policy has the 45 s lessons and 20 s breaks the home page promises."""
    limits = demo_policy(dt.datetime(2026, 12, 1, 10, tzinfo=TZ)).profile(None, None).limits
    assert (limits.max_duration, limits.min_break) == (45, 20)
