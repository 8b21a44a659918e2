"""A small demo tutoring site: the upstream the gateway protects in the demo.

Pages: a home page to pick a student and grade, a subject class (math), an
arts class, and a photo-search endpoint that the policy forbids. A lesson
page holds the class's live WebSocket, as a real live class does, and shows
a countdown from `/_tutorgate/status` (asked through the gateway).
"""

from __future__ import annotations

import asyncio
import html
import json
from importlib import resources

from aiohttp import web

from ..responses import FAVICON

# Class names as a student reads them; the path keeps its ASCII name.
CLASS_NAMES = {"math": "数学", "chinese": "语文", "english": "英语", "drawing": "美术",
               "music": "音乐"}

# An id the gateway accepts (the contract's 1-128 letters, digits and -_.:@).
# The `-` is escaped: Chromium compiles `pattern` with the `v` flag, where a
# bare `-` at the end of a class is an invalid expression and the pattern is
# silently ignored (a Chinese name would pass and then get a 400 page).
ID_PATTERN = r"[A-Za-z0-9_.:@\-]{1,128}"

_HOME = """
<h1>tutorgate 演示课堂</h1>
<p>选择一位学生和年级，然后进入课堂。演示策略：每节课 <b>45 秒</b>，课间休息 <b>20 秒</b>，
休息日不上学科类课程，学龄前儿童不提供线上培训，“拍照搜题”被禁止。</p>
<form id=who onsubmit="return go(event)">
<label>学生编号 <input id=sid value="demo-student-1" required pattern="{pattern}"
 title="只能用英文字母、数字和 - _ . : @，最多 128 个字符"></label>
<label>年级 <select id=grade>
<option value="preschool">学龄前</option><option value="1">一年级</option>
<option value="2">二年级</option><option value="3" selected>三年级</option>
<option value="4">四年级</option><option value="5">五年级</option><option value="6">六年级</option>
<option value="7">初一</option><option value="8">初二</option><option value="9">初三</option>
<option value="10">高一</option><option value="11">高二</option><option value="12">高三</option>
</select></label>
<button>保存</button> <span id=saved class=note></span></form>
<ul class=rooms>
<li><a href="/classroom/subject/math">数学课（学科类）</a></li>
<li><a href="/classroom/arts/drawing">美术课（非学科类）</a></li>
<li><a href="/api/photo-search">拍照搜题（已禁止）</a></li>
<li><a href="/library">图书角（不受管控，直接转发）</a></li>
</ul>
<p class=note>演示里的身份用 cookie 代替平台的登录层传给网关（仅供演示）。</p>
"""

_LESSON = """
<h1>{name} · {kind}课堂</h1>
<p>本节课剩余 <b id=left>…</b>。 <span id=live class=note>正在连接课堂…</span></p>
<p>课堂页面一直连着直播通道（WebSocket），所以只是看着不动也在上课；下课时网关断开它，
页面随后显示休息页面。每次点击“下一题”也是一次上课请求。</p>
<p><a class=btn href="{path}">下一题</a> <a href="/">返回首页</a></p>
"""


class Site:
    """The demo site's pages. The page template is read once, at start: a
    reinstall of the package under a running demo must not break it."""

    def __init__(self) -> None:
        self.template = resources.files(__package__).joinpath("page.html").read_text(
            encoding="utf-8")

    def page(self, title: str, body: str) -> web.Response:
        text = (self.template.replace("{{title}}", html.escape(title))
                .replace("{{favicon}}", FAVICON).replace("{{body}}", body))
        return web.Response(text=text, content_type="text/html", charset="utf-8")

    async def home(self, request: web.Request) -> web.Response:
        return self.page("tutorgate 演示课堂", _HOME.replace("{pattern}", html.escape(ID_PATTERN)))

    async def lesson(self, request: web.Request) -> web.Response:
        slug = request.match_info.get("name", "")
        name = CLASS_NAMES.get(slug, slug)
        kind = "学科类" if "/subject/" in request.path else "非学科类"
        return self.page(f"{name}课堂", _LESSON.format(
            name=html.escape(name), kind=kind, path=html.escape(request.path)))

    async def library(self, request: web.Request) -> web.Response:
        return self.page("图书角", "<h1>图书角</h1><p>不受管控的页面：网关直接转发。</p>"
                                   "<a href='/'>返回首页</a>")


async def photo_search(request: web.Request) -> web.Response:
    return web.json_response({"answer": "42"})  # never reached through the gateway


async def live(request: web.Request) -> web.WebSocketResponse:
    """A class's live socket: sends a tick every second until either side closes."""
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    n = 0
    while not ws.closed:
        await ws.send_str(json.dumps({"tick": n}))
        n += 1
        msg = None
        try:
            msg = await ws.receive(timeout=1.0)
        except TimeoutError:
            continue
        if msg.type in (web.WSMsgType.CLOSE, web.WSMsgType.CLOSING, web.WSMsgType.CLOSED):
            break
    return ws


def make_site() -> web.Application:
    site = Site()
    app = web.Application()
    app.router.add_get("/", site.home)
    app.router.add_get("/classroom/{kind}/{name}/live", live)
    app.router.add_get("/classroom/{kind}/{name}", site.lesson)
    app.router.add_route("*", "/api/photo-search{tail:.*}", photo_search)
    app.router.add_get("/library", site.library)
    return app


async def run_site(listen: tuple[str, int]) -> int:
    runner = web.AppRunner(make_site(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, *listen).start()
    print(f"demo site on http://{listen[0]}:{listen[1]}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0
